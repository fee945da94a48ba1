"""The agent-side CNI handler: results per spec version, idempotent DEL, error codes, cleanup
after failures, IPAM exhaustion, GC and STATUS. Real IPAM on a temp SQLite store; the pod
dataplane is a recording test double (the kernel suite drives the real one)."""

from __future__ import annotations

import json
import os
import threading

import pytest
from cni_doubles import RecordingDataplane

from podnet.cni.attachments import ATTACHMENTS_PREFIX, attachment_handle, attachment_key
from podnet.cni.handler import CNIHandler
from podnet.cni.netns import netns_problem
from podnet.ipam import IPAM
from podnet.model.objects import IPPool, Pod
from podnet.store import open_store
from podnet.store.objects import ObjectStore

NODE = "node-1"
NET = "podnet"
NETNS = "/var/run/netns/test-pod"  # never opened: the tests use a lenient netns check


def pool(name: str, cidr: str, block_size: int) -> IPPool:
    return IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": name},
                                  "spec": {"cidr": cidr, "blockSize": block_size}})


@pytest.fixture
def kv(tmp_path):
    store = open_store("sqlite://" + str(tmp_path / "podnet.db"))
    ObjectStore(store).apply([pool("default-pool", "10.244.0.0/16", 26)])
    yield store
    store.close()


@pytest.fixture
def dataplane() -> RecordingDataplane:
    return RecordingDataplane()


@pytest.fixture
def handler(kv, dataplane):
    h = CNIHandler(kv, NODE, dataplane, verify_netns=lambda path: None)
    yield h
    h.close()


def env(command: str, cid: str = "c0ffee01", ifname: str = "eth0", netns: str | None = NETNS,
        args: str | None = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1", **extra: str) -> dict:
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_PATH": "/opt/cni/bin"}
    if netns is not None:
        e["CNI_NETNS"] = netns
    if args is not None:
        e["CNI_ARGS"] = args
    e.update(extra)
    return e


def conf(version: str = "1.1.0", **extra) -> str:
    return json.dumps({"cniVersion": version, "name": NET, "type": "podnet-cni", **extra})


def records(kv) -> list[str]:
    return [r.key for r in kv.list(ATTACHMENTS_PREFIX)[0]]


def error_of(output: str) -> dict:
    doc = json.loads(output)
    assert set(doc) == {"cniVersion", "code", "msg", "details"}, doc
    assert isinstance(doc["code"], int) and isinstance(doc["msg"], str) and doc["msg"]
    return doc


def add(handler, cid="c0ffee01", version="1.1.0", **kw) -> dict:
    code, out = handler.handle(env("ADD", cid=cid, **kw), conf(version))
    assert code == 0, out
    return json.loads(out)


# ---------------------------------------------------------------- ADD


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_result_has_the_shape_of_the_requested_version(handler, kv, dataplane, version):
    result = add(handler, version=version)
    assert result["cniVersion"] == version
    host, pod = result["interfaces"]
    assert host == {"name": "pnc0ffee01", "mac": "ee:ee:ee:ee:ee:ee"}  # host side: no sandbox
    assert pod["name"] == "eth0" and pod["sandbox"] == NETNS and pod["mac"] == "0a:58:0a:f4:00:05"
    assert ("mtu" in pod) == (version == "1.1.0")  # interfaces[].mtu arrived in 1.1.0
    (ip,) = result["ips"]
    assert ip["address"].startswith("10.244.") and ip["address"].endswith("/32")
    assert ip["gateway"] == "169.254.1.1" and ip["interface"] == 1
    assert ("version" in ip) == (version < "1.0.0")  # 0.3.x/0.4.0 need it, 1.0.0 dropped it
    if "version" in ip:
        assert ip["version"] == "4"
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert result["dns"] == {}
    if version == "1.1.0":
        assert pod["mtu"] == 1450

    address = ip["address"].split("/")[0]
    handle = attachment_handle(NET, "c0ffee01", "eth0")
    assert dataplane.calls == [("add", "c0ffee01", "eth0", NETNS, address)]
    assert IPAM(kv).lookup(handle).address == address
    rec = kv.get(attachment_key(NODE, handle)).value
    assert {k: rec[k] for k in ("containerID", "ifname", "netns", "namespace", "pod", "handle", "network")} == {
        "containerID": "c0ffee01", "ifname": "eth0", "netns": NETNS, "namespace": "default", "pod": "web-1",
        "handle": handle, "network": NET,
    }


def test_add_gives_every_pod_its_own_address(handler):
    addresses = {add(handler, cid=f"pod{i:03d}")["ips"][0]["address"] for i in range(10)}
    assert len(addresses) == 10


def test_add_again_without_del_starts_clean(handler, kv, dataplane):
    """A runtime retrying an ADD whose earlier attempt died halfway: what it left is removed first."""
    add(handler)
    second = add(handler)
    handle = attachment_handle(NET, "c0ffee01", "eth0")
    assert IPAM(kv).lookup(handle).address == second["ips"][0]["address"].split("/")[0]
    assert records(kv) == [attachment_key(NODE, handle)]
    assert [c[0] for c in dataplane.calls] == ["add", "delete", "add"]
    assert sum(b.used for b in IPAM(kv).node_blocks(NODE)) == 1


def test_concurrent_adds_all_succeed_with_distinct_addresses(handler, kv):
    results: dict[int, tuple[int, str]] = {}

    def one(i: int) -> None:
        results[i] = handler.handle(env("ADD", cid=f"burst{i:02d}"), conf())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code == 0 for code, _ in results.values()), results
    assert len({json.loads(out)["ips"][0]["address"] for _, out in results.values()}) == 20
    assert len(records(kv)) == 20


# ---------------------------------------------------------------- failures undo everything


def test_failing_dataplane_add_leaves_nothing_behind(handler, kv, dataplane):
    dataplane.fail_add.add("c0ffee01")
    code, out = handler.handle(env("ADD"), conf())
    assert code == 102
    doc = error_of(out)
    assert "eth0" in doc["msg"] and "device or resource busy" in doc["msg"] and doc["cniVersion"] == "1.1.0"
    assert records(kv) == []
    assert IPAM(kv).lookup(attachment_handle(NET, "c0ffee01", "eth0")) is None
    assert sum(b.used for b in IPAM(kv).node_blocks(NODE)) == 0  # the address is free again
    assert ("delete", "c0ffee01", "eth0", NETNS) in dataplane.calls


def test_exhaustion_is_code_100_naming_pool_and_node(tmp_path, dataplane):
    kv = open_store("sqlite://" + str(tmp_path / "tiny.db"))
    ObjectStore(kv).apply([pool("tiny", "10.9.0.0/30", 30)])
    h = CNIHandler(kv, NODE, dataplane, verify_netns=lambda p: None)
    try:
        for i in range(4):
            assert h.handle(env("ADD", cid=f"pod{i}"), conf())[0] == 0
        code, out = h.handle(env("ADD", cid="pod4"), conf())
        assert code == 100
        msg = error_of(out)["msg"]
        assert "tiny" in msg and NODE in msg and "no address available" in msg
        assert attachment_key(NODE, attachment_handle(NET, "pod4", "eth0")) not in records(kv)
        assert ("add", "pod4", "eth0", NETNS, "10.9.0.0") not in dataplane.calls
        # Freeing one makes room again.
        assert h.handle(env("DEL", cid="pod2"), conf()) == (0, "")
        assert h.handle(env("ADD", cid="pod4"), conf())[0] == 0
    finally:
        h.close()
        kv.close()


def test_no_pool_is_code_101(tmp_path, dataplane):
    kv = open_store("sqlite://" + str(tmp_path / "empty.db"))
    h = CNIHandler(kv, NODE, dataplane, verify_netns=lambda p: None)
    try:
        code, out = h.handle(env("ADD"), conf())
        assert code == 101 and error_of(out)["msg"].startswith("IPAM:")
        assert records(kv) == []
    finally:
        h.close()
        kv.close()


# ---------------------------------------------------------------- DEL


def test_del_is_idempotent_and_frees_everything(handler, kv, dataplane):
    add(handler)
    for _ in range(3):
        assert handler.handle(env("DEL"), conf()) == (0, "")
    assert records(kv) == []
    assert IPAM(kv).lookup(attachment_handle(NET, "c0ffee01", "eth0")) is None
    assert dataplane.live == {}


def test_del_of_an_unknown_container_succeeds(handler, kv):
    assert handler.handle(env("DEL", cid="never-added"), conf()) == (0, "")
    assert handler.handle(env("DEL", cid="never-added", netns=None, args=None), conf("0.3.1")) == (0, "")


def test_del_without_netns_uses_the_recorded_one_when_it_still_exists(handler, dataplane):
    add(handler)
    assert handler.handle(env("DEL", netns=None), conf()) == (0, "")
    assert dataplane.calls[-1] == ("delete", "c0ffee01", "eth0", NETNS)


def test_del_with_a_vanished_netns_removes_the_host_side(kv, dataplane):
    h = CNIHandler(kv, NODE, dataplane, verify_netns=lambda p: None)
    add(h)
    h.verify_netns = lambda p: f"network namespace {p} does not exist"
    assert h.handle(env("DEL"), conf()) == (0, "")
    assert dataplane.calls[-1] == ("delete", "c0ffee01", "eth0", None)
    assert records(kv) == []
    h.close()


def test_del_whose_dataplane_fails_keeps_the_address_for_a_retry(handler, kv, dataplane):
    add(handler)
    dataplane.fail_delete.add("c0ffee01")
    code, out = handler.handle(env("DEL"), conf())
    assert code == 102 and "operation not permitted" in error_of(out)["msg"]
    handle = attachment_handle(NET, "c0ffee01", "eth0")
    assert IPAM(kv).lookup(handle) is not None and records(kv) == [attachment_key(NODE, handle)]
    dataplane.fail_delete.clear()
    assert handler.handle(env("DEL"), conf()) == (0, "")
    assert IPAM(kv).lookup(handle) is None and records(kv) == []


# ---------------------------------------------------------------- bad input


BAD_INPUT = [
    # (description, env changes, stdin, code, words the message must hold)
    ("no CNI_COMMAND", {"CNI_COMMAND": ""}, conf(), 4, ["CNI_COMMAND"]),
    ("unknown command", {"CNI_COMMAND": "ATTACH"}, conf(), 4, ["ATTACH"]),
    ("no CNI_NETNS on ADD", {"CNI_NETNS": ""}, conf(), 4, ["CNI_NETNS"]),
    ("no CNI_PATH", {"CNI_PATH": ""}, conf(), 4, ["CNI_PATH"]),
    ("no CNI_IFNAME nor CNI_CONTAINERID", {"CNI_IFNAME": "", "CNI_CONTAINERID": ""}, conf(), 4,
     ["CNI_CONTAINERID", "CNI_IFNAME"]),
    ("stdin not JSON", {}, "{name: podnet}", 6, ["decoding"]),
    ("stdin a JSON list", {}, "[1, 2]", 6, ["object"]),
    ("stdin nested too deeply", {}, "[" * 100_000, 6, ["deep"]),
    ("no cniVersion", {}, json.dumps({"name": NET, "type": "podnet-cni"}), 1, ["cniVersion"]),
    ("cniVersion 0.2.0", {}, conf("0.2.0"), 1, ["0.2.0"]),
    ("cniVersion a number", {}, json.dumps({"cniVersion": 1, "name": NET, "type": "x"}), 1, ["cniVersion"]),
    ("no name", {}, json.dumps({"cniVersion": "1.0.0", "type": "podnet-cni"}), 7, ["name"]),
    ("bad name", {}, json.dumps({"cniVersion": "1.0.0", "name": "pod/net", "type": "x"}), 7, ["name", "pod/net"]),
    ("no type", {}, json.dumps({"cniVersion": "1.0.0", "name": NET}), 7, ["type"]),
    ("container id starting with '-'", {"CNI_CONTAINERID": "-abc"}, conf(), 4, ["CNI_CONTAINERID"]),
    ("container id with '/'", {"CNI_CONTAINERID": "a/../b"}, conf(), 4, ["CNI_CONTAINERID"]),
    ("container id too long", {"CNI_CONTAINERID": "a" * 201}, conf(), 4, ["CNI_CONTAINERID"]),
    ("ifname of 16 bytes", {"CNI_IFNAME": "e" * 16}, conf(), 4, ["CNI_IFNAME", "15"]),
    ("ifname with '/'", {"CNI_IFNAME": "eth/0"}, conf(), 4, ["CNI_IFNAME"]),
    ("ifname with ':'", {"CNI_IFNAME": "eth0:1"}, conf(), 4, ["CNI_IFNAME"]),
    ("ifname with a space", {"CNI_IFNAME": "eth 0"}, conf(), 4, ["CNI_IFNAME"]),
    ("ifname '..'", {"CNI_IFNAME": ".."}, conf(), 4, ["CNI_IFNAME"]),
    ("CNI_ARGS without '='", {"CNI_ARGS": "K8S_POD_NAME"}, conf(), 4, ["CNI_ARGS"]),
    ("CNI_ARGS with an unknown key", {"CNI_ARGS": "FOO=bar"}, conf(), 4, ["CNI_ARGS", "FOO", "IgnoreUnknown"]),
    ("CNI_ARGS IgnoreUnknown not boolean", {"CNI_ARGS": "IgnoreUnknown=maybe"}, conf(), 4, ["IgnoreUnknown"]),
    ("CNI_ARGS pod name with '/'", {"CNI_ARGS": "K8S_POD_NAME=a/b"}, conf(), 4, ["K8S_POD_NAME"]),
    ("CNI_ARGS bad namespace", {"CNI_ARGS": "K8S_POD_NAMESPACE=Kube_System"}, conf(), 4, ["K8S_POD_NAMESPACE"]),
    ("CHECK at 0.3.1", {"CNI_COMMAND": "CHECK"}, conf("0.3.1"), 1, ["CHECK"]),
    ("CHECK without prevResult", {"CNI_COMMAND": "CHECK"}, conf(), 7, ["prevResult"]),
    ("GC at 1.0.0", {"CNI_COMMAND": "GC"}, conf("1.0.0"), 1, ["GC"]),
    ("GC without attachments", {"CNI_COMMAND": "GC"}, conf(), 7, ["cni.dev/valid-attachments"]),
    ("GC with malformed attachments", {"CNI_COMMAND": "GC"},
     conf(**{"cni.dev/valid-attachments": [{"containerID": 5}]}), 7, ["containerID"]),
    ("STATUS at 1.0.0", {"CNI_COMMAND": "STATUS"}, conf("1.0.0"), 1, ["STATUS"]),
]


@pytest.mark.parametrize("what,changes,stdin,code,words", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_refused_with_the_spec_code(handler, kv, dataplane, what, changes, stdin, code, words):
    e = env("ADD")
    e.update(changes)
    e = {k: v for k, v in e.items() if v != ""}
    got, out = handler.handle(e, stdin)
    doc = error_of(out)
    assert (got, doc["code"]) == (code, code), doc
    text = doc["msg"] + " " + doc["details"]
    for w in words:
        assert w in text, (w, doc)
    assert records(kv) == [] and dataplane.calls == []


def test_unknown_cni_args_pass_with_ignore_unknown(handler):
    add(handler, args="IgnoreUnknown=true;K8S_POD_NAME=web-1;K8S_POD_NAMESPACE=shop;FOO=bar;")


def test_del_needs_no_netns_but_add_does(handler):
    assert handler.handle(env("ADD", netns=None), conf())[0] == 4
    assert handler.handle(env("DEL", netns=None), conf()) == (0, "")


def test_errors_carry_the_requested_version(handler):
    code, out = handler.handle(env("ADD", cid="-bad"), conf("0.4.0"))
    assert code == 4 and error_of(out)["cniVersion"] == "0.4.0"


def test_version_is_answered(handler):
    code, out = handler.handle({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": "0.4.0"}))
    assert code == 0
    assert json.loads(out) == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_a_netns_that_is_not_a_pods_is_refused_on_add(kv, dataplane, tmp_path):
    h = CNIHandler(kv, NODE, dataplane)  # the real check
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    try:
        for path, words in [
            (str(tmp_path / "gone"), "does not exist"),
            (str(plain), "not a network namespace"),
            ("/proc/self/ns/uts", "not a network namespace"),
            ("/proc/self/ns/net", "node's own"),
            ("relative/path", "absolute"),
        ]:
            code, out = h.handle(env("ADD", netns=path), conf())
            assert code == 8 and words in error_of(out)["msg"], out
        assert records(kv) == [] and dataplane.calls == []
    finally:
        h.close()


def test_netns_problem_names_the_fault(tmp_path):
    assert "does not exist" in netns_problem(str(tmp_path / "nope"))
    assert "node's own" in netns_problem("/proc/self/ns/net")
    assert "node's own" in netns_problem(f"/proc/{os.getpid()}/ns/net")


def test_del_never_enters_the_nodes_own_namespace(kv, dataplane):
    """DEL with the node's namespace as CNI_NETNS must not look for CNI_IFNAME (say eth0) there."""
    h = CNIHandler(kv, NODE, dataplane)
    try:
        assert h.handle(env("DEL", netns="/proc/self/ns/net"), conf()) == (0, "")
        assert dataplane.calls == [("delete", "c0ffee01", "eth0", None)]
    finally:
        h.close()


# ---------------------------------------------------------------- CHECK


def test_check_passes_right_after_add(handler):
    result = add(handler)
    assert handler.handle(env("CHECK"), conf(prevResult=result)) == (0, "")


def test_check_accepts_a_0_4_0_prev_result(handler):
    result = add(handler, version="0.4.0")
    assert handler.handle(env("CHECK"), conf("0.4.0", prevResult=result)) == (0, "")


def test_check_lists_what_is_wrong(handler, dataplane):
    result = add(handler)
    dataplane.live.clear()
    code, out = handler.handle(env("CHECK"), conf(prevResult=result))
    assert code == 103 and "host interface for c0ffee01 is missing" in error_of(out)["msg"]


def test_check_with_another_address_names_both(handler):
    result = add(handler)
    real = result["ips"][0]["address"].split("/")[0]
    result["ips"][0]["address"] = "10.99.0.1/32"
    code, out = handler.handle(env("CHECK"), conf(prevResult=result))
    msg = error_of(out)["msg"]
    assert code == 103 and real in msg and "10.99.0.1" in msg


def test_check_after_del_reports_the_attachment_gone(handler):
    result = add(handler)
    handler.handle(env("DEL"), conf())
    code, out = handler.handle(env("CHECK"), conf(prevResult=result))
    msg = error_of(out)["msg"]
    assert code == 103 and "no attachment record" in msg and "IPAM holds no address" in msg


def test_check_with_a_malformed_prev_result_is_code_7(handler):
    add(handler)
    code, out = handler.handle(env("CHECK"), conf(prevResult={"ips": [{"address": "not-an-ip"}]}))
    assert code == 7 and "not-an-ip" in error_of(out)["msg"]


# ---------------------------------------------------------------- STATUS


def test_status_ready(handler):
    assert handler.handle(env("STATUS"), conf()) == (0, "")


@pytest.mark.parametrize("verdict", [(50, "routes not programmed yet"), (51, "lost the store: pods may be cut off")])
def test_status_not_ready_says_why(kv, dataplane, verdict):
    h = CNIHandler(kv, NODE, dataplane, ready=lambda: verdict)
    code, out = h.handle({"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, conf())
    assert (code, error_of(out)["msg"]) == verdict
    h.close()


def test_status_with_a_failing_readiness_check_is_50(kv, dataplane):
    def broken():
        raise RuntimeError("agent still starting")

    h = CNIHandler(kv, NODE, dataplane, ready=broken)
    code, out = h.handle({"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}, conf())
    assert code == 50 and "agent still starting" in error_of(out)["msg"]
    h.close()


# ---------------------------------------------------------------- GC


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_removes_every_attachment_not_listed(handler, kv, dataplane, key):
    for cid in ("keep01", "drop01", "drop02"):
        add(handler, cid=cid)
    valid = [{"containerID": "keep01", "ifname": "eth0"}]
    assert handler.handle({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, conf(**{key: valid})) == (0, "")
    ipam = IPAM(kv)
    assert records(kv) == [attachment_key(NODE, attachment_handle(NET, "keep01", "eth0"))]
    assert ipam.lookup(attachment_handle(NET, "keep01", "eth0")) is not None
    for cid in ("drop01", "drop02"):
        assert ipam.lookup(attachment_handle(NET, cid, "eth0")) is None
    assert list(dataplane.live) == [("keep01", "eth0")]


def test_gc_removes_strays_without_records(handler, kv, dataplane):
    add(handler, cid="keep01")
    dataplane.live[("orphan-if", "eth0")] = ("/gone", "10.244.9.9")  # an interface nobody recorded
    IPAM(kv).allocate(attachment_handle(NET, "orphan-ip", "eth0"), NODE)  # an address nobody recorded
    IPAM(kv).allocate(attachment_handle(NET, "elsewhere", "eth0"), "node-2")  # another node's: kept
    IPAM(kv).allocate(attachment_handle("othernet", "x1", "eth0"), NODE)  # another network's: kept
    valid = [{"containerID": "keep01", "ifname": "eth0"}]
    code, out = handler.handle({"CNI_COMMAND": "GC", "CNI_PATH": "/bin"}, conf(**{"cni.dev/valid-attachments": valid}))
    assert (code, out) == (0, "")
    ipam = IPAM(kv)
    assert list(dataplane.live) == [("keep01", "eth0")]
    assert ipam.lookup(attachment_handle(NET, "orphan-ip", "eth0")) is None
    assert ipam.lookup(attachment_handle(NET, "elsewhere", "eth0")) is not None
    assert ipam.lookup(attachment_handle("othernet", "x1", "eth0")) is not None


def test_gc_keeps_other_networks_attachments(handler, kv, dataplane):
    add(handler, cid="mine")
    code, _ = handler.handle(env("ADD", cid="theirs"), json.dumps({"cniVersion": "1.1.0", "name": "other",
                                                                   "type": "podnet-cni"}))
    assert code == 0
    gc = conf(**{"cni.dev/valid-attachments": []})
    assert handler.handle({"CNI_COMMAND": "GC", "CNI_PATH": "/bin"}, gc) == (0, "")
    assert records(kv) == [attachment_key(NODE, attachment_handle("other", "theirs", "eth0"))]
    assert list(dataplane.live) == [("theirs", "eth0")]


def test_gc_reports_what_it_could_not_remove(handler, kv, dataplane):
    add(handler, cid="stuck")
    add(handler, cid="fine")
    dataplane.fail_delete.add("stuck")
    gc = conf(**{"cni.dev/valid-attachments": []})
    code, out = handler.handle({"CNI_COMMAND": "GC", "CNI_PATH": "/bin"}, gc)
    assert code == 102 and "stuck" in error_of(out)["msg"]
    assert records(kv) == [attachment_key(NODE, attachment_handle(NET, "stuck", "eth0"))]  # fine is gone


# ---------------------------------------------------------------- a Pod the store does not know yet


def annotated_pod(pools: str) -> Pod:
    return Pod.model_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "web-1", "namespace": "default", "annotations": {"podnet.io/ippools": pools}}, "spec": {}})


def test_add_waits_for_a_pod_the_store_does_not_know_yet(handler, kv, dataplane):
    """With the Kubernetes API as the source the kubelet's ADD may come before kube-sync has
    written the Pod: the ADD waits for it, then allocates as the Pod asks (its pool annotation
    picks other-pool, which an ADD that did not wait would never use: default-pool sorts first)."""
    ObjectStore(kv).apply([pool("other-pool", "10.250.0.0/16", 26)])
    handler.pod_wait = 30.0
    answers: list[tuple[int, str]] = []
    t = threading.Thread(target=lambda: answers.append(handler.handle(env("ADD"), conf())))
    t.start()
    try:
        t.join(1.0)
        assert t.is_alive() and dataplane.calls == [] and records(kv) == []  # waiting, nothing made
        ObjectStore(kv).apply([annotated_pod('["other-pool"]')])
    finally:
        t.join(30)
    assert not t.is_alive()
    code, out = answers[0]
    assert code == 0, out
    assert json.loads(out)["ips"][0]["address"].startswith("10.250.")


def test_add_for_a_pod_that_never_comes_is_try_again_later_and_makes_nothing(handler, kv, dataplane):
    handler.pod_wait = 0.2
    code, out = handler.handle(env("ADD"), conf())
    msg = error_of(out)["msg"]
    assert code == 11 and "pod default/web-1 is not in podnet's store" in msg, out
    assert dataplane.calls == [] and records(kv) == []
    assert IPAM(kv).lookup(attachment_handle(NET, "c0ffee01", "eth0")) is None
