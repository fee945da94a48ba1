"""The netlink encoding of nf_tables batches (the kernel's answer: tests/kernel/test_services_*)."""

from __future__ import annotations

import os
import struct

import pytest

from podnet.dataplane import nfnetlink as nl


@pytest.mark.parametrize("key_len", [4, 8, 12, 16])
@pytest.mark.parametrize("data", [None, "value8", "value12", "verdict"])
def test_cached_element_headers_equal_the_attributes_built_one_by_one(key_len, data):
    key = os.urandom(key_len)
    encoded = {None: None, "value8": nl.value(os.urandom(8)), "value12": nl.value(os.urandom(12)),
               "verdict": nl.verdict("goto svc_t")}[data]
    body = nl.nested(nl.SET_ELEM_KEY, nl.attr(nl.DATA_VALUE, key))
    if encoded is not None:
        body += nl.nested(nl.SET_ELEM_DATA, encoded)
    assert nl.element(key, encoded) == nl.nested(nl.LIST_ELEM, body)


def test_a_batch_is_framed_and_element_lists_split_below_the_attribute_limit():
    b = nl.Batch()
    b.add_elements("t", "s", (nl.element(struct.pack("!I", i)) for i in range(10000)))
    b.delete_elements("t", "s", [nl.element(b"\0\0\0\1")])
    assert b.elements == 10001 and len(b) > 1
    data = b.encode(100)
    off, kinds, seqs = 0, [], []
    while off < len(data):
        n, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
        assert n <= 0xFFFF + 64  # every nested element list fits a 16-bit attribute length
        kinds.append(kind)
        seqs.append((seq, flags & nl.NLM_F_ACK))
        off += n
    assert kinds[0] == nl.NFNL_MSG_BATCH_BEGIN and kinds[-1] == nl.NFNL_MSG_BATCH_END
    assert kinds[1:-1] == [(nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_NEWSETELEM] * (len(b) - 1) + \
        [(nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_DELSETELEM]
    assert [s for s, _ in seqs] == list(range(100, 100 + len(b) + 2))
    assert [a for _, a in seqs[1:-1]].count(nl.NLM_F_ACK) == 1 and seqs[-2][1]  # ack for the last only


def test_verdicts():
    assert nl.verdict("drop") == nl.nested(nl.DATA_VERDICT, nl.u32be(nl.VERDICT_CODE, 0))
    goto = nl.verdict("goto reject_chain")
    assert struct.pack("!i", -4) in goto and b"reject_chain\0" in goto
