"""Lab files: defaults filled in, every error naming the file, the lab and the field."""

from pathlib import Path

import pytest
import yaml

from podnet.errors import ValidationError
from podnet.lab.endpoints import endpoint_slices
from podnet.lab.runtime import max_common_version, pod_capability_args, result_ips
from podnet.lab.spec import load_lab, parse_lab, parse_quantity
from podnet.model.objects import Namespace, Pod, PodIP, PodStatus, Service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"

BASE = {
    "apiVersion": "podnet.io/v1",
    "kind": "Lab",
    "metadata": {"name": "t"},
    "spec": {
        "underlay": {"cidr": "10.99.0.0/24"},
        "nodes": [{"name": "node-1", "labels": {"zone": "a"}}, {"name": "node-2"}],
        "pods": [{"name": "web-1", "node": "node-1", "labels": {"app": "web"},
                  "ports": [{"name": "http", "containerPort": 8080}]}],
    },
}


def lab(**spec_changes):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["spec"].update(spec_changes)
    return doc


def parse(doc, file="lab.yaml"):
    return parse_lab(yaml.safe_dump(doc), file)


def error(doc) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        parse(doc)
    return e.value


def test_minimal_lab_gets_addresses_default_pool_and_namespace():
    spec = parse(lab())
    assert spec.name == "t"
    assert spec.gateway == "10.99.0.1"
    assert [(n.index, n.name, n.address) for n in spec.nodes] == [(1, "node-1", "10.99.0.11"),
                                                                  (2, "node-2", "10.99.0.12")]
    (pool,) = spec.pools
    assert pool.spec.cidr == "10.244.0.0/16" and pool.spec.nat_outgoing
    ns = [o for o in spec.objects if isinstance(o, Namespace)]
    assert [n.name for n in ns] == ["default"]
    assert ns[0].labels["kubernetes.io/metadata.name"] == "default"
    (pod,) = spec.pods
    assert pod.spec.node_name == "node-1" and pod.named_port("http", "TCP") == 8080
    node = spec.node_objects()[0]
    assert node.internal_ip == "10.99.0.11" and node.labels == {"zone": "a"}


def test_error_names_file_lab_and_field():
    e = error(lab(pods=[{"name": "web-1", "node": "node-9"}]))
    assert e.where == "lab.yaml (Lab/t)"
    assert e.field == "spec.pods[0].node"
    assert "node-9" in str(e) and "node-1, node-2" in str(e)


@pytest.mark.parametrize("change, field, text", [
    ({"underlay": {"cidr": "10.99.0.1/24"}}, "spec.underlay.cidr", "not a valid CIDR"),
    ({"underlay": {"cidr": "10.99.0.0/29"}}, "spec.underlay.cidr", "too small"),
    ({"underlay": {"cidr": "10.99.0.0/24", "mtu": 9000}}, "spec.underlay.mtu", "unknown field"),
    ({"nodes": []}, "spec.nodes", "at least one node"),
    ({"nodes": [{"name": "Node_1"}]}, "spec.nodes[0].name", "invalid node name"),
    ({"nodes": [{"name": "a"}, {"name": "a"}]}, "spec.nodes[1].name", "listed twice"),
    ({"external": {"address": "10.99.0.200/24"}}, "spec.external.address", "overlaps the underlay"),
    ({"external": {"address": "10.98.0.10"}}, "spec.external.address", "prefix length"),
    ({"external": {"address": "10.98.0.10/24", "dns": "yes"}}, "spec.external.dns", "expected true or a mapping"),
    ({"external": {"address": "10.98.0.10/24", "dns": {"zone": "a..test"}}}, "spec.external.dns.zone",
     "not a domain name"),
    ({"external": {"address": "10.98.0.10/24", "dns": {"zone": "cluster.local"}}}, "spec.external.dns.zone",
     "overlaps the cluster domain"),
    ({"external": {"address": "10.98.0.10/24", "dns": {"records": {"www": "10.98.0"}}}},
     "spec.external.dns.records", "not an IP address"),
    ({"external": {"address": "10.98.0.10/24", "dns": {"records": {"Web_1": "10.98.0.1"}}}},
     "spec.external.dns.records", "relative to the zone"),
    ({"external": {"address": "10.98.0.10/24", "dns": {"ttl": 5}}}, "spec.external.dns.ttl", "unknown field"),
    ({"pods": [{"name": "p", "node": "node-1", "ports": [{"containerPort": 70000}]}]},
     "spec.pods[0].ports[0].containerPort", "out of range"),
    ({"pods": [{"name": "p", "node": "node-1", "ports": [{"containerPort": 80}, {"containerPort": 80}]}]},
     "spec.pods[0].ports", "listed twice"),
    ({"pods": [{"name": "p", "node": "node-1"}, {"name": "p", "node": "node-2"}]}, "spec.pods[1]", "defined twice"),
    ({"pods": [{"name": "p", "node": "node-1", "annotations": {"kubernetes.io/ingress-bandwidth": "fast"}}]},
     "spec.pods[0].annotations", "not a quantity"),
    ({"cni": {"chain": ["podnet-cni"]}}, "spec.cni.chain", "always first"),
    ({"cni": {"plugin": "flannel"}}, "spec.cni.plugin", "podnet"),
    ({"serviceCIDR": "10.99.0.0/16"}, "spec.serviceCIDR", "overlaps"),
    ({"nodes": [{"name": "n", "policyDataplane": "ebpf", "serviceProxy": "iptables"}]}, "spec.nodes[0]",
     "policyDataplane: ebpf needs serviceProxy: ebpf, not iptables"),
])
def test_spec_errors_name_the_field(change, field, text):
    e = error(lab(**change))
    assert e.field == field, str(e)
    assert text in str(e)


def test_external_dns():
    assert parse(lab(external={"address": "10.98.0.10/24"})).external.dns is None
    assert parse(lab(external={"address": "10.98.0.10/24", "dns": False})).external.dns is None
    ext = parse(lab(external={"address": "10.98.0.10/24", "dns": True})).external
    assert ext.dns.zone == "example.test"
    assert ext.dns_hosts() == [("www.example.test", "10.98.0.10")]  # the external host itself
    ext = parse(lab(external={"address": "10.98.0.10/24", "dns": {
        "zone": "Corp.Test.", "records": {"@": "192.0.2.1", "api.v1": "192.0.2.2", "v6": "2001:db8::1"}}})).external
    assert ext.dns_hosts() == [("corp.test", "192.0.2.1"), ("api.v1.corp.test", "192.0.2.2"),
                               ("v6.corp.test", "2001:db8::1")]


def test_too_many_nodes_for_the_underlay():
    e = error(lab(underlay={"cidr": "10.99.0.0/28"}, nodes=[{"name": f"n{i}"} for i in range(5)], pods=[]))
    assert e.field == "spec.nodes" and "room for 4" in str(e)


def test_header_errors():
    doc = lab()
    doc["kind"] = "Cluster"
    assert error(doc).field == "kind"
    doc = lab()
    doc["apiVersion"] = "v1"
    assert error(doc).field == "apiVersion"
    doc = lab()
    doc["metadata"]["name"] = "x" * 40
    assert error(doc).field == "metadata.name"


def test_yaml_errors_and_document_count(tmp_path):
    with pytest.raises(ValidationError, match=r"lab.yaml:2:\d+: not valid YAML"):
        parse_lab("kind: Lab\n  bad: [", "lab.yaml")
    with pytest.raises(ValidationError, match="exactly one YAML document"):
        parse_lab("kind: Lab\n---\nkind: Lab\n", "lab.yaml")
    with pytest.raises(ValidationError, match="no such file"):
        load_lab(tmp_path / "missing.yaml")


def test_a_lab_file_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    f = tmp_path / "lab.yaml"
    f.write_bytes(yaml.safe_dump(BASE).encode() + b"# caf\xe9\n")
    with pytest.raises(ValidationError) as e:
        load_lab(f)
    assert str(e.value).startswith(f"{f}:") and "not valid UTF-8 (byte 0xe9)" in str(e.value)


def test_inline_manifest_errors_use_the_manifest_validator():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 99999}]}}
    e = error(lab(manifests=[{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}, svc]))
    assert e.where == "lab.yaml: spec.manifests[1] (Service/web)"
    assert e.field == "spec.ports[0].port"
    e = error(lab(manifests=[{"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}}]))
    assert e.field == "kind" and "unknown kind" in str(e)


def test_manifest_rules_specific_to_labs():
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-3"}}
    assert "spec.nodes" in str(error(lab(manifests=[node])))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"nodeName": "elsewhere"}}
    e = error(lab(manifests=[pod]))
    assert e.field == "spec.nodeName" and "no scheduler" in str(e)
    pool = {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.99.0.0/16"}}
    e = error(lab(manifests=[pool]))
    assert e.field == "spec.cidr" and "overlaps spec.underlay.cidr" in str(e)
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}
    assert "appears twice" in str(error(lab(manifests=[ns, ns])))
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"clusterIP": "10.1.2.3", "ports": [{"port": 80}]}}
    assert error(lab(manifests=[svc])).field == "spec.clusterIP"


def test_manifest_pods_namespaces_and_pools_are_kept():
    pool = {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "direct"},
            "spec": {"cidr": "10.200.0.0/16", "encapsulation": "None"}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db", "namespace": "shop"},
           "spec": {"nodeName": "node-2", "containers": [{"name": "c", "ports": [{"containerPort": 5432}]}]}}
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}
    spec = parse(lab(manifests=[pool, pod, ns]))
    assert [p.name for p in spec.pools] == ["direct"]
    assert [p.ref for p in spec.pods] == ["Pod/default/web-1", "Pod/shop/db"]
    shop = next(o for o in spec.objects if isinstance(o, Namespace) and o.name == "shop")
    assert shop.labels == {"team": "a", "kubernetes.io/metadata.name": "shop"}
    assert not any(isinstance(o, Pod) for o in spec.objects)


def test_host_network_pods():
    spec = parse(lab(pods=[{"name": "h", "node": "node-2", "hostNetwork": True, "ports": [{"containerPort": 9100}]}]))
    assert spec.pods[0].spec.host_network and spec.pods[0].spec.node_name == "node-2"


def test_bridge_plugin_needs_a_block_per_node():
    pool = {"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "tiny"},
            "spec": {"cidr": "10.200.0.0/26", "blockSize": 26}}
    e = error(lab(cni={"plugin": "bridge"}, manifests=[pool]))
    assert e.field == "spec.cni.plugin" and "1 blocks" in str(e)


def test_chain_shorthand_gets_capabilities():
    spec = parse(lab(cni={"chain": ["portmap", "tuning", {"type": "bandwidth", "capabilities": {"bandwidth": True}}]}))
    confs = spec.cni.chain_configs()
    assert confs[0] == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    assert confs[1] == {"type": "tuning"}
    assert confs[2]["capabilities"] == {"bandwidth": True}


@pytest.mark.parametrize("name", ["demo.yaml", "vxlan.yaml", "direct.yaml"])
def test_examples_are_valid(name):
    spec = load_lab(EXAMPLES / name)
    assert spec.pods and spec.nodes


def test_quantities():
    assert parse_quantity("10M") == 10_000_000
    assert parse_quantity("1Gi") == 2**30
    assert parse_quantity("1.5k") == 1500
    with pytest.raises(ValueError):
        parse_quantity("0")


def test_capability_args_from_pod():
    spec = parse(lab(pods=[{"name": "p", "node": "node-1",
                            "annotations": {"kubernetes.io/egress-bandwidth": "10M"},
                            "ports": [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}]}]))
    caps = pod_capability_args(spec.pods[0])
    assert caps["portMappings"] == [{"hostPort": 8080, "containerPort": 80, "protocol": "udp"}]
    assert caps["bandwidth"] == {"egressRate": 10_000_000, "egressBurst": 2**31 - 1}


def test_result_ips_and_versions():
    result = {"interfaces": [{"name": "cali1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
              "ips": [{"address": "10.0.0.9/32", "interface": 0}, {"address": "10.244.0.5/32", "interface": 1}]}
    assert result_ips(result) == ["10.244.0.5", "10.0.0.9"]
    assert max_common_version([["0.4.0", "1.0.0", "1.1.0"], ["1.0.0", "1.1.0"]]) == "1.1.0"
    assert max_common_version([["1.0.0", "1.1.0"], ["0.4.0", "1.0.0"]]) == "1.0.0"
    assert max_common_version([["0.3.1", "0.4.0"], ["0.4.0"]]) == "0.4.0"


def _running(pod: Pod, ip: str) -> Pod:
    return pod.model_copy(update={"status": PodStatus(phase="Running", pod_ip=ip, pod_ips=[PodIP(ip=ip)])})


def test_endpoint_slices_resolve_named_ports_per_pod():
    svc = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                  "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}})
    spec = parse(lab(pods=[
        {"name": "a", "node": "node-1", "labels": {"app": "web"}, "ports": [{"name": "http", "containerPort": 8080}]},
        {"name": "b", "node": "node-2", "labels": {"app": "web"}, "ports": [{"name": "http", "containerPort": 9090}]},
        {"name": "c", "node": "node-2", "labels": {"app": "web"}, "ports": [{"name": "http", "containerPort": 8080}]},
        {"name": "d", "node": "node-2", "labels": {"app": "db"}},
        {"name": "e", "node": "node-2", "labels": {"app": "web"}},  # not running
    ]))
    pods = [_running(p, f"10.244.0.{i + 2}") for i, p in enumerate(spec.pods[:4])] + [spec.pods[4]]
    slices = endpoint_slices([svc], pods, spec.node_objects())
    by_port = {s.ports[0].port: s for s in slices}
    assert set(by_port) == {8080, 9090}
    assert [e.target_ref.name for e in by_port[8080].endpoints] == ["a", "c"]
    assert by_port[8080].endpoints[0].node_name == "node-1"
    assert by_port[8080].service_name == "web"
    assert all(e.conditions.is_ready for s in slices for e in s.endpoints)


def test_endpoint_hostname_from_a_pod_whose_subdomain_is_the_service():
    svc = Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
                                  "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}})
    pods = [Pod.model_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "labels": {"app": "db"}},
                                "spec": {"nodeName": "node-1", "hostname": n, "subdomain": sub}})
            for n, sub in (("db-0", "db"), ("db-1", "other"), ("db-2", None))]
    (s,) = endpoint_slices([svc], [_running(p, f"10.244.0.{i + 2}") for i, p in enumerate(pods)])
    assert [(e.target_ref.name, e.hostname) for e in s.endpoints] == [("db-0", "db-0"), ("db-1", None), ("db-2", None)]
