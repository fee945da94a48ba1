"""The block record's pure logic: ordinals, the free FIFO, reservations, attributes."""

from __future__ import annotations

import ipaddress

import pytest

from podnet.ipam import block as blk


def test_ordinal_math_round_trips_v4_and_v6():
    assert blk.address("10.1.2.64/26", 0) == "10.1.2.64"
    assert blk.address("10.1.2.64/26", 63) == "10.1.2.127"
    assert blk.ordinal("10.1.2.64/26", "10.1.2.100") == 36
    assert blk.address("fd00::40/122", 5) == "fd00::45"
    assert blk.ordinal("fd00::40/122", "fd00::7f") == 63
    with pytest.raises(ValueError):
        blk.ordinal("10.1.2.64/26", "10.1.2.128")
    with pytest.raises(ValueError):
        blk.address("10.1.2.64/26", 64)


def test_block_geometry():
    assert blk.block_count("10.0.0.0/16", 26) == 1024
    assert blk.nth_block("10.0.0.0/16", 26, 0) == "10.0.0.0/26"
    assert blk.nth_block("10.0.0.0/16", 26, 5) == "10.0.1.64/26"
    assert blk.block_containing("10.0.0.0/16", 26, "10.0.1.77") == "10.0.1.64/26"
    assert blk.key_name("10.0.1.64/26") == "10.0.1.64-26"
    assert blk.cidr_of_key_name("fd00::40-122") == "fd00::40/122"


def test_new_block_is_empty_and_consistent():
    b = blk.new_block("10.0.0.0/29", "p", "n1")
    assert b["affinity"] == "host:n1" and blk.affinity_node(b) == "n1"
    assert blk.size(b) == 8 and blk.used(b) == 0 and blk.is_empty(b)
    assert b["unallocated"] == list(range(8))
    assert blk.check_consistent(b) == []
    assert blk.affinity_node(blk.new_block("10.0.0.0/29", "p", None)) is None


def test_assign_takes_front_and_release_appends_so_longest_free_is_reused_first():
    b = blk.new_block("10.0.0.0/29", "p", "n1")
    for o in range(3):
        assert blk.first_free(b) == o
        b = blk.assign(b, o, f"h{o}", {"node": "n1"})
    b = blk.unassign(b, blk.ordinals_of(b, "h0"))
    # 0 was freed last: every never-used ordinal comes before it.
    order = []
    while (o := blk.first_free(b)) is not None:
        order.append(o)
        b = blk.assign(b, o, f"x{o}", {})
    assert order == [3, 4, 5, 6, 7, 0]
    assert blk.check_consistent(b) == []


def test_assign_does_not_change_its_argument_and_refuses_taken_ordinal():
    b = blk.new_block("10.0.0.0/30", "p", "n1")
    b2 = blk.assign(b, 1, "h", {"node": "n1", "pod": "p"})
    assert blk.is_free(b, 1) and not blk.is_free(b2, 1)
    assert blk.handle_at(b2, 1) == "h"
    assert blk.attributes_at(b2, 1) == {"handle_id": "h", "secondary": {"node": "n1", "pod": "p"}}
    with pytest.raises(ValueError):
        blk.assign(b2, 1, "other", {})


def test_sequence_numbers_tell_a_reused_ordinal_apart():
    b = blk.assign(blk.new_block("10.0.0.0/30", "p", None), 0, "h", {})
    first = blk.allocation_sequence(b, 0)
    b = blk.unassign(b, [0])
    assert blk.allocation_sequence(b, 0) is None
    b = blk.assign(b, 0, "h", {})
    assert blk.allocation_sequence(b, 0) != first
    assert b["sequenceNumber"] == 3  # every change bumps it


def test_unassign_compacts_attributes():
    b = blk.new_block("10.0.0.0/29", "p", "n1")
    for o, h in enumerate(["a", "b", "c"]):
        b = blk.assign(b, o, h, {})
    b = blk.unassign(b, blk.ordinals_of(b, "b"))
    assert [a["handle_id"] for a in b["attributes"]] == ["a", "c"]
    assert blk.handle_at(b, 0) == "a" and blk.handle_at(b, 2) == "c" and blk.handle_at(b, 1) is None
    assert dict((o, a["handle_id"]) for o, a in blk.allocations(b)) == {0: "a", 2: "c"}
    assert blk.check_consistent(b) == []


def test_reserved_ordinals_cover_intersections_only():
    nets = [ipaddress.ip_network("10.0.0.2/31"), ipaddress.ip_network("10.0.0.7/32"),
            ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("fd00::/64")]
    assert blk.reserved_ordinals("10.0.0.0/29", nets) == {2, 3, 7}
    assert blk.reserved_ordinals("10.0.0.0/29", [ipaddress.ip_network("10.0.0.0/8")]) == set(range(8))


def test_reserved_ordinals_go_last_and_are_skipped():
    b = blk.new_block("10.0.0.0/30", "p", "n1", reserved=[0, 2])
    assert b["unallocated"] == [1, 3, 0, 2]
    assert b["reserved"] == [0, 2]
    held = frozenset({0, 2})
    assert blk.free_count(b, held) == 2
    b = blk.assign(b, blk.first_free(b, held), "h1", {})
    b = blk.assign(b, blk.first_free(b, held), "h2", {})
    assert blk.first_free(b, held) is None  # only reserved ones left
    assert blk.first_free(b) == 0


def test_with_affinity_changes_owner_and_bumps_sequence():
    b = blk.new_block("10.0.0.0/30", "p", "n1")
    b2 = blk.with_affinity(b, None)
    assert blk.affinity_node(b2) is None and b2["sequenceNumber"] == 1


def test_check_consistent_spots_corruption():
    b = blk.assign(blk.new_block("10.0.0.0/30", "p", "n1"), 0, "h", {})
    broken = {**b, "unallocated": [0, 1, 2, 3]}
    assert "an ordinal is both allocated and free" in blk.check_consistent(broken)
    lost = {**b, "unallocated": [1, 2]}
    assert "some ordinals are neither allocated nor free" in blk.check_consistent(lost)
