"""The k8s.v1.cni.cncf.io/networks annotation in both forms, interface names and clear errors (no root)."""

from __future__ import annotations

import json

import pytest

from podnet.multinet.selection import NetworkSelection, SelectionError, interface_names, parse_networks


def test_the_text_form_with_namespaces_and_interfaces():
    got = parse_networks(" underlay, storage/fast@stor0 ,bridge-net ", "team-a")
    assert [(s.namespace, s.name, s.interface) for s in got] == [
        ("team-a", "underlay", None), ("storage", "fast", "stor0"), ("team-a", "bridge-net", None)]
    assert interface_names(got, "eth0") == ["net1", "stor0", "net3"]


def test_the_json_form_with_every_field():
    value = json.dumps([
        {"name": "underlay", "namespace": "default", "interface": "data0", "ips": ["10.99.0.70/24"],
         "mac": "02-00-00-00-00-0A", "default-route": ["10.99.0.1"], "cni-args": {"vlan": 7},
         "portMappings": [{"hostPort": 8080, "containerPort": 80}], "bandwidth": {"ingressRate": 1000}},
        {"name": "bridge-net", "interfaceRequest": "br1"},
    ])
    a, b = parse_networks(value, "team-a")
    assert (a.namespace, a.interface, a.ips, a.mac, a.default_route) == (
        "default", "data0", ("10.99.0.70/24",), "02:00:00:00:00:0a", ("10.99.0.1",))
    assert a.cni_args == {"vlan": 7}
    assert a.capability_args() == {"ips": ["10.99.0.70/24"], "mac": "02:00:00:00:00:0a",
                                   "portMappings": [{"hostPort": 8080, "containerPort": 80}],
                                   "bandwidth": {"ingressRate": 1000}}
    assert (b.namespace, b.interface) == ("team-a", "br1")
    assert interface_names([a, b], "eth0") == ["data0", "br1"]


def test_an_empty_annotation_asks_for_nothing():
    assert parse_networks("", "ns") == [] and parse_networks("  ", "ns") == []
    assert parse_networks("[]", "ns") == []


@pytest.mark.parametrize("value, words", [
    ("a,,b", "entry 1 is empty"),
    ("x/y/z", "more than one '/'"),
    ("a@b@c", "more than one '@'"),
    ("Under_Lay", "is not a NetworkAttachmentDefinition name"),
    ("NS/net", "namespace 'NS' is not a namespace name"),
    ("net@this-name-is-too-long", "longer than 15 bytes"),
    ('[{"name": "a"', "not valid JSON"),
    ('{"name": 5}', "network name '5'"),
    ('[{"namespace": "x"}]', "entry 0: name is missing"),
    ('[{"name": "a", "interfce": "x"}]', "unknown key 'interfce'"),
    ('[{"name": "a", "ips": ["10.0.0.300"]}]', "'10.0.0.300' is neither an IP address nor a CIDR"),
    ('[{"name": "a", "ips": "10.0.0.1"}]', "ips must be a list of strings"),
    ('[{"name": "a", "mac": "zz:00:00:00:00:00"}]', "is not a MAC address"),
    ('[{"name": "a", "default-route": ["gw"]}]', "default-route: 'gw' is not an IP address"),
    ('[{"name": "a", "cni-args": [1]}]', "cni-args must be an object"),
    ('[{"name": "a", "default-route": ["10.0.0.1"]}, {"name": "b", "default-route": ["10.1.0.1"]}]',
     "more than one IPv4 gateway"),
    ('"just text"', "expected a JSON list of objects, got str"),
])
def test_bad_annotations_say_what_is_wrong_and_where(value, words):
    with pytest.raises(SelectionError) as err:
        parse_networks(value, "ns")
    assert words in str(err.value), str(err.value)


def test_duplicate_interface_names_are_refused():
    sels = parse_networks("a@net2, b", "ns")
    with pytest.raises(SelectionError, match="entry 1 \\(ns/b\\): interface net2 is already ns/a's"):
        interface_names(sels, "eth0")
    with pytest.raises(SelectionError, match="interface eth0 is already the cluster network's"):
        interface_names([NetworkSelection("a", "ns", interface="eth0")], "eth0")
