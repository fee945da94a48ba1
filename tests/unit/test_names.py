"""Every name and label validator refuses a trailing newline and a NUL (Python's `$`
also matches before a final newline) and holds to Kubernetes' length limits."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from podnet.cni.errors import CNIError
from podnet.cni.spec import check_container_id, check_network_name, parse_cni_args
from podnet.lab.spec import CniSpec, ExternalDnsSpec, LabMeta, LabNode
from podnet.model import names
from podnet.model.objects import Namespace, NetworkPolicyPort, Pod, Service, ServicePort, check_port_name
from podnet.model.selectors import LabelSelector, check_label_key, check_label_value


def _must(ok: bool) -> None:
    if not ok:
        raise ValueError("refused")


def meta_name(v: str) -> object:
    return Pod.model_validate({"metadata": {"name": v}})


def namespace(v: str) -> object:
    return Pod.model_validate({"metadata": {"name": "p", "namespace": v}})


def namespace_object(v: str) -> object:
    return Namespace.model_validate({"metadata": {"name": v}})


def service_name(v: str) -> object:
    return Service.model_validate({"metadata": {"name": v}, "spec": {"ports": [{"port": 80}]}})


def target_port_name(v: str) -> object:
    return ServicePort.model_validate({"port": 80, "targetPort": v})


def container_port_name(v: str) -> object:
    return Pod.model_validate({"metadata": {"name": "p"}, "spec": {
        "containers": [{"name": "c", "ports": [{"name": v, "containerPort": 80}]}]}})


def policy_port_name(v: str) -> object:
    return NetworkPolicyPort.model_validate({"port": v})


def label_prefix(v: str) -> object:
    return check_label_key(f"{v}/app")


def selector_value(v: str) -> object:
    return LabelSelector.model_validate({"matchExpressions": [{"key": "app", "operator": "In", "values": [v]}]})


def cni_namespace(v: str) -> object:
    return parse_cni_args(f"K8S_POD_NAMESPACE={v}")


def cni_pod_name(v: str) -> object:
    return parse_cni_args(f"K8S_POD_NAME={v}")


def cni_network_name(v: str) -> object:
    return check_network_name({"name": v, "type": "podnet-cni"})


def lab_node(v: str) -> object:
    return LabNode.model_validate({"name": v})


def lab_name(v: str) -> object:
    return LabMeta.model_validate({"name": v})


def lab_chain(v: str) -> object:
    return CniSpec.model_validate({"chain": [v]})


def lab_zone(v: str) -> object:
    return ExternalDnsSpec.model_validate({"zone": v})


def subdomain(n: int) -> str:
    """A valid DNS-1123 subdomain of exactly n characters (labels of at most 63)."""
    parts, left = [], n
    while left > 63:
        parts.append("a" * 62)
        left -= 63
    parts.append("b" * left)
    return ".".join(parts)


# validator -> (a short valid value, a valid value at the upstream length limit or None)
CASES: dict[str, tuple[Callable[[str], object], str, str | None]] = {
    "names.is_dns1123_subdomain": (lambda v: _must(names.is_dns1123_subdomain(v)), "a.b", subdomain(253)),
    "names.is_dns1123_label": (lambda v: _must(names.is_dns1123_label(v)), "web", "a" * 63),
    "names.is_dns1035_label": (lambda v: _must(names.is_dns1035_label(v)), "web", "a" * 63),
    "names.is_iana_svc_name": (lambda v: _must(names.is_iana_svc_name(v)), "http", "a" * 15),
    "metadata.name": (meta_name, "web", subdomain(253)),
    "metadata.namespace": (namespace, "shop", "n" * 63),
    "Namespace name": (namespace_object, "shop", "n" * 63),
    "Service name": (service_name, "web", "s" * 63),
    "port name": (check_port_name, "http", "http-" + "x" * 10),
    "targetPort name": (target_port_name, "http", "p" * 15),
    "containerPort name": (container_port_name, "http", "p" * 15),
    "NetworkPolicy port name": (policy_port_name, "http", "p" * 15),
    "label key name": (check_label_key, "app", "k" * 63),
    "label key prefix": (label_prefix, "example.com", subdomain(253)),
    "label value": (check_label_value, "web", "v" * 63),
    "selector value": (selector_value, "web", "v" * 63),
    "CNI K8S_POD_NAMESPACE": (cni_namespace, "shop", "n" * 63),
    "CNI K8S_POD_NAME": (cni_pod_name, "web-0", subdomain(253)),
    "CNI_CONTAINERID": (check_container_id, "abc123", "c" * 200),
    "CNI network name": (cni_network_name, "net", None),
    "lab node name": (lab_node, "node-1", "n" * 63),
    "lab name": (lab_name, "demo", "l" * 32),
    "lab chain plugin": (lab_chain, "portmap", None),
    "lab external zone": (lab_zone, "example.test", None),
}
LIMITED = sorted(k for k, (_, _, limit) in CASES.items() if limit is not None)
REFUSED = (ValueError, CNIError)


@pytest.mark.parametrize("what", CASES)
def test_a_valid_value_passes(what):
    check, valid, _ = CASES[what]
    check(valid)


@pytest.mark.parametrize("suffix", ["\n", "\x00", "\r\n"], ids=["newline", "nul", "crlf"])
@pytest.mark.parametrize("what", CASES)
def test_a_trailing_newline_or_nul_is_refused(what, suffix):
    check, valid, _ = CASES[what]
    with pytest.raises(REFUSED):
        check(valid + suffix)


@pytest.mark.parametrize("what", CASES)
def test_a_nul_inside_is_refused(what):
    check, valid, _ = CASES[what]
    with pytest.raises(REFUSED):
        check(valid[:1] + "\x00" + valid[1:])


@pytest.mark.parametrize("what", LIMITED)
def test_the_length_limit_holds_exactly(what):
    check, _, at_limit = CASES[what]
    assert at_limit is not None
    check(at_limit)
    with pytest.raises(REFUSED):
        check(at_limit[:-1] + at_limit[-1] * 2)


def test_a_trailing_newline_in_a_manifest_name_is_an_error_naming_the_field():
    from podnet.errors import ValidationError
    from podnet.model.manifests import Source, parse_object

    with pytest.raises(ValidationError) as e:
        parse_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web\n"},
                      "spec": {"ports": [{"port": 80}]}}, Source("svc.yaml", 0))
    assert e.value.field == "metadata.name" and "invalid name 'web\\n'" in str(e.value)
