"""Object model: upstream defaulting and validation messages that name the field."""

import pytest
from pydantic import ValidationError

from podnet.model.objects import (
    EndpointSlice,
    IPPool,
    NetworkPolicy,
    Service,
    kind_for,
)


def svc(spec, name="web"):
    return Service.model_validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})


def netpol(spec):
    return NetworkPolicy.model_validate({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"}, "spec": spec,
    })


def pool(spec):
    return IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "p"}, "spec": spec})


def test_service_defaults_follow_the_api_server():
    s = svc({"type": "NodePort", "ports": [{"port": 80}], "sessionAffinity": "ClientIP"})
    assert s.namespace == "default"
    assert s.spec.ports[0].protocol == "TCP"
    assert s.spec.ports[0].target_port == 80
    assert s.spec.external_traffic_policy == "Cluster"
    assert s.spec.internal_traffic_policy == "Cluster"
    assert s.spec.session_affinity_config.client_ip.timeout_seconds == 10800


def test_service_keeps_named_target_port():
    s = svc({"ports": [{"port": 80, "targetPort": "http"}]})
    assert s.spec.ports[0].target_port == "http"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ports": [{"port": 80}, {"port": 81}]}, "needs a name when there is more than one"),
        ({"ports": [{"port": 70000}]}, "out of range"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "'TCP', 'UDP' or 'SCTP'"),
        ({"type": "ExternalName"}, "needs spec.externalName"),
        ({"ports": [{"port": 80, "nodePort": 30001}]}, "nodePort may not be set"),
        ({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}, "invalid port name"),
        ({"ports": []}, "at least one port"),
    ],
)
def test_service_rejects(spec, message):
    with pytest.raises(ValidationError, match=message):
        svc(spec)


def test_service_name_must_be_dns1035():
    with pytest.raises(ValidationError, match="DNS-1035"):
        svc({"ports": [{"port": 80}]}, name="1web")


def test_policy_types_default_like_the_api_server():
    assert netpol({"podSelector": {}}).spec.policy_types == ["Ingress"]
    assert netpol({"podSelector": {}, "egress": [{}]}).spec.policy_types == ["Ingress", "Egress"]
    # An empty egress list does not imply Egress (upstream checks len(egress) != 0).
    assert netpol({"podSelector": {}, "egress": []}).spec.policy_types == ["Ingress"]
    assert netpol({"podSelector": {}, "policyTypes": ["Egress"]}).spec.policy_types == ["Egress"]


def test_policy_port_defaults_to_tcp_and_keeps_named_ports():
    p = netpol({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}, {"port": 81, "endPort": 90}]}]})
    ports = p.spec.ingress[0].ports
    assert [x.protocol for x in ports] == ["TCP", "TCP"]
    assert ports[0].port == "serve-80-tcp"
    assert ports[1].end_port == 90


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}, "endPort needs a numeric port"),
        ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "below port"),
        ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "numeric port"),
        ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]},
         "not inside"),
        ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}, "podSelector": {}}]}]},
         "not both"),
        ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "must set one of"),
        ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "'TCP', 'UDP' or 'SCTP'"),
        ({"ingress": []}, "podSelector"),
    ],
)
def test_policy_rejects(spec, message):
    with pytest.raises(ValidationError, match=message):
        netpol(spec)


def test_pool_defaults_and_limits():
    p = pool({"cidr": "10.244.0.0/16"})
    assert p.spec.block_size == 26
    assert p.spec.allowed_uses == ["Workload", "Tunnel"]
    assert pool({"cidr": "fd00::/48"}).spec.block_size == 122
    with pytest.raises(ValidationError, match="host bits"):
        pool({"cidr": "10.244.0.1/16"})
    with pytest.raises(ValidationError, match="larger than the pool"):
        pool({"cidr": "10.244.0.0/26", "blockSize": 24})
    with pytest.raises(ValidationError, match="out of range"):
        pool({"cidr": "10.244.0.0/16", "blockSize": 33})


def test_endpoint_conditions_follow_upstream_nil_rules():
    es = EndpointSlice.model_validate({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "web"}},
        "endpoints": [
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        ],
    })
    a, b = es.endpoints
    assert a.conditions.is_ready and a.conditions.is_serving and not a.conditions.is_terminating
    assert not b.conditions.is_ready and b.conditions.is_serving and b.conditions.is_terminating
    assert es.service_name == "web"


def test_endpoint_slice_address_type_is_enforced():
    with pytest.raises(ValidationError, match="not IPv4"):
        EndpointSlice.model_validate({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "s"}, "endpoints": [{"addresses": ["fd00::1"]}],
        })


def test_cluster_scoped_kinds_refuse_a_namespace():
    with pytest.raises(ValidationError, match="cluster-scoped"):
        IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool",
                               "metadata": {"name": "p", "namespace": "x"}, "spec": {"cidr": "10.0.0.0/8"}})


def test_kind_names_resolve_like_kubectl():
    assert kind_for("po").KIND == "Pod"
    assert kind_for("services").KIND == "Service"
    assert kind_for("NetworkPolicy").KIND == "NetworkPolicy"
    with pytest.raises(ValueError, match="unknown kind"):
        kind_for("deployment")


def test_metadata_fields_the_api_server_sets_are_accepted_and_a_misspelt_one_is_not():
    import pydantic

    from podnet.model.objects import EndpointSlice

    meta = {"name": "web-x1", "generation": 3, "generateName": "web-", "finalizers": ["a/b"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u"}],
            "managedFields": [{"manager": "kube-controller-manager"}]}
    sl = EndpointSlice.model_validate({"metadata": meta, "addressType": "IPv4", "endpoints": []})
    assert sl.name == "web-x1"
    with pytest.raises(pydantic.ValidationError, match="generaton"):
        EndpointSlice.model_validate({"metadata": {"name": "x", "generaton": 1}, "addressType": "IPv4",
                                      "endpoints": []})


def test_an_endpoint_slice_holds_at_most_a_thousand_endpoints():
    import pydantic

    from podnet.model.objects import EndpointSlice

    def slice_of(n):
        return {"metadata": {"name": "web-x1"}, "addressType": "IPv4",
                "endpoints": [{"addresses": [f"10.1.{i // 250}.{i % 250 + 1}"]} for i in range(n)]}

    assert len(EndpointSlice.model_validate(slice_of(1000)).endpoints) == 1000
    with pytest.raises(pydantic.ValidationError, match="1001 endpoints: an EndpointSlice holds at most 1000"):
        EndpointSlice.model_validate(slice_of(1001))
