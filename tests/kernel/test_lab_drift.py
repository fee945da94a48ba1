"""Every dataplane heals when its kernel state is changed behind the agent's back,
within one resync period, shown with real packets: policy (and isolated pods stay
isolated once it is repaired), routes, NAT, Services and node DNS; a rule replaced
in place (every count as it was) included."""

import json
import os
import time

import pytest

from podnet.lab.cluster import restart_agent
from podnet.lab.connectivity import Lab
from podnet.model.objects import Service
from tests.kernel.labs import REPAIR_RESYNC as RESYNC
from tests.kernel.labs import (
    ip_of,
    log_offsets,
    log_since,
    node_sh,
    reaches,
    running_lab,
    wait_for,
    web_client_intruder,
)

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

WEB = [{"name": "http", "containerPort": 8080}]
MANIFESTS = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
     "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web-from-clients"},
     "spec": {"podSelector": {"matchLabels": {"app": "web"}},
              "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                           "ports": [{"port": "http"}]}]}},
]


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"}, "resyncSeconds": RESYNC,
            "nodes": [{"name": "node-1"}, {"name": "node-2"}],
            "pods": web_client_intruder(WEB),
            "manifests": MANIFESTS}
    with running_lab(spec, "dr") as lab:
        yield lab


def repaired(lab: Lab, node: str, dataplane: str, since: dict[str, int]) -> bool:
    """Whether the agent of `node` found and repaired drift of `dataplane` since `since`."""
    return f"{dataplane}: kernel state changed behind podnet's back" in log_since(lab, node, since)


def test_a_flushed_policy_table_is_rebuilt_and_the_isolated_pod_is_isolated_again(lab):
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    assert reaches(lab, "client", web) and not reaches(lab, "intruder", web)
    since = log_offsets(lab)
    node_sh(lab, "node-1", "nft", "flush", "table", "ip", "podnet-policy")
    # (until the next resync the intruder gets through: a flushed table opens the pods)
    wait_for(lambda: repaired(lab, "node-1", "policy", since), "the policy drift found")
    wait_for(lambda: not reaches(lab, "intruder", web), "the intruder isolated again")
    for _ in range(3):  # isolated again, across further resyncs, while the client keeps working
        assert reaches(lab, "client", web) and not reaches(lab, "intruder", web)


def replace_rule(lab: Lab, node: str, table: str, chain: str, pick, rule: str) -> None:
    """`nft replace rule` behind the agent's back: the first rule of `chain` whose expressions
    `pick` accepts, turned into `rule` (the chain keeps its number of rules)."""
    doc = json.loads(node_sh(lab, node, "nft", "-j", "-a", "list", "chain", "ip", table, chain))
    handle = next(item["rule"]["handle"] for item in doc["nftables"] if "rule" in item and pick(item["rule"]["expr"]))
    node_sh(lab, node, "nft", "replace", "rule", "ip", table, chain, "handle", str(handle), *rule.split())


def test_a_policy_rule_replaced_in_place_is_found_and_the_isolated_pod_isolated_again(lab):
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    assert reaches(lab, "client", web) and not reaches(lab, "intruder", web)
    listing = node_sh(lab, "node-1", "nft", "list", "table", "ip", "podnet-policy")
    group = next(line.split()[1] for line in listing.splitlines() if line.strip().startswith("chain gi_"))
    since = log_offsets(lab)
    # the web pod's drop, accept instead: every chain keeps its number of rules
    replace_rule(lab, "node-1", "podnet-policy", group, lambda expr: {"drop": None} in expr, "accept")
    # (until the next resync the intruder gets through, as after a flush)
    wait_for(lambda: repaired(lab, "node-1", "policy", since), "the replaced policy rule found")
    wait_for(lambda: not reaches(lab, "intruder", web), "the intruder isolated again")
    for _ in range(3):  # isolated again, across further resyncs, while the client keeps working
        assert reaches(lab, "client", web) and not reaches(lab, "intruder", web)


def test_a_deleted_allow_element_is_restored_and_the_pod_stays_isolated_meanwhile(lab):
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    client = ip_of(lab, "client")
    doc = json.loads(node_sh(lab, "node-1", "nft", "-j", "list", "table", "ip", "podnet-policy"))
    holder = next(item["set"]["name"] for item in doc["nftables"]
                  if "set" in item and client in item["set"].get("elem", []))
    since = log_offsets(lab)
    node_sh(lab, "node-1", "nft", "delete", "element", "ip", "podnet-policy", holder, f"{{ {client} }}")
    # while it is missing (the client is refused: fails closed) and while the table is
    # rewritten (one transaction), the intruder never gets through
    deadline = time.monotonic() + RESYNC * 3 + 10
    while not (repaired(lab, "node-1", "policy", since) and reaches(lab, "client", web)):
        assert not reaches(lab, "intruder", web)
        assert time.monotonic() < deadline, "the allow element was not restored"
    assert not reaches(lab, "intruder", web)


def test_a_deleted_route_to_another_nodes_block_comes_back(lab):
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    routes = node_sh(lab, "node-2", "ip", "route", "show", "proto", "88")
    block = next(line.split()[0] for line in routes.splitlines() if "via" in line)
    node_sh(lab, "node-2", "ip", "route", "del", block)
    wait_for(lambda: block in node_sh(lab, "node-2", "ip", "route", "show", "proto", "88"), f"route {block}")
    assert reaches(lab, "client", web)


def test_a_deleted_nat_table_comes_back(lab):
    node_sh(lab, "node-1", "nft", "delete", "table", "ip", "podnet-nat")
    wait_for(lambda: lab.exec_node("node-1", ["nft", "list", "table", "ip", "podnet-nat"]).returncode == 0,
             "table podnet-nat")
    assert "masquerade" in node_sh(lab, "node-1", "nft", "list", "table", "ip", "podnet-nat")


def web_service_reached(lab) -> str:
    """The web Service's probe target, reached from the client before the drift."""
    svc = lab.store().get(Service, "web", "default")
    assert svc is not None and svc.spec.cluster_ip
    target = f"tcp:{svc.spec.cluster_ip}:80"
    assert reaches(lab, "client", target)
    return target


def test_a_deleted_service_table_comes_back(lab):
    target = web_service_reached(lab)
    since = log_offsets(lab)
    node_sh(lab, "node-2", "nft", "delete", "table", "ip", "podnet-svc")
    wait_for(lambda: repaired(lab, "node-2", "services", since), "the Service drift found")
    wait_for(lambda: reaches(lab, "client", target), "the Service through node-2")


def test_a_flushed_service_chain_is_refilled_by_one_resync(lab):
    # names and element counts stay as they were: only the rules are gone
    target = web_service_reached(lab)
    since = log_offsets(lab)
    node_sh(lab, "node-2", "nft", "flush", "chain", "ip", "podnet-svc", "services")
    # (until the next resync nothing is DNATed; asserting that would race with it)
    wait_for(lambda: repaired(lab, "node-2", "services", since), "the flushed Service chain found")
    wait_for(lambda: reaches(lab, "client", target), "the Service through node-2")


def test_a_service_dnat_rule_pointed_elsewhere_is_found_and_the_service_reaches_its_endpoints(lab):
    target = web_service_reached(lab)
    since = log_offsets(lab)
    # one endpoint: the Service goes through chain svc_1, its random pick DNATed to a blackhole
    replace_rule(lab, "node-2", "podnet-svc", "svc_1", lambda expr: any("numgen" in str(e) for e in expr),
                 "meta l4proto tcp dnat ip to 192.0.2.66:8080")
    wait_for(lambda: repaired(lab, "node-2", "services", since), "the replaced Service rule found")
    wait_for(lambda: reaches(lab, "client", target), "the Service through node-2")
    assert "192.0.2.66" not in node_sh(lab, "node-2", "nft", "list", "chain", "ip", "podnet-svc", "svc_1")


def test_a_removed_node_dns_address_comes_back(lab):
    node_sh(lab, "node-2", "ip", "addr", "del", "169.254.20.10/32", "dev", "lo")
    query = ["dig", "+short", "+time=1", "+tries=1", "@169.254.20.10", "web.default.svc.cluster.local"]
    wait_for(lambda: lab.exec("client", query).stdout.strip() != "", "node DNS on 169.254.20.10")


def test_a_deleted_node_dns_notrack_table_comes_back(lab):
    since = log_offsets(lab)
    node_sh(lab, "node-2", "nft", "delete", "table", "ip", "podnet-dns")
    wait_for(lambda: repaired(lab, "node-2", "dns", since), "the node DNS drift found")
    # (found is logged before the sync that rewrites it)
    wait_for(lambda: lab.exec_node("node-2", ["nft", "list", "table", "ip", "podnet-dns"]).returncode == 0,
             "table podnet-dns")
    assert node_sh(lab, "node-2", "nft", "list", "table", "ip", "podnet-dns").count("notrack") == 3
    query = ["dig", "+short", "+time=1", "+tries=1", "@169.254.20.10", "web.default.svc.cluster.local"]
    assert lab.exec("client", query).stdout.strip() != ""


def test_a_replaced_node_dns_notrack_rule_is_found_and_rewritten(lab):
    since = log_offsets(lab)
    replace_rule(lab, "node-2", "podnet-dns", "prerouting", lambda expr: True,
                 "ip daddr 192.0.2.66 meta l4proto udp th dport 53 notrack")
    wait_for(lambda: repaired(lab, "node-2", "dns", since), "the replaced NOTRACK rule found")
    wait_for(lambda: "192.0.2.66" not in node_sh(lab, "node-2", "nft", "list", "table", "ip", "podnet-dns"),
             "the NOTRACK rule rewritten")
    assert node_sh(lab, "node-2", "nft", "list", "table", "ip", "podnet-dns").count("169.254.20.10") == 3


def test_an_agent_killed_with_9_leaves_policy_closed_and_its_restart_changes_nothing(lab):
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    svc = lab.store().get(Service, "web", "default")
    assert svc is not None and svc.spec.cluster_ip
    service = f"tcp:{svc.spec.cluster_ip}:80"
    before = node_sh(lab, "node-1", "nft", "list", "table", "ip", "podnet-policy")
    since = log_offsets(lab)

    def while_down() -> None:  # the kernel keeps enforcing what the agent left
        assert not reaches(lab, "intruder", web)
        assert reaches(lab, "client", web) and reaches(lab, "client", service)

    restart_agent(lab.state, "node-1", kill=True, while_down=while_down)
    assert not reaches(lab, "intruder", web) and reaches(lab, "client", web)
    fresh = log_since(lab, "node-1", since)
    assert "serving CNI" in fresh and "policy: table" not in fresh, fresh  # adopted, not rewritten
    assert node_sh(lab, "node-1", "nft", "list", "table", "ip", "podnet-policy") == before
