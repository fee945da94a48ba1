"""A lab without pods comes up: its last store write is an agent's readiness record (under
/podnet-alloc/, which no agent follows), and with a long resync nothing else moves the
agents' synced revision, so `lab up` must wait for the last change agents follow."""

import os
from pathlib import Path

import pytest

from podnet.lab.cluster import followed_revision
from tests.kernel.labs import running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]


def test_a_lab_without_pods_comes_up():
    spec = {"underlay": {"cidr": "10.97.30.0/24"}, "resyncSeconds": 600,
            "nodes": [{"name": "node-1"}, {"name": "node-2"}]}
    with running_lab(spec, "nopods", timeout=60) as lab:  # up raises if an agent is not programmed by then
        kv = lab.store().kv
        assert kv.revision() > followed_revision(kv)  # the readiness records came after
        for n in lab.nodes:
            assert int(Path(n["socket"] + ".synced").read_text()) >= followed_revision(kv)
