"""Labs with the Kubernetes API as their source (`podnet lab up --source kubernetes`): the fake API
server, podnet kube-sync filling the store, the agents on that store.

  - examples/lab/demo.yaml: every probe behaves as with the embedded store; the EndpointSlice
    came through the API; every Node got NetworkUnavailable=False from its agent's readiness;
    kube-sync killed with -9 leaves the dataplane as it was, and a NetworkPolicy deleted through
    the API meanwhile stops dropping traffic once kube-sync is back.
  - examples/lab/multinet.yaml: the NetworkAttachmentDefinitions reach the agents through the
    API (the attachment probes pass) and each pod's network-status annotation is patched onto
    its API Pod. Then a Pod deleted through the API while its ADD runs (held in a delegate
    plugin, tests/support/gated_cni.py): the ADD fails naming the pod, and nothing is left:
    no address (podnet's IPAM or host-local's), no host veth, no route, no attachment record.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

from podnet.cni.attachments import attachment_handle, attachment_key  # noqa: E402
from podnet.cni.spec import E_POD_GONE  # noqa: E402
from podnet.dataplane.pods import host_ifname  # noqa: E402
from podnet.ipam.keys import HANDLES  # noqa: E402
from podnet.kube.client import Resource  # noqa: E402
from podnet.lab import kubesource, topology  # noqa: E402
from podnet.lab.cluster import NETWORK_NAME, node_runtime, status, wait_programmed  # noqa: E402
from podnet.lab.connectivity import format_table, probe_all  # noqa: E402
from podnet.lab.runtime import CNIError, RuntimeConf, k8s_args  # noqa: E402
from podnet.model.objects import EndpointSlice, NetworkAttachmentDefinition, Pod  # noqa: E402
from podnet.multinet import ANNOTATION_STATUS  # noqa: E402
from podnet.store.objects import object_key  # noqa: E402
from tests.kernel.labs import running_lab  # noqa: E402
from tests.support import gated_cni  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"
PODS = Resource("", "v1", "pods", "Pod", True)
NODES = Resource("", "v1", "nodes", "Node", False)
NADS = Resource("k8s.cni.cncf.io", "v1", "network-attachment-definitions", "NetworkAttachmentDefinition", True)
SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)


def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())["spec"]


def wait_until(what: str, predicate, timeout: float = 30.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.1)


def test_the_demo_lab_with_the_kubernetes_api_as_source_behaves_as_with_the_store():
    with running_lab(example("demo.yaml"), "kdemo", timeout=90, source="kubernetes") as lab:
        rows = probe_all(lab, timeout=2.0)
        print(format_table(rows, wide=True))
        assert [r for r in rows if not r.ok] == []
        assert {"same-node", "cross-node/vxlan", "cross-node/direct", "external", "nodeport/external"} <= \
            {r.kind for r in rows}
        api = kubesource.client_of(lab.state)
        # The slice was made through the API server, and the store holds it as kube-sync wrote it.
        api_slices = {s["metadata"]["name"]: s for s in api.list(SLICES, "shop")["items"]}
        stored = {s.name: s for s in lab.store().list(EndpointSlice, "shop")}
        assert set(api_slices) == set(stored) and len(stored) == 1
        (name, api_slice), = api_slices.items()
        assert sorted(a for e in api_slice["endpoints"] for a in e["addresses"]) == \
            sorted(a for e in stored[name].endpoints for a in e.addresses) == \
            sorted(p["ips"][0] for p in lab.pods if p["name"].startswith("web-"))
        # Every node's agent is ready: kube-sync told the API server.
        for node in api.list(NODES)["items"]:
            conds = {c["type"]: c for c in node["status"].get("conditions") or ()}
            assert conds["NetworkUnavailable"]["status"] == "False", node["metadata"]["name"]
        info = status(lab.state)
        assert info["source"] == "kubernetes" and info["kubeSync"].startswith("running")

        # kube-sync killed (-9): the dataplane holds; the NetworkPolicy deleted through the API while
        # it is down is gone from the store and the kernel once it is back.
        web2 = lab.pod("shop/web-2")["ips"][0]
        assert not lab.probe("shop/web-1", [f"tcp:{web2}:8080"])[0]["ok"]  # web->web: the policy drops it
        kubesource.restart_kube_sync(lab.state, kill=True, while_down=lambda: api.delete(
            Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True), "web-from-clients",
            "shop"))
        assert lab.probe("shop/client-1", [f"tcp:{web2}:8080"])[0]["ok"]  # meanwhile, as before
        kv = lab.store().kv
        kubesource.wait_reflected(lab.state, api, kv, 60)
        wait_programmed(lab.state, kv.revision(), 60)
        answer = lab.probe("shop/web-1", [f"tcp:{web2}:8080"])[0]
        assert answer["ok"] and answer["name"] == "web-2", answer


def _routes(netns: str) -> set[str]:
    # IPv4 only: the kernel adds IPv6 link-local routes on its own, late, when an interface's
    # address finishes duplicate address detection; podnet programs IPv4.
    out = subprocess.run(["ip", "-n", netns, "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                         check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def _links(netns: str) -> set[str]:
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_the_multinet_lab_from_the_api_and_a_pod_deleted_during_its_add(tmp_path, monkeypatch):
    with running_lab(example("multinet.yaml"), "kmnet", timeout=120, source="kubernetes") as lab:
        rows = probe_all(lab, timeout=3.0)
        print(format_table(rows, wide=True))
        assert [r for r in rows if not r.ok] == []
        assert len([r for r in rows if r.kind.startswith("attachment/")]) == 3 + 3 + 3 * 2 + 2

        # network-status: written by the agent into the store, patched onto the API Pod.
        api = kubesource.client_of(lab.state)
        store = lab.store()
        for ref in ("db-1", "db-2", "db-3"):
            stored = store.get(Pod, ref, "default").metadata.annotations[ANNOTATION_STATUS]
            assert len(json.loads(stored)) >= 2
            wait_until(f"network-status of {ref} in the API", lambda r=ref, s=stored: (
                api.get(PODS, r, "default")["metadata"].get("annotations", {}).get(ANNOTATION_STATUS) == s))

        # A Pod deleted while its ADD runs.
        gate_dir = tmp_path / "bin"
        gate_dir.mkdir()
        gated_cni.install(gate_dir)
        monkeypatch.setenv("PODNET_LAB_CNI_PATH", str(gate_dir))  # the runtime's CNI_PATH: node_runtime
        entered, gate, data_dir = tmp_path / "entered", tmp_path / "gate", tmp_path / "host-local"
        bridge = f"pngt{secrets.token_hex(2)}"
        config = {"cniVersion": "1.0.0", "name": "gated", "type": gated_cni.TYPE, "entered": str(entered),
                  "gate": str(gate), "delegate": {"type": "bridge", "bridge": bridge, "ipam": {
                      "type": "host-local", "ranges": [[{"subnet": "192.168.77.0/24"}]], "dataDir": str(data_dir)}}}
        api.create(NADS, {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                          "metadata": {"name": "gated", "namespace": "default"},
                          "spec": {"config": json.dumps(config)}}, "default")
        made = api.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "late", "namespace": "default", "annotations": {"k8s.v1.cni.cncf.io/networks": "gated"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "late", "image": "late"}]}}, "default")
        uid = made["metadata"]["uid"]
        wait_until("the NAD and the Pod in the store", lambda: store.get(NetworkAttachmentDefinition, "gated",
                                                                         "default") and store.get(Pod, "late",
                                                                                                  "default"))
        node = lab.node("node-1")
        netns = f"{node['netns']}-late"
        container = secrets.token_hex(32)
        routes_before, links_before = _routes(node["netns"]), _links(node["netns"])
        offset = Path(node["log"]).stat().st_size
        topology.create_netns(netns)
        try:
            failure: list[BaseException] = []
            result: list[dict] = []

            def add() -> None:
                try:
                    result.append(node_runtime(lab.state, node).add(RuntimeConf(
                        container_id=container, netns=f"/run/netns/{netns}", ifname="eth0",
                        args=k8s_args("default", "late", container, uid))))
                except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                    failure.append(e)

            t = threading.Thread(target=add)
            t.start()
            try:
                wait_until("the ADD reaching the additional network", entered.exists, 60)
                api.delete(PODS, "late", "default")
                wait_until("the Pod's deletion in the store", lambda: store.get(Pod, "late", "default") is None)
            finally:
                gate.write_text("go")
                t.join(120)
            assert not t.is_alive() and not result, result
            err = failure[0]
            assert isinstance(err, CNIError) and err.code == E_POD_GONE, err
            assert "pod default/late was deleted while its ADD ran" in err.msg
            log = Path(node["log"]).read_bytes()[offset:].decode(errors="replace")
            assert "pod default/late was deleted while its ADD ran" in log
            # Nothing left: address, veth, routes, record.
            handle = attachment_handle(NETWORK_NAME, container, "eth0")
            kv = store.kv
            assert kv.get(attachment_key("node-1", handle)) is None
            assert kv.list(HANDLES + quote(handle, safe=""))[0] == []
            assert host_ifname(container, "eth0") not in _links(node["netns"])
            assert _links(node["netns"]) - links_before <= {bridge}  # the delegate's bridge may stay, as bridge's DEL
            assert {r for r in _routes(node["netns"]) if f"dev {bridge} " not in r} == routes_before
            reserved = [p.name for p in (data_dir / "gated").glob("*") if p.name[0].isdigit()] \
                if (data_dir / "gated").exists() else []
            assert reserved == []  # host-local's address released by the delegate's DEL
            assert store.kv.get(object_key(Pod, "late", "default")) is None
        finally:
            topology.delete_netns(netns)
            subprocess.run(["ip", "-n", node["netns"], "link", "del", bridge], capture_output=True)
