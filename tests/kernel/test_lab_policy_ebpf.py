"""NetworkPolicy by the agent's eBPF dataplane (`policyDataplane: ebpf`, with the eBPF
Services it needs) in a lab: the rules judged on real packets (ingress from another
node, through a Service there, and a local pod's egress, also through a Service), a
map entry deleted behind the agent repaired within a resync, a policy filter deleted
dropping until the agent puts it back at once (not at a resync), an agent killed
with -9 leaves policy enforced and its restart writes nothing, and a node switched back
to nftables loses the eBPF programs (they would act on maps nobody writes)."""

import json
import os
import time

import pytest

from podnet.lab.cluster import restart_agent, wait_programmed
from podnet.lab.connectivity import Lab
from podnet.model.objects import Service
from tests.kernel.labs import REPAIR_RESYNC as RESYNC
from tests.kernel.labs import (
    agent_maps,
    ip_of,
    log_offsets,
    log_since,
    node_sh,
    reaches,
    running_lab,
    services_fast_path,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

WEB = [{"name": "http", "containerPort": 8080}]
OTHER = [{"containerPort": 9000}]
MANIFESTS = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
     "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    # web (node-1) admits the clients on its named port only
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web-from-clients"},
     "spec": {"podSelector": {"matchLabels": {"app": "web"}},
              "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                           "ports": [{"port": "http"}]}]}},
    # the local client (node-1) may only talk to web's pods, on their named port
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "local-client-out"},
     "spec": {"podSelector": {"matchLabels": {"app": "local-client"}}, "policyTypes": ["Egress"],
              "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]}]}},
]


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"}, "resyncSeconds": RESYNC, "dnsServer": "inprocess",
            "nodes": [{"name": "node-1", "policyDataplane": "ebpf", "serviceProxy": "ebpf"}, {"name": "node-2"}],
            "pods": [{"name": "web", "node": "node-1", "labels": {"app": "web"}, "ports": WEB},
                     {"name": "local-client", "node": "node-1", "labels": {"app": "local-client", "role": "client"},
                      "ports": OTHER},
                     {"name": "client", "node": "node-2", "labels": {"app": "client", "role": "client"},
                      "ports": OTHER},
                     {"name": "intruder", "node": "node-2", "labels": {"app": "intruder"}, "ports": OTHER}],
            "manifests": MANIFESTS}
    with running_lab(spec, "pe") as lab:
        yield lab


def service(lab: Lab) -> str:
    svc = lab.store().get(Service, "web", "default")
    assert svc is not None and svc.spec.cluster_ip
    return f"tcp:{svc.spec.cluster_ip}:80"


def policy_maps(lab: Lab) -> str:
    return agent_maps(lab, "node-1")


def enforced(lab: Lab) -> None:
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    assert reaches(lab, "client", web) and reaches(lab, "client", service(lab))
    assert not reaches(lab, "intruder", web) and not reaches(lab, "intruder", service(lab))


def test_rules_on_real_packets(lab):
    assert services_fast_path(lab, "node-1")  # eBPF policy runs before the redirect: on
    enforced(lab)
    # the local client's egress: web on its named port, also through web's Service (the
    # eBPF Service program translates it before policy judges it), nothing else
    assert reaches(lab, "local-client", f"tcp:{ip_of(lab, 'web')}:8080")
    assert reaches(lab, "local-client", service(lab))
    assert not reaches(lab, "local-client", f"tcp:{ip_of(lab, 'intruder')}:9000")
    assert reaches(lab, "intruder", f"tcp:{ip_of(lab, 'client')}:9000")  # node-2 has no policy for them


def test_an_egress_isolated_pod_reaches_the_dns_its_node_answers_on_the_kube_dns_cluster_ip(lab):
    """The node's DNS answers on the kube-dns ClusterIP itself (no DNAT): a pod reaches its
    own node whatever its egress rules, so the Service CIDR drop leaves that address out."""
    dns = lab.store().get(Service, "kube-dns", "kube-system")
    assert dns is not None and dns.spec.cluster_ip
    answer = lab.exec("local-client", ["dig", "+short", "+tries=1", "+time=3", f"@{dns.spec.cluster_ip}",
                                       "web.default.svc.cluster.local"], timeout=20)
    assert answer.returncode == 0 and answer.stdout.split() == [service(lab).split(":")[1]], answer


def test_a_deleted_pod_entry_drops_until_the_resync_restores_it(lab):
    web_ip = ip_of(lab, "web")
    web = f"tcp:{web_ip}:8080"
    since = log_offsets(lab)
    node_sh(lab, "node-1", "bpftool", "map", "delete", "pinned", f"{policy_maps(lab)}/podnet_pol_pods",
            "key", "hex", *(f"{int(b):02x}" for b in web_ip.split(".")))
    # while it is missing web is dropped (fails closed), the intruder never gets through
    deadline = time.monotonic() + RESYNC * 3 + 10
    while not ("policy: kernel state changed behind podnet's back" in log_since(lab, "node-1", since)
               and reaches(lab, "client", web)):
        assert not reaches(lab, "intruder", web)
        assert time.monotonic() < deadline, "web's entry was not restored"
    enforced(lab)


def test_a_deleted_policy_filter_drops_and_is_put_back_at_once(lab):
    web_ip = ip_of(lab, "web")
    web = f"tcp:{web_ip}:8080"
    veth = json.loads(node_sh(lab, "node-1", "ip", "-j", "route", "get", web_ip))[0]["dev"]

    def ingress_program() -> str:  # web's ingress rules: policy's filter at egress prio 1
        return node_sh(lab, "node-1", "tc", "filter", "show", "dev", veth, "egress", "prio", "1")

    assert "podnet_pol_to_pod" in ingress_program()
    since = log_offsets(lab)
    node_sh(lab, "node-1", "tc", "filter", "del", "dev", veth, "egress", "prio", "1")
    # racing with the repair: without policy's filter the guard drops, so the intruder's
    # probe is dropped whether it comes before or after the filter is back
    assert not reaches(lab, "intruder", web)
    wait_for(lambda: "podnet_pol_to_pod" in ingress_program(), "web's policy filter back")
    enforced(lab)
    # (that the watch, not the resync, puts it back: test_policy_ebpf.py, where no resync runs)
    assert "attached to 1 interfaces" in log_since(lab, "node-1", since)


def test_an_agent_killed_with_9_leaves_policy_enforced_and_its_restart_writes_nothing(lab):
    web = f"tcp:{ip_of(lab, 'web')}:8080"
    before = node_sh(lab, "node-1", "bpftool", "-j", "map", "dump", "pinned", f"{policy_maps(lab)}/podnet_pol_pods")
    since = log_offsets(lab)

    def while_down() -> None:  # the programs and maps stay: the kernel enforces what the agent left
        assert not reaches(lab, "intruder", web)
        assert reaches(lab, "client", web) and reaches(lab, "local-client", web)

    restart_agent(lab.state, "node-1", kill=True, while_down=while_down)
    enforced(lab)
    fresh = log_since(lab, "node-1", since)
    assert "serving CNI" in fresh and "policy: maps" not in fresh, fresh  # adopted, nothing written
    after = node_sh(lab, "node-1", "bpftool", "-j", "map", "dump", "pinned", f"{policy_maps(lab)}/podnet_pol_pods")
    assert after == before


def podnet_filters(lab: Lab, node: str) -> list[str]:
    """The podnet eBPF filters on every interface of the node: 'interface direction program'."""
    found = []
    for link in json.loads(node_sh(lab, node, "ip", "-j", "link", "show")):
        for direction in ("ingress", "egress"):
            out = lab.exec_node(node, ["tc", "filter", "show", "dev", link["ifname"], direction]).stdout
            found += [f"{link['ifname']} {direction} {word}" for word in out.split() if word.startswith("podnet_")]
    return found


def test_a_node_switched_back_to_nftables_loses_the_ebpf_programs_and_enforces_by_nftables(lab):
    """(Last in this module: node-1 runs nftables from here on.)"""
    pins = os.path.dirname(policy_maps(lab))
    assert podnet_filters(lab, "node-1") and os.listdir(f"{pins}/progs")
    since = log_offsets(lab)
    restart_agent(lab.state, "node-1", options={"--service-proxy": "nftables", "--policy-dataplane": "nftables"})
    wait_programmed(lab.state, lab.store().kv.revision(), 30)
    fresh = log_since(lab, "node-1", since)
    assert "the eBPF services dataplane this node ran before is removed" in fresh, fresh
    assert "the eBPF policy dataplane this node ran before is removed" in fresh, fresh
    assert podnet_filters(lab, "node-1") == []
    assert not os.path.exists(f"{pins}/links") and os.listdir(f"{pins}/progs") == []
    enforced(lab)
    assert reaches(lab, "local-client", service(lab))
    assert not reaches(lab, "local-client", f"tcp:{ip_of(lab, 'intruder')}:9000")
