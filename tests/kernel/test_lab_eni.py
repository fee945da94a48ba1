"""ENI pools in a lab: pods with VPC addresses from the cloud (moto's EC2 server behind
tests/support/fake_ec2.py, the lab's cloud fabric in a VPC namespace), real packets.

Two nodes in shared mode (secondary addresses, an ip rule per pod into its ENI's table),
one in exclusive mode (the pod's interface is its ENI): pods reach pods on other nodes
and the VPC host by their VPC addresses, no encapsulation and no SNAT; the agent killed
with -9 and restarted keeps every pod working and hands out no address twice; DEL gives
the address back to the pool."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import uuid

import pytest
import yaml

from podnet.eni import records as rec
from podnet.lab.cluster import AGENT_METRICS_PORT, node_dns_key, node_runtime, restart_agent
from podnet.lab.connectivity import probe_all
from podnet.lab.runtime import RuntimeConf, k8s_args, result_ips
from podnet.model.objects import CloudNetwork, Node, ObjectMeta, Pod, PodSpec
from tests.kernel.labs import echo_connection, running_lab
from tests.kernel.test_agent_metrics import scrape, value
from tests.support.bgp import wait_until

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "lab", "eni.yaml")
RESYNC = 5  # seconds: the drift test waits for one resync


SAME_SUBNET = "10.40.1.0/24"


@pytest.fixture(scope="module")
def lab():
    spec = {**yaml.safe_load(open(EXAMPLE))["spec"], "resyncSeconds": RESYNC}
    # the shared nodes' ENIs in one subnet, every run: a pod reaches another node's pod in its
    # own subnet through the gateway, as it reaches one in another subnet (x-1's)
    shared = next(n for n in spec["cloud"]["networks"] if n["name"] == "shared")
    shared["subnets"] = [SAME_SUBNET]
    with running_lab(spec, "eni", timeout=120) as lab:
        yield lab


def ip(lab, pod: str) -> str:
    return lab.pod(pod)["ips"][0]


def in_cloud(lab, code: str, *args: str):
    """`code` run with the lab's EC2 endpoint as sys.argv[1] (then `args`) in the underlay
    namespace the server serves in; what it printed, as JSON."""
    out = subprocess.run(["ip", "netns", "exec", lab.state.data["underlay_netns"], sys.executable, "-c", code,
                          lab.state.data["cloud"]["endpoint"], *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT)
    return json.loads(out.stdout)


def cloud_state(lab) -> dict:
    """The EC2 server's counters, calls in flight and duplicates."""
    return in_cloud(lab, "import json, sys; from tests.support.fake_ec2 import FakeEC2Client; "
                         "print(json.dumps(FakeEC2Client(sys.argv[1]).state()))")


def cloud_latency(lab, latency: dict[str, float]) -> None:
    """Set the EC2 server's injected latency per call (an empty dict: none)."""
    in_cloud(lab, "import json, sys; from tests.support.fake_ec2 import FakeEC2Client; "
                  "FakeEC2Client(sys.argv[1]).control(latency=json.loads(sys.argv[2])); print('{}')",
             json.dumps(latency))


def cloud_addresses(lab, node: str) -> list[str]:
    """The secondary addresses the cloud has on the ENIs attached to the node's instance."""
    instance = lab.store().get(Node, node).spec.provider_id.rsplit("/", 1)[-1]
    return in_cloud(lab, "import json, sys, boto3; from tests.support.fake_ec2 import ACCESS_KEY, REGION, SECRET_KEY; "
                         "ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name=REGION, "
                         "aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY); "
                         "nis = ec2.describe_network_interfaces(Filters=[{'Name': 'attachment.instance-id', "
                         "'Values': [sys.argv[2]]}])['NetworkInterfaces']; "
                         "print(json.dumps(sorted(p['PrivateIpAddress'] for n in nis "
                         "for p in n['PrivateIpAddresses'] if not p['Primary'])))", instance)


def test_pods_reach_pods_and_the_vpc_host_by_their_vpc_addresses(lab):
    rows = probe_all(lab, timeout=3)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    kinds = {r.kind for r in rows}
    assert {"cross-node/vpc", "vpc", "same-node"} <= kinds
    # every answer saw the pod's own VPC address: no SNAT anywhere (probe_all fails a NATed one)
    for pod in ("a-1", "b-1", "x-1"):
        assert ip(lab, pod).startswith("10.40.")
    state = cloud_state(lab)
    assert state["duplicates"] == [] and state["limit_errors"] == {}


def test_pods_of_two_nodes_in_one_subnet_reach_each_other_through_the_gateway(lab):
    """An ENI's table routes the whole VPC, its own subnet too, via the subnet's gateway: the
    fabric (like EC2) delivers a secondary address by its ENI, not by ARP from the sender."""
    a1, b1 = ip(lab, "a-1"), ip(lab, "b-1")
    assert ipaddress.ip_address(a1) in ipaddress.ip_network(SAME_SUBNET)
    assert ipaddress.ip_address(b1) in ipaddress.ip_network(SAME_SUBNET)
    (r,) = lab.probe("b-1", [f"tcp:{a1}:8080"], timeout=5)
    assert r["ok"] and r["peer"] == b1, r
    (r,) = lab.probe("a-1", [f"tcp:{b1}:8080"], timeout=5)
    assert r["ok"] and r["peer"] == a1, r
    for node in ("node-1", "node-2"):  # and a node reaches the other's pods by the VPC, not by ARP on its ENI
        ns = lab.node(node)["netns"]
        main = json.loads(subprocess.run(["ip", "-n", ns, "-j", "route", "show", "table", "main"],
                                         capture_output=True, text=True, check=True).stdout)
        assert not any(rt["dst"] == SAME_SUBNET for rt in main), main
    rows = [row for row in probe_all(lab, timeout=3) if row.kind == "node->pod/vpc"]
    assert rows and all(row.ok for row in rows), rows


def test_the_dataplane_of_each_mode(lab):
    n1 = lab.node("node-1")["netns"]
    rules = subprocess.run(["ip", "-n", n1, "-j", "rule"], capture_output=True, text=True, check=True).stdout
    from_a1 = [r for r in json.loads(rules) if r.get("src") == ip(lab, "a-1")]
    assert from_a1 and from_a1[0]["table"] != "main", rules  # replies leave by the ENI that owns the address
    links = json.loads(subprocess.run(["ip", "-n", n1, "-j", "link"], capture_output=True, text=True,
                                      check=True).stdout)
    assert not any(link.get("link_info", {}).get("info_kind") == "vxlan" for link in links)  # no encapsulation
    # exclusive mode: the pod's eth0 is an ENI link (a veth whose other end is in the VPC namespace)
    x1 = lab.pod("x-1")["netns"]
    addrs = json.loads(subprocess.run(["ip", "-n", x1, "-j", "addr", "show", "eth0"], capture_output=True,
                                      text=True, check=True).stdout)
    assert addrs[0]["addr_info"][0]["prefixlen"] == 24  # the ENI's subnet, not a /32 behind a gateway
    with echo_connection(lab.pod("b-1")["netns"], 7070, lab.pod("x-1")["netns"], f"{ip(lab, 'b-1')}:7070") as rt:
        assert rt("exclusive-to-shared") == "exclusive-to-shared"


@contextlib.contextmanager
def pods_to_add(lab, node: str, names: list[str]):
    """Pods of `node` ready for its runtime's ADD: (runtime, [conf per name]). Their namespaces
    go afterwards (a DEL not made by the test is GC's)."""
    uids = {name: str(uuid.uuid4()) for name in names}
    lab.store().apply([Pod(metadata=ObjectMeta(name=name, namespace="default", uid=uid), spec=PodSpec(node_name=node))
                       for name, uid in uids.items()])
    made: list[str] = []
    try:
        confs = []
        for name, uid in uids.items():
            netns = f"pneni-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", netns], check=True)
            made.append(netns)
            cid = secrets.token_hex(32)
            confs.append(RuntimeConf(container_id=cid, netns=f"/run/netns/{netns}",
                                     args=k8s_args("default", name, cid, uid)))
        yield node_runtime(lab.state, lab.node(node)), confs
    finally:
        for netns in made:
            subprocess.run(["ip", "netns", "del", netns], check=False)


@contextlib.contextmanager
def late_pod(lab, node: str, name: str):
    """A pod added to `node` through its runtime after the lab came up; (runtime, conf, address)."""
    with pods_to_add(lab, node, [name]) as (runtime, (conf,)):
        yield runtime, conf, result_ips(runtime.add(conf))[0]


def eni_metrics(lab, node: str) -> dict:
    """The agent's /metrics, scraped in its node's namespace: (name, labels) -> value."""
    n = lab.node(node)
    samples, _ = scrape(n["netns"], host=n["address"], port=AGENT_METRICS_PORT)
    return samples


def test_the_agents_metrics_show_the_pool_and_its_cloud_calls(lab):
    """Before the kill -9 below: the agent read here is the one that made node-1's ENI."""
    before = eni_metrics(lab, "node-1")
    held = rec.read(lab.store().kv, "node-1")
    assert value(before, "podnet_eni_pool_ready") == 1
    assert value(before, "podnet_eni_addresses", network="shared", state="assigned") == len(held.handles) >= 2
    assert value(before, "podnet_eni_enis_attached") >= 1
    assert value(before, "podnet_eni_cloud_calls_total", api="CreateNetworkInterface", result="ok") >= 1
    assert value(before, "podnet_eni_cloud_calls_total", api="AssignPrivateIpAddresses", result="ok") >= 1
    assert value(before, "podnet_eni_cloud_calls_total", api="DescribeNetworkInterfaces", result="ok") >= 1
    waits = value(before, "podnet_eni_allocation_wait_seconds_count")
    assert waits >= 2  # a-1 and a-2
    with late_pod(lab, "node-1", "metrics-1") as (runtime, conf, address):
        during = eni_metrics(lab, "node-1")
        assert value(during, "podnet_eni_addresses", network="shared", state="assigned") == len(held.handles) + 1
        assert value(during, "podnet_eni_allocation_wait_seconds_count") == waits + 1
        runtime.delete(conf)
        after = eni_metrics(lab, "node-1")  # the address cools down (5 s in the lab) before it is idle again
        assert value(after, "podnet_eni_addresses", network="shared", state="assigned") == len(held.handles)
        assert value(after, "podnet_eni_addresses", network="shared", state="cooling") >= 1


def test_kill_9_of_an_agent_keeps_pods_working_and_hands_out_no_address_twice(lab):
    a1, b1 = ip(lab, "a-1"), ip(lab, "b-1")
    with echo_connection(lab.pod("b-1")["netns"], 7071, lab.pod("a-1")["netns"], f"{b1}:7071") as roundtrip:
        assert roundtrip("before") == "before"
        restart_agent(lab.state, "node-1", kill=True, while_down=lambda: roundtrip("agent-down"))
        assert roundtrip("after") == "after"
    # a pod started after the restart gets an address no other pod holds, from the same pool
    store = lab.store()
    with late_pod(lab, "node-1", "late-1") as (runtime, conf, late):
        assert late.startswith("10.40.") and late not in {ip(lab, p["name"]) for p in lab.pods}
        held = rec.read(store.kv, "node-1")
        assert sorted(held.handles.values()) == sorted({*held.handles.values()})  # one pod per address
        assert {a1, late} <= set(held.handles.values())
        (r,) = lab.probe("b-1", [f"tcp:{a1}:8080"], timeout=5)
        assert r["ok"] and r["peer"] == b1
        runtime.delete(conf)
        after = rec.read(store.kv, "node-1")
        assert late not in after.handles.values()
        assert after.addresses[late].handle is None and after.addresses[late].cooling_until  # cooling down
        assert cloud_state(lab)["duplicates"] == []


def test_kill_9_of_an_agent_mid_burst_leaks_no_address_and_hands_out_none_twice(lab):
    """node-2's agent killed with -9 while a burst of ADDs waits for an Assign call the cloud
    is still answering (1.5 s injected), then started again: the ADDs that failed are deleted
    as the kubelet does; every pod holds an address of its own that the node has in the cloud,
    and every address the node has in the cloud is a pod's or in its pool: none leaked."""
    node, held_before = "node-2", set(rec.read(lab.store().kv, "node-2").handles.values())
    answers: dict[str, str | Exception] = {}

    def add(runtime, conf) -> None:
        try:
            answers[conf.container_id] = result_ips(runtime.add(conf))[0]
        except Exception as e:  # noqa: BLE001 - an ADD the kill cut short: looked at below
            answers[conf.container_id] = e

    with pods_to_add(lab, node, [f"burst-{i}" for i in range(10)]) as (runtime, confs):
        try:
            cloud_latency(lab, {"AssignPrivateIpAddresses": 1.5})
            assigns = cloud_state(lab)["calls"].get("AssignPrivateIpAddresses", 0)
            threads = [threading.Thread(target=add, args=(runtime, conf)) for conf in confs]
            for t in threads:
                t.start()
            wait_until(lambda: cloud_state(lab)["calls"].get("AssignPrivateIpAddresses", 0) > assigns,
                       "an Assign call of the burst sent", timeout=30)
            # the new agent starts once the cloud has done what the killed one asked for: the
            # address it got and never recorded is the cloud's, for the start's reconcile to find
            restart_agent(lab.state, node, kill=True, while_down=lambda: wait_until(
                lambda: cloud_state(lab)["in_flight"] == 0, "the killed agent's calls answered", timeout=30))
            for t in threads:
                t.join(90)
        finally:
            cloud_latency(lab, {})
        assert len(answers) == len(confs) and any(isinstance(a, Exception) for a in answers.values()), answers
        for conf in confs:
            if isinstance(answers[conf.container_id], Exception):
                runtime.delete(conf)  # the kubelet's DEL after a failed ADD
        store = lab.store()
        held = rec.read(store.kv, node).handles
        got = [a for a in answers.values() if isinstance(a, str)]
        assert sorted(held.values()) == sorted(set(held.values())), held  # one pod per address
        assert set(got) | held_before == set(held.values()) and not set(got) & held_before, (got, held)
        assert set(held.values()) <= set(cloud_addresses(lab, node))

        def accounted() -> bool:  # the restarted agent's pool: every address of the node's in the cloud
            samples = eni_metrics(lab, node)
            count = lambda state: value(samples, "podnet_eni_addresses", network="shared", state=state)  # noqa: E731
            return (count("assigned") == len(held)
                    and count("assigned") + count("idle") + count("cooling") == len(cloud_addresses(lab, node)))
        wait_until(accounted, f"{node}'s pool accounting for every address it has in the cloud", timeout=60)
        assert cloud_state(lab)["duplicates"] == []
        for conf in confs:
            if isinstance(answers[conf.container_id], str):
                runtime.delete(conf)


def ip_json(netns: str, *args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True,
                                     check=True).stdout)


def pod_rule(netns: str, pod_ip: str) -> dict | None:
    return next((r for r in ip_json(netns, "rule") if r.get("src") == pod_ip and r.get("table") != "main"), None)


def host_route(netns: str, pod_ip: str) -> dict | None:
    return next((r for r in ip_json(netns, "route", "show", "table", "main") if r["dst"] == pod_ip), None)


def table_default(netns: str, table: str) -> dict | None:
    return next((r for r in ip_json(netns, "route", "show", "table", table) if r["dst"] == "default"), None)


def b1_reaches_a1(lab) -> None:
    (r,) = lab.probe("b-1", [f"tcp:{ip(lab, 'a-1')}:8080"], timeout=5)
    assert r["ok"] and r["peer"] == ip(lab, "b-1"), r


def test_a_pod_rule_deleted_behind_the_agent_comes_back_within_a_resync(lab):
    n1, a1 = lab.node("node-1")["netns"], ip(lab, "a-1")
    rule = pod_rule(n1, a1)
    assert rule is not None
    subprocess.run(["ip", "-n", n1, "rule", "del", "from", a1, "lookup", str(rule["table"])], check=True)
    assert pod_rule(n1, a1) is None
    back = wait_until(lambda: pod_rule(n1, a1), "a-1's rule restored by the eni dataplane", timeout=RESYNC * 3 + 10)
    assert back["table"] == rule["table"]
    b1_reaches_a1(lab)


def test_a_pod_host_route_deleted_behind_the_agent_comes_back_within_a_resync(lab):
    n1, a1 = lab.node("node-1")["netns"], ip(lab, "a-1")
    route = host_route(n1, a1)
    assert route is not None and route["dev"].startswith("pn")
    subprocess.run(["ip", "-n", n1, "route", "del", f"{a1}/32", "dev", route["dev"]], check=True)
    assert host_route(n1, a1) is None
    back = wait_until(lambda: host_route(n1, a1), "a-1's host route restored", timeout=RESYNC * 3 + 10)
    assert back["dev"] == route["dev"]
    b1_reaches_a1(lab)


def test_a_route_of_an_eni_table_deleted_behind_the_agent_comes_back_within_a_resync(lab):
    n1, a1 = lab.node("node-1")["netns"], ip(lab, "a-1")
    table = str(pod_rule(n1, a1)["table"])
    route = table_default(n1, table)
    assert route is not None
    subprocess.run(["ip", "-n", n1, "route", "del", "default", "table", table], check=True)
    assert table_default(n1, table) is None
    back = wait_until(lambda: table_default(n1, table), f"table {table}'s default route restored",
                      timeout=RESYNC * 3 + 10)
    assert back["gateway"] == route["gateway"]
    b1_reaches_a1(lab)


def apply_shared(lab, tmp_path, spec: dict) -> subprocess.CompletedProcess:
    """`podnet apply -f` of the CloudNetwork "shared" with this spec."""
    path = tmp_path / f"shared-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "podnet.io/v1", "kind": "CloudNetwork",
                                    "metadata": {"name": "shared"}, "spec": spec}))
    return subprocess.run([sys.executable, "-m", "podnet.cli.main", "--store", lab.state.data["store"], "apply",
                           "-f", str(path)], capture_output=True, text=True, cwd=ROOT)


def idle(lab, node: str) -> float:
    return value(eni_metrics(lab, node), "podnet_eni_addresses", network="shared", state="idle")


def test_a_changed_cloud_network_is_taken_without_a_restart_and_a_bad_one_is_refused(lab, tmp_path):
    st = lab.state
    agents = {n: st.process_pid(st.process(f"agent-{n}")) for n in ("node-1", "node-2")}
    running = lab.store().get(CloudNetwork, "shared")
    original = running.spec.to_dict()
    try:
        # bad values: refused when applied, naming the object and the field; the store keeps the old
        bad = apply_shared(lab, tmp_path, {**original, "warmPool": {"minIdle": 9, "maxIdle": 3}})
        assert bad.returncode == 1
        assert "(CloudNetwork/shared): field spec.warmPool: maxIdle 3 is below minIdle 9" in bad.stderr, bad.stderr
        assert lab.store().get(CloudNetwork, "shared").spec == running.spec
        # new watermarks: both agents fill their warm pools to them, no restart
        done = apply_shared(lab, tmp_path, {**original, "warmPool": {"minIdle": 8, "maxIdle": 8}})
        assert done.returncode == 0, done.stderr
        for node in agents:
            wait_until(lambda n=node: idle(lab, n) == 8, f"{node}'s warm pool at the new watermarks", timeout=60)
        # a subnet the cloud does not know: the agents refuse the change, and say so
        unknown = {"id": "subnet-00000000000000000", "zone": original["subnets"][0]["zone"]}
        done = apply_shared(lab, tmp_path, {**original, "warmPool": {"minIdle": 3, "maxIdle": 3},
                                            "subnets": [*original["subnets"], unknown]})
        assert done.returncode == 0, done.stderr
        wait_until(lambda: value(eni_metrics(lab, "node-1"), "podnet_eni_config_rejected") == 1,
                   "node-1's agent refusing the unknown subnet", timeout=60)
        log = open(lab.node("node-1")["log"]).read()
        assert "CloudNetwork/shared: field spec.subnets[1].id: subnet subnet-00000000000000000 does not exist" in log
        assert idle(lab, "node-1") == 8  # nothing of that change taken, its watermarks neither
        b1_reaches_a1(lab)  # and the nodes' pods keep working
        assert {n: st.process_pid(st.process(f"agent-{n}")) for n in agents} == agents
    finally:
        assert apply_shared(lab, tmp_path, original).returncode == 0
    for node in agents:  # back to the example's watermarks (2..6): the surplus goes back to the cloud
        wait_until(lambda n=node: value(eni_metrics(lab, n), "podnet_eni_config_rejected") == 0
                   and idle(lab, n) <= 6, f"{node} back at the original settings", timeout=60)


def test_with_the_cloud_api_down_pods_keep_working_and_the_warm_pool_still_serves(lab):
    """Near the end of this module: it stops the lab's EC2 server for good."""
    entry = lab.state.process("ec2")
    lab.state.stop_process(entry)
    rows = [r for r in probe_all(lab, timeout=3, include_nodes=False) if r.src == "default/a-1"]
    assert rows and all(r.ok for r in rows), rows
    with late_pod(lab, "node-2", "late-2") as (runtime, conf, late):  # from node-2's warm pool: no cloud call
        assert late.startswith("10.40.")
        runtime.delete(conf)


def test_node_cleanup_removes_the_eni_rules_and_tables_and_leaves_the_enis_ready_to_detach(lab):
    """Last in this module: node-1 leaves podnet (its agent killed with -9 first)."""
    n1, st = lab.node("node-1")["netns"], lab.state
    ours = lambda: [r for r in ip_json(n1, "rule") if r.get("protocol") == "225" or r.get("protocol") == 225]  # noqa: E731
    assert ours()
    table = str(pod_rule(n1, ip(lab, "a-1"))["table"])
    assert ip_json(n1, "route", "show", "table", table)
    eni_links = {r["dev"] for r in ip_json(n1, "route", "show", "table", table)}
    assert st.stop_process(st.process("agent-node-1"), first=signal.SIGKILL)
    assert st.stop_process(st.process(node_dns_key("node-1")))
    done = lab.exec_node("node-1", [sys.executable, "-m", "podnet.cli.main", "node", "cleanup", "--socket",
                                    lab.node("node-1")["socket"]], timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"lookup {table} (protocol 225)" in done.stdout and "ready to detach" in done.stdout
    assert ours() == [] and ip_json(n1, "route", "show", "table", table) == []
    for name in eni_links:  # still on the node (the cloud detaches it), down, no address of podnet's
        (link,) = ip_json(n1, "addr", "show", "dev", name)
        assert "UP" not in link["flags"] and [a for a in link["addr_info"] if a["family"] == "inet"] == []
    assert not [link for link in ip_json(n1, "link") if link["ifname"].startswith("pn")]
    again = lab.exec_node("node-1", [sys.executable, "-m", "podnet.cli.main", "node", "cleanup", "--socket",
                                     lab.node("node-1")["socket"]], timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout
