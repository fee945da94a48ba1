"""Additional networks through the agent's CNI handler: plugins run as a runtime runs them
(CNI_* environment, prevResult, runtimeConfig capabilities), results merged, all or nothing,
DEL in reverse and idempotent without the NAD, podnet-ipam, GC and CHECK, the network-status
annotation. Real IPAM on a temp SQLite store; the delegates are small recording plugins and the
pod dataplane a test double (tests/kernel/test_multinet.py runs the reference plugins)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from cni_doubles import RecordingDataplane

from podnet.cni.attachments import ATTACHMENTS_PREFIX, attachment_key
from podnet.cni.handler import CNIHandler
from podnet.ipam import keys as ipam_keys
from podnet.model.objects import IPPool, NetworkAttachmentDefinition, Pod
from podnet.multinet import ANNOTATION_NETWORKS, ANNOTATION_STATUS
from podnet.multinet.attachments import Multinet
from podnet.store import open_store
from podnet.store.objects import ObjectStore

NODE = "node-1"
NETNS = "/var/run/netns/test-pod"
CID = "c0ffee01"

FAKE = r'''#!PYTHON
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
entry = {"cmd": cmd, "ifname": os.environ.get("CNI_IFNAME"), "netns": os.environ.get("CNI_NETNS"),
         "args": os.environ.get("CNI_ARGS"), "path": os.environ.get("CNI_PATH"), "conf": conf}
with open(conf["log"], "a") as f:
    f.write(json.dumps(entry) + "\n")
if conf.get("fail") == cmd:
    print(json.dumps({"cniVersion": conf["cniVersion"], "code": 117, "msg": "master link data9 not found",
                      "details": "fake"}))
    sys.exit(1)
if cmd == "ADD" and conf.get("chained"):
    print(json.dumps(conf["prevResult"]))
elif cmd == "ADD":
    ipam = conf.get("ipam") or {}
    addrs = [a["address"] for a in ipam.get("addresses", [])] or [conf.get("address", "192.168.7.2/24")]
    out = {"cniVersion": conf["cniVersion"],
           "interfaces": [{"name": os.environ["CNI_IFNAME"], "mac": "02:00:00:00:00:0%d" % len(addrs),
                           "sandbox": os.environ["CNI_NETNS"]}],
           "ips": [{"address": a, "interface": 0} for a in addrs], "routes": [{"dst": "0.0.0.0/0", "gw": "192.168.7.1"}],
           "dns": {}}
    if conf["cniVersion"] in ("0.3.1", "0.4.0"):
        for ip in out["ips"]:
            ip["version"] = "4"
    print(json.dumps(out))
'''


def pool(name: str, cidr: str, block: int, uses: list[str] | None = None) -> IPPool:
    spec = {"cidr": cidr, "blockSize": block}
    if uses:
        spec["allowedUses"] = uses
    return IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": name},
                                  "spec": spec})


def nad(name: str, config: dict, namespace: str = "default") -> NetworkAttachmentDefinition:
    return NetworkAttachmentDefinition.model_validate({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace}, "spec": {"config": json.dumps(config)}})


def pod(name: str, networks: str | None, namespace: str = "default", uid: str = "uid-1") -> Pod:
    ann = {ANNOTATION_NETWORKS: networks} if networks is not None else {}
    return Pod.model_validate({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": ann},
                               "spec": {"nodeName": NODE, "containers": [{"name": "c"}]}})


@pytest.fixture
def lab(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "fakenet"
    exe.write_text(FAKE.replace("PYTHON", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    store = open_store("sqlite://" + str(tmp_path / "podnet.db"))
    objects = ObjectStore(store)
    base = {"type": "fakenet", "log": str(log)}
    objects.apply([
        pool("pods", "10.244.0.0/16", 26), pool("global", "10.99.0.64/26", 29, ["Attachment"]),
        nad("alpha", {"cniVersion": "1.0.0", **base, "address": "192.168.7.2/24",
                      "capabilities": {"mac": True, "ips": True}}),
        nad("beta", {"cniVersion": "0.4.0", "name": "beta-net",
                     "plugins": [{**base, "address": "192.168.8.2/24"}, {**base, "chained": True}]}),
        nad("broken", {"cniVersion": "1.0.0", **base, "fail": "ADD"}),
        nad("under", {"cniVersion": "1.0.0", **base, "ipam": {"type": "podnet-ipam", "pools": ["global"],
                                                               "subnet": "10.99.0.0/24", "gateway": "10.99.0.1"}}),
        nad("other", {"cniVersion": "1.0.0", **base}, namespace="team-b"),
    ])
    dp = RecordingDataplane()
    gone: set[str] = set()
    h = CNIHandler(store, NODE, dp, verify_netns=lambda path: "gone" if path in gone else None)
    present: set[str] = set()  # interfaces the pod "still has" when a DEL fails
    h.multinet = Multinet(NODE, present=lambda ns, names: present & set(names),
                          default_route=lambda ns, name, gws, keep, dev: routes.append((name, gws, tuple(keep), dev)))
    routes: list = []

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    ctx = {"kv": store, "objects": objects, "handler": h, "dp": dp, "calls": calls, "bindir": str(bindir),
           "routes": routes, "log": log, "gone": gone,
           "present": present}
    yield ctx
    h.close()
    store.close()


def env(ctx, command: str, name: str = "web-1", namespace: str = "default", cid: str = CID,
        netns: str | None = NETNS) -> dict:
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
         "CNI_PATH": f"/nonexistent:{ctx['bindir']}",
         "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-1"}
    if netns is not None:
        e["CNI_NETNS"] = netns
    return e


def conf(**extra) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "podnet", "type": "podnet-cni", **extra})


def run(ctx, command: str, **kw) -> tuple[int, dict | str]:
    stdin = kw.pop("stdin", conf())
    code, out = ctx["handler"].handle(env(ctx, command, **kw), stdin)
    return code, (json.loads(out) if out else "")


def handles(kv) -> list[str]:
    return [ipam_keys.handle_of_key(r.key) for r in kv.list(ipam_keys.HANDLES)[0]]


def records(kv) -> list:
    return kv.list(ATTACHMENTS_PREFIX)[0]


def test_add_runs_every_network_after_eth0_and_merges_the_results(lab):
    lab["objects"].apply([pod("web-1", json.dumps([
        {"name": "alpha", "mac": "02:aa:00:00:00:01", "ips": ["192.168.7.9/24"], "cni-args": {"k": "v"}},
        {"name": "beta", "interface": "data1"}]))])
    code, result = run(lab, "ADD")
    assert code == 0, result
    assert [i["name"] for i in result["interfaces"]] == [result["interfaces"][0]["name"], "eth0", "net1", "data1"]
    ips = {ip["address"]: ip["interface"] for ip in result["ips"]}
    assert ips["192.168.7.2/24"] == 2 and ips["192.168.7.2/24"] != ips[next(iter(ips))]
    assert result["ips"][0]["interface"] == 1 and "version" not in result["ips"][-1]
    assert sum(1 for r in result["routes"] if r["dst"] == "0.0.0.0/0") == 1  # eth0's default only
    calls = lab["calls"]()
    assert [(c["cmd"], c["ifname"]) for c in calls] == [("ADD", "net1"), ("ADD", "data1"), ("ADD", "data1")]
    first, second, third = (c["conf"] for c in calls)
    assert first["name"] == "alpha" and first["cniVersion"] == "1.0.0"
    assert first["runtimeConfig"] == {"mac": "02:aa:00:00:00:01", "ips": ["192.168.7.9/24"]}
    assert first["args"] == {"cni": {"k": "v"}}
    assert calls[0]["netns"] == NETNS and calls[0]["path"].endswith(lab["bindir"])
    assert "K8S_POD_NAME=web-1" in calls[0]["args"] and calls[0]["args"].startswith("IgnoreUnknown=1")
    assert second["name"] == "beta-net" and "prevResult" not in second
    assert third["prevResult"]["interfaces"][0]["name"] == "data1"  # chained within the list
    status = json.loads(lab["objects"].get(Pod, "web-1", "default").metadata.annotations[ANNOTATION_STATUS])
    assert [(s["name"], s["interface"], s.get("default", False)) for s in status] == [
        ("podnet", "eth0", True), ("default/alpha", "net1", False), ("default/beta", "data1", False)]
    assert status[1]["ips"] == ["192.168.7.2"] and status[1]["mac"] == "02:00:00:00:00:01"
    rec = lab["kv"].get(attachment_key(NODE, f"podnet.{CID}.eth0")).value
    assert [n["ifname"] for n in rec["networks"]] == ["net1", "data1"] and all("result" in n for n in rec["networks"])


def test_a_pod_without_the_annotation_or_outside_the_store_gets_eth0_alone(lab):
    lab["objects"].apply([pod("plain", None)])
    code, result = run(lab, "ADD", name="plain")
    assert code == 0 and [i["name"] for i in result["interfaces"]][1:] == ["eth0"]
    code, result = run(lab, "ADD", name="not-in-store", cid="c0ffee02")
    assert code == 0 and lab["calls"]() == []
    assert ANNOTATION_STATUS not in lab["objects"].get(Pod, "plain", "default").metadata.annotations


@pytest.mark.parametrize("networks, namespace, words", [
    ("missing", "default", "pod default/web-1: network default/missing: NetworkAttachmentDefinition "
                           "default/missing does not exist"),
    ('[{"name": "alpha"', "default", "pod default/web-1: annotation k8s.v1.cni.cncf.io/networks: not valid JSON"),
    ("alpha@net2, beta", "default", "interface net2 is already default/alpha's"),
    ("team-b/other", "default", "network team-b/other: a pod may use only the networks of its own namespace"),
])
def test_bad_annotations_fail_the_add_before_anything_is_made(lab, networks, namespace, words):
    lab["objects"].apply([pod("web-1", networks, namespace)])
    code, err = run(lab, "ADD", namespace=namespace)
    assert code == 7 and words in err["msg"], err
    assert lab["dp"].calls == [] and records(lab["kv"]) == [] and handles(lab["kv"]) == []
    assert lab["calls"]() == []


def test_global_namespaces_are_configurable(lab):
    lab["objects"].apply([pod("web-1", "team-b/other")])
    code, out = run(lab, "ADD", stdin=conf(multinet={"globalNamespaces": "team-b, default"}))
    assert code == 0, out
    code, err = run(lab, "ADD", cid="c0ffee02", stdin=conf(multinet={"globalNamespaces": ["x"], "nope": 1}))
    assert code == 7 and "multinet.nope" in err["msg"]


def test_a_failing_delegate_rolls_back_every_network_and_eth0(lab):
    lab["objects"].apply([pod("web-1", "alpha, under, broken")])
    code, err = run(lab, "ADD")
    assert code == 104, err
    assert err["msg"].startswith("pod default/web-1: network default/broken (interface net3): CNI ADD failed in "
                                 "plugin fakenet: master link data9 not found (code 117)"), err
    assert [(c["cmd"], c["ifname"]) for c in lab["calls"]()] == [
        ("ADD", "net1"), ("ADD", "net2"), ("ADD", "net3"), ("DEL", "net3"), ("DEL", "net2"), ("DEL", "net1")]
    assert ("delete", CID, "eth0", NETNS) in lab["dp"].calls and lab["dp"].live == {}
    assert records(lab["kv"]) == [] and handles(lab["kv"]) == []  # eth0's and podnet-ipam's address released


def test_podnet_ipam_gives_cluster_wide_unique_addresses_and_releases_them(lab):
    lab["objects"].apply([pod("web-1", "under"), pod("web-2", "under")])
    assert run(lab, "ADD")[0] == 0
    h2 = CNIHandler(lab["kv"], "node-2", RecordingDataplane(), verify_netns=lambda p: None)
    h2.multinet = Multinet("node-2", present=lambda ns, names: set())
    code, out = h2.handle(env(lab, "ADD", name="web-2", cid="c0ffee02"), conf())
    h2.close()
    assert code == 0, out
    adds = [c for c in lab["calls"]() if c["cmd"] == "ADD"]
    got = [c["conf"]["ipam"] for c in adds]
    assert all(g["type"] == "static" and g["addresses"][0]["gateway"] == "10.99.0.1" for g in got)
    addresses = [g["addresses"][0]["address"] for g in got]
    assert len(set(addresses)) == 2 and all(a.startswith("10.99.0.") and a.endswith("/24") for a in addresses)
    assert sorted(h for h in handles(lab["kv"]) if h.endswith(".net1")) == [
        f"podnet.{CID}.net1", "podnet.c0ffee02.net1"]
    assert run(lab, "DEL")[0] == 0
    assert f"podnet.{CID}.net1" not in handles(lab["kv"])


def test_requested_ips_pick_the_podnet_ipam_address(lab):
    lab["objects"].apply([nad("under-ips", {"cniVersion": "1.0.0", "type": "fakenet", "log": str(lab["log"]),
                                            "capabilities": {"ips": True},
                                            "ipam": {"type": "podnet-ipam", "pools": ["global"],
                                                     "subnet": "10.99.0.0/24"}}),
                          pod("web-1", '[{"name": "under-ips", "ips": ["10.99.0.100/24"]}]')])
    code, result = run(lab, "ADD")
    assert code == 0, result
    conf_seen = lab["calls"]()[0]["conf"]
    assert conf_seen["ipam"]["addresses"] == [{"address": "10.99.0.100/24"}] and "runtimeConfig" not in conf_seen
    lab["objects"].apply([pod("web-2", '[{"name": "under-ips", "ips": ["10.99.0.100"]}]')])
    code, err = run(lab, "ADD", name="web-2", cid="c0ffee02")
    assert code == 101 and "10.99.0.100" in err["msg"] and "in use" in err["msg"], err


def test_del_runs_in_reverse_is_idempotent_and_needs_no_nad(lab):
    lab["objects"].apply([pod("web-1", "alpha, beta")])
    assert run(lab, "ADD")[0] == 0
    lab["objects"].delete(NetworkAttachmentDefinition, "beta", "default")
    lab["objects"].delete(Pod, "web-1", "default")
    before = len(lab["calls"]())
    assert run(lab, "DEL") == (0, "")
    dels = lab["calls"]()[before:]
    assert [(c["cmd"], c["ifname"]) for c in dels] == [("DEL", "net2"), ("DEL", "net2"), ("DEL", "net1")]
    assert dels[0]["conf"]["prevResult"]["interfaces"][0]["name"] == "net2"  # the cached result
    assert records(lab["kv"]) == []
    assert run(lab, "DEL") == (0, "")
    assert len(lab["calls"]()) == before + 3  # nothing recorded: nothing more to run


def test_del_with_a_failing_delegate_removes_the_rest_and_retries_it(lab):
    lab["objects"].apply([nad("flaky", {"cniVersion": "1.0.0", "type": "fakenet", "log": str(lab["log"]),
                                        "fail": "DEL"}), pod("web-1", "flaky, under")])
    assert run(lab, "ADD")[0] == 0
    lab["present"].add("net1")  # the plugin fails its DEL and its interface stays in the pod
    code, err = run(lab, "DEL")
    assert code == 104 and "network default/flaky (interface net1)" in err["msg"], err
    assert lab["dp"].live == {} and f"podnet.{CID}.net2" not in handles(lab["kv"])
    rec = lab["kv"].get(attachment_key(NODE, f"podnet.{CID}.eth0")).value
    assert [n["network"] for n in rec["networks"]] == ["default/flaky"]
    assert run(lab, "DEL")[0] == 104  # still there: the runtime's next DEL retries it
    # The namespace is gone by the next DEL: what is left is forgotten, the DEL succeeds.
    lab["gone"].add(NETNS)
    assert run(lab, "DEL") == (0, "") and records(lab["kv"]) == []


def test_gc_removes_the_networks_of_vanished_pods_and_keeps_the_live_ones(lab):
    lab["objects"].apply([pod("web-1", "under"), pod("web-2", "under")])
    assert run(lab, "ADD")[0] == 0
    assert run(lab, "ADD", name="web-2", cid="c0ffee02")[0] == 0
    gc = {"cniVersion": "1.1.0", "name": "podnet", "type": "podnet-cni",
          "cni.dev/valid-attachments": [{"containerID": CID, "ifname": "eth0"}]}
    code, out = lab["handler"].handle({"CNI_COMMAND": "GC", "CNI_PATH": lab["bindir"]}, json.dumps(gc))
    assert code == 0, out
    left = handles(lab["kv"])
    assert f"podnet.{CID}.net1" in left and f"podnet.{CID}.eth0" in left
    assert not any("c0ffee02" in h for h in left)
    assert ("DEL", "net1") in [(c["cmd"], c["ifname"]) for c in lab["calls"]() if c["conf"].get("ipam")]


def test_check_runs_the_delegates_check_against_the_cached_result(lab):
    lab["objects"].apply([pod("web-1", "beta")])
    code, result = run(lab, "ADD")
    assert code == 0
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "podnet", "type": "podnet-cni", "prevResult": result})
    code, out = run(lab, "CHECK", stdin=stdin)
    assert code == 0, out
    checks = [c for c in lab["calls"]() if c["cmd"] == "CHECK"]
    assert len(checks) == 2 and checks[0]["conf"]["prevResult"]["interfaces"][0]["name"] == "net1"


def test_an_add_over_an_unfinished_one_removes_its_networks_first(lab):
    lab["objects"].apply([pod("web-1", "alpha")])
    key = attachment_key(NODE, f"podnet.{CID}.eth0")
    assert run(lab, "ADD")[0] == 0
    rec = lab["kv"].get(key).value
    for n in rec["networks"]:
        n.pop("result")  # as an agent killed before the networks' results were saved leaves it
    lab["kv"].put(key, rec)
    before = len(lab["calls"]())
    assert run(lab, "ADD")[0] == 0
    again = [(c["cmd"], c["ifname"]) for c in lab["calls"]()[before:]]
    assert again == [("DEL", "net1"), ("ADD", "net1")]


def test_default_route_moves_the_pods_default_route(lab):
    lab["objects"].apply([pod("web-1", '[{"name": "alpha", "default-route": ["192.168.7.1"]}]')])
    code, result = run(lab, "ADD")
    assert code == 0, result
    assert lab["routes"] == [("net1", ("192.168.7.1",), ("10.244.0.0/16", "10.96.0.0/12", "169.254.20.10/32"),
                              "eth0")]  # the cluster's ranges stay on eth0
    defaults = [r for r in result["routes"] if r["dst"] == "0.0.0.0/0"]
    assert defaults == [{"dst": "0.0.0.0/0", "gw": "192.168.7.1"}]


def test_a_pod_under_another_uid_is_a_store_that_lags(lab):
    lab["objects"].apply([pod("web-1", "alpha", uid="uid-old")])
    code, err = run(lab, "ADD")
    assert code == 11 and "has not caught up" in err["msg"]


def test_status_is_written_for_a_json_annotation_with_an_old_version_delegate(lab):
    lab["objects"].apply([nad("old", {"cniVersion": "0.3.1", "type": "fakenet", "log": str(lab["log"])}),
                          pod("web-1", "old")])
    code, result = run(lab, "ADD", stdin=json.dumps({"cniVersion": "0.4.0", "name": "podnet", "type": "podnet-cni"}))
    assert code == 0, result
    assert all(ip["version"] == "4" for ip in result["ips"])
    assert os.path.exists(lab["log"])


def test_a_delegate_whose_del_fails_but_left_no_interface_is_forgotten(lab):
    lab["objects"].apply([nad("flaky", {"cniVersion": "1.0.0", "type": "fakenet", "log": str(lab["log"]),
                                        "fail": "DEL"}), pod("web-1", "flaky, under")])
    assert run(lab, "ADD")[0] == 0
    assert run(lab, "DEL") == (0, "")  # net1 is not in the pod: nothing is left to retry
    assert records(lab["kv"]) == [] and handles(lab["kv"]) == []
