"""examples/lab/multinet.yaml comes up and every probe behaves as the manifests say: eth0
paths (pods, the external host through NAT; DNS and a Service from a pod with two more
networks) as in any lab, and the additional
networks' paths (the data network's host to and from each pod's macvlan address, no NAT;
pods of one network to each other, also across nodes and over node-1's bridge)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

from podnet.lab.connectivity import format_table, probe_all  # noqa: E402
from podnet.model.objects import Pod, Service  # noqa: E402
from podnet.multinet import ANNOTATION_STATUS  # noqa: E402
from tests.kernel.labs import running_lab  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab" / "multinet.yaml"


def test_the_multinet_example_behaves_as_its_manifests_say():
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    with running_lab(spec, "mnet", timeout=120) as lab:
        rows = probe_all(lab, timeout=3.0)
        print(format_table(rows, wide=True))
        assert [r for r in rows if not r.ok] == []
        kinds = {r.kind for r in rows}
        assert {"attachment/external->pod", "attachment/pod->external", "attachment/pod", "same-node",
                "cross-node/vxlan", "external"} <= kinds
        attach = [r for r in rows if r.kind.startswith("attachment/")]
        # 3 pods on the data network: in and out for each, and every pair over each shared network
        assert len([r for r in attach if r.kind == "attachment/external->pod"]) == 3
        assert len([r for r in attach if r.kind == "attachment/pod->external"]) == 3
        assert len([r for r in attach if r.kind == "attachment/pod"]) == 3 * 2 + 2
        # eth0 unchanged for a pod with two more networks: DNS names the Service, and its
        # ClusterIP load-balances over the db pods' eth0 addresses.
        store = lab.store()
        cluster_ip = store.get(Service, "db", "default").spec.cluster_ip
        named = lab.exec("default/db-1", ["getent", "hosts", "db.default.svc.cluster.local"])
        assert named.returncode == 0 and named.stdout.split()[0] == cluster_ip, named
        answers = lab.probe("default/db-1", [f"tcp:{cluster_ip}:80"] * 12)
        assert all(a["ok"] for a in answers) and {a["name"] for a in answers} <= {"db-1", "db-2", "db-3"}
        assert len({a["name"] for a in answers}) >= 2
        db2 = store.get(Pod, "db-2", "default")
        status = json.loads(db2.metadata.annotations[ANNOTATION_STATUS])
        assert [(s["name"], s["interface"]) for s in status] == [
            ("podnet", "eth0"), ("default/underlay", "net1"), ("default/node-bridge", "br1")]
        assert db2.status.pod_ips and len(db2.status.pod_ips) == 1  # podIPs: eth0's only
        assert db2.status.pod_ip == status[0]["ips"][0]
