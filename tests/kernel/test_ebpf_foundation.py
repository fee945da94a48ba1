"""The shared eBPF foundation: objects built from native/bpf, loaded once per agent
with their maps pinned under the agent's own directory, adopted after a restart,
maps read and written through bpf(2), programs attached at the hook layout of a
veth in a namespace the test creates, and a program the kernel refuses reported
with the verifier's words. Every pin directory is unique and removed."""

from __future__ import annotations

import os
import shutil
import struct
import uuid

import pytest
from pyroute2 import NetNS

from podnet.ebpf import attach
from podnet.ebpf.bpffs import PinDir, is_bpffs
from podnet.ebpf.build import BpfBuildError, build_objects, object_path
from podnet.ebpf.programs import ProgramLoadError, load_object
from podnet.ebpf.syscall import BpfError, Map
from tests.kernel.nsutil import in_ns, namespaces

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf(2) and network namespaces")

BAD_PROGRAM = r"""
#include "podnet_bpf.h"
SEC("tc")
int reads_past_the_packet(struct __sk_buff *skb)
{
	return *(int *)(long)skb->data;  /* no bounds check: the verifier refuses it */
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture
def pins():
    d = PinDir.for_instance(f"test-{uuid.uuid4().hex[:10]}")
    try:
        yield d
    finally:
        d.remove()
    assert not d.root.exists()


def test_objects_are_built_and_rebuilt_only_when_their_source_changes(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(object_path("x").parents[2] / "native" / "bpf", src)
    out = tmp_path / "out"
    objs = build_objects(out, src)
    assert {o.name for o in objs} >= {"services.o"}
    svc = out / "services.o"
    first = svc.stat().st_mtime_ns
    build_objects(out, src)
    assert svc.stat().st_mtime_ns == first  # nothing changed: not compiled again
    (src / "services.c").write_text((src / "services.c").read_text() + "\n/* changed */\n")
    build_objects(out, src)
    assert svc.stat().st_mtime_ns != first
    (src / "broken.c").write_text("this is not C\n")
    with pytest.raises(BpfBuildError, match="broken.c"):
        build_objects(out, src)


def test_load_pins_maps_per_agent_and_a_restart_adopts_them(pins):
    assert is_bpffs(str(pins.root.parents[1]))
    obj = load_object(object_path("services"), pins)
    try:
        assert not obj.adopted
        assert set(obj.programs) == {"podnet_svc_from_pod", "podnet_svc_to_pod", "podnet_svc_redirect"}
        assert (pins.maps / "podnet_svc_frontends").exists()
        with obj.map("podnet_svc_cluster_ips") as m:
            key = bytes([10, 96, 0, 1])
            m.update(key, b"\1")
            assert m.lookup(key) == b"\1"
        again = load_object(object_path("services"), pins)  # an agent restarted
        try:
            assert again.adopted
            assert again.programs.keys() == obj.programs.keys()
            with again.map("podnet_svc_cluster_ips") as m:
                assert m.lookup(bytes([10, 96, 0, 1])) == b"\1"  # the same map, its entries kept
        finally:
            again.close()
    finally:
        obj.close()


def test_map_operations_and_named_errors(pins):
    obj = load_object(object_path("services"), pins)
    obj.close()
    with Map.pinned(pins.map_path("podnet_svc_backends")) as m:
        entries = {struct.pack("=I", i): struct.pack("=IHBB", i, 80, 6, 0) for i in range(1, 5001)}
        assert m.update_many(entries) == 5000  # batched
        assert m.items() == entries
        assert len(list(m.keys())) == 5000
        assert m.delete(struct.pack("=I", 7)) and not m.delete(struct.pack("=I", 7))
        assert m.lookup(struct.pack("=I", 7)) is None
        assert m.delete_many([struct.pack("=I", i) for i in (1, 2, 7)]) == 2
        # batched: a missing key (7, 9999) in the middle or at either end is skipped, the rest deleted
        gone = [7, *range(10, 2000), 9999, *range(2000, 4000), 9999]
        assert m.delete_many([struct.pack("=I", i) for i in gone]) == 3990
        assert set(m.items()) == {struct.pack("=I", i) for i in (3, 4, 5, 6, 8, 9, *range(4000, 5001))}
        with pytest.raises(ValueError, match="podnet_svc_backends: key of 2 bytes"):
            m.lookup(b"\0\0")
    with pytest.raises(BpfError, match="ENOENT") as e:
        Map.pinned(pins.map_path("no_such_map"))
    assert "no_such_map" in str(e.value)


def test_programs_attach_at_the_layout_and_pass_traffic(pins):
    obj = load_object(object_path("services"), pins)
    try:
        with namespaces() as ns:
            a, b = ns.new("a"), ns.new("b")
            in_ns(a, "ip", "link", "add", "name", "host0", "type", "veth", "peer", "name", "eth0", "netns", b)
            in_ns(a, "ip", "addr", "add", "10.77.0.1/24", "dev", "host0")
            in_ns(a, "ip", "link", "set", "host0", "up")
            in_ns(b, "ip", "addr", "add", "10.77.0.2/24", "dev", "eth0")
            in_ns(b, "ip", "link", "set", "eth0", "up")
            ipr = NetNS(a)
            try:
                idx = ipr.link_lookup(ifname="host0")[0]
                attach.attach(ipr, idx, "services", "ingress", obj.fd("podnet_svc_from_pod"),
                              obj.filter_name("podnet_svc_from_pod"))
                attach.attach(ipr, idx, "services", "egress", obj.fd("podnet_svc_to_pod"),
                              obj.filter_name("podnet_svc_to_pod"))
                assert attach.attached(ipr, idx, "ingress") == {1: obj.filter_name("podnet_svc_from_pod")}
                assert attach.attached(ipr, idx, "egress") == {2: obj.filter_name("podnet_svc_to_pod")}
                # attaching again replaces the filter in place: still one per hook
                attach.attach(ipr, idx, "services", "ingress", obj.fd("podnet_svc_from_pod"),
                              obj.filter_name("podnet_svc_from_pod"))
                assert list(attach.attached(ipr, idx, "ingress")) == [1]
                # no Service: the programs let every packet through
                in_ns(b, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.0.1")
                assert attach.detach(ipr, idx, "services", "ingress")
                assert not attach.detach(ipr, idx, "services", "ingress")
                assert attach.attached(ipr, idx, "ingress") == {}
            finally:
                ipr.close()
    finally:
        obj.close()


def test_a_program_the_verifier_refuses_is_reported_and_nothing_is_pinned(pins, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(object_path("x").parents[2] / "native" / "bpf" / "podnet_bpf.h", src)
    (src / "bad.c").write_text(BAD_PROGRAM)
    bad, = build_objects(tmp_path / "out", src)
    with pytest.raises(ProgramLoadError) as e:
        load_object(bad, pins)
    message = str(e.value)
    assert "bad.o" in message and "refused" in message
    assert "reads_past_the_packet" in message or "invalid access to packet" in message, message
    assert list(pins.progs.iterdir()) == []


def test_layout_is_one_table():
    assert attach.hook("services", "ingress").prio < attach.hook("policy", "ingress").prio
    assert attach.hook("policy", "egress").prio < attach.hook("services", "egress").prio
    # the fast path's redirect comes after policy and its guard: it never skips them
    assert attach.hook("policy-guard", "ingress").prio < attach.hook("services-redirect", "ingress").prio
    with pytest.raises(ValueError):
        attach.hook("dns", "ingress")
