"""NetworkAttachmentDefinition and Attachment pools: validation with errors that name the file,
the object and the field (no root)."""

from __future__ import annotations

import json

import pytest

from podnet.errors import ValidationError
from podnet.model.manifests import ManifestErrors, parse_documents
from podnet.model.objects import NetworkAttachmentDefinition, kind_for
from podnet.multinet.netconf import NetConf, NetConfError

MACVLAN = {"cniVersion": "1.0.0", "type": "macvlan", "master": "data0", "mode": "bridge",
           "ipam": {"type": "podnet-ipam", "pools": ["global"], "subnet": "10.99.0.0/24", "gateway": "10.99.0.1"}}


def nad(config: object, name: str = "underlay") -> str:
    text = config if isinstance(config, str) else json.dumps(config)
    return (f"apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\n"
            f"metadata: {{name: {name}, namespace: team-a}}\nspec:\n  config: {json.dumps(text)}\n")


def parse(text: str):
    objs, errs = parse_documents(text, "nets.yaml")
    if errs:
        raise ManifestErrors(errs)
    return objs[0]


def test_a_nad_with_a_single_plugin_and_one_with_a_list():
    obj = parse(nad(MACVLAN))
    assert isinstance(obj, NetworkAttachmentDefinition)
    assert obj.ref == "NetworkAttachmentDefinition/team-a/underlay"
    conf = NetConf.parse(obj.spec.config)
    assert not conf.is_list and conf.plugins[0]["type"] == "macvlan"
    listed = {"cniVersion": "0.4.0", "name": "br", "plugins": [
        {"type": "bridge", "bridge": "br-pods", "ipam": {"type": "host-local", "subnet": "192.168.50.0/24"}},
        {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}]}
    conf = NetConf.parse(parse(nad(listed)).spec.config)
    assert conf.is_list and [p["type"] for p in conf.plugins] == ["bridge", "tuning"]
    assert kind_for("net-attach-def") is NetworkAttachmentDefinition
    assert kind_for("network-attachment-definitions") is NetworkAttachmentDefinition


def test_the_list_form_fills_in_the_name_version_and_cni_args():
    conf = NetConf.parse(json.dumps({k: v for k, v in MACVLAN.items() if k != "cniVersion"}))
    out = conf.conflist(default_name="underlay", default_version="0.4.0", cni_args={"vlan": "7"})
    assert out["name"] == "underlay" and out["cniVersion"] == "0.4.0"
    assert out["plugins"][0]["args"] == {"cni": {"vlan": "7"}}
    assert "cniVersion" not in out["plugins"][0] and out["plugins"][0]["type"] == "macvlan"


@pytest.mark.parametrize("config, words", [
    ("{not json", "spec.config: not valid JSON"),
    ("", "spec.config: is empty"),
    ("[1, 2]", "spec.config: expected a JSON object, got list"),
    ({"cniVersion": "1.0.0"}, "has neither type"),
    ({"type": "macvlan", "plugins": []}, "has both type and plugins"),
    ({"plugins": []}, "spec.config: plugins: expected a non-empty list"),
    ({"plugins": [{"type": "bridge"}, {"master": "x"}]}, "spec.config: plugins[1].type: required"),
    ({"type": "../../bin/sh"}, "spec.config: type: '../../bin/sh' is not a plugin name"),
    ({"type": "podnet-cni"}, "podnet-cni cannot be an additional network"),
    ({"type": "macvlan", "ipam": {"type": "/tmp/x"}}, "spec.config: ipam.type"),
    ({"type": "macvlan", "cniVersion": "9.9.9"}, "spec.config: cniVersion: '9.9.9' is not a CNI version"),
    ({"type": "macvlan", "name": "bad name"}, "spec.config: name: 'bad name' is not a network name"),
    ({"type": "macvlan", "capabilities": {"ips": "yes"}}, "spec.config: capabilities"),
    ({"type": "macvlan", "ipam": {"type": "podnet-ipam"}}, "spec.config: ipam.pools: expected a non-empty list"),
    ({"type": "macvlan", "ipam": {"type": "podnet-ipam", "pools": ["g"], "subnet": "10.0.0.1/24"}},
     "ipam.subnet: '10.0.0.1/24' is not a CIDR"),
    ({"type": "macvlan", "ipam": {"type": "podnet-ipam", "pools": ["g"], "subnet": "10.0.0.0/24",
                                  "gateway": "10.0.1.1"}}, "ipam.gateway: 10.0.1.1 is not in subnet"),
    ({"type": "macvlan", "ipam": {"type": "podnet-ipam", "pools": ["g"], "pool": "x"}}, "ipam.pool: unknown field"),
])
def test_bad_configurations_name_the_file_object_field_and_place(config, words):
    with pytest.raises(ValidationError) as err:
        parse(nad(config))
    text = str(err.value)
    assert "nets.yaml: document 0 (NetworkAttachmentDefinition/team-a/underlay)" in text
    assert "spec.config" in text and words in text, text


def test_a_nad_needs_spec_config_and_its_api_version():
    with pytest.raises(ValidationError, match="field spec.config: required field is missing"):
        parse("apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata: {name: a}\nspec: {}\n")
    with pytest.raises(ValidationError, match="apiVersion 'v1' is not served"):
        parse(nad(MACVLAN).replace("k8s.cni.cncf.io/v1", "v1"))


def test_netconf_errors_carry_the_path():
    with pytest.raises(NetConfError) as err:
        NetConf.parse(json.dumps({"plugins": [{"type": "bridge", "ipam": []}]}))
    assert err.value.path == "plugins[0].ipam"


POOL = """
apiVersion: podnet.io/v1
kind: IPPool
metadata: {name: global}
spec: {cidr: 10.99.0.64/26, blockSize: 29, allowedUses: [Attachment]SPEC}
"""


def test_an_attachment_pool_is_never_tunnelled_nor_mixed_with_other_uses():
    pool = parse(POOL.replace("SPEC", ""))
    assert pool.spec.for_attachments and pool.spec.encapsulation == "None"
    again = parse(POOL.replace("SPEC", ", encapsulation: None"))
    assert again.spec.encapsulation == "None"
    with pytest.raises(ValidationError, match="field spec: encapsulation: an Attachment pool is never tunnelled"):
        parse(POOL.replace("SPEC", ", encapsulation: VXLAN"))
    with pytest.raises(ValidationError, match="Attachment cannot be combined with other uses"):
        parse(POOL.replace("[Attachment]", "[Attachment, Workload]").replace("SPEC", ""))


def test_blocks_of_an_attachment_pool_are_not_routed_by_podnet():
    from podnet.agent.view import routing_inputs
    from podnet.model.objects import IPPool

    pools = [parse(POOL.replace("SPEC", "")),
             IPPool.model_validate({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "pods"},
                                    "spec": {"cidr": "10.244.0.0/16"}})]
    blocks = [{"cidr": "10.99.0.64/29", "pool": "global", "affinity": "host:node-2", "allocations": [],
               "attributes": []},
              {"cidr": "10.244.1.0/26", "pool": "pods", "affinity": "host:node-2", "allocations": [],
               "attributes": []}]
    got = routing_inputs(blocks, pools, [])
    assert [b.cidr for b in got.blocks] == ["10.244.1.0/26"]


def test_merging_results_leaves_the_recorded_results_as_they_were():
    """The merged result and the status entries are built from the delegates' results, which
    are also the attachment record's result cache (DEL and CHECK send them back as
    prevResult): building them must not change them (0.4.0 ips keep their "version")."""
    import copy

    from podnet.multinet.results import merge
    from podnet.multinet.status import network_status

    primary = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p"}],
               "ips": [{"version": "4", "address": "10.244.0.5/32", "interface": 0}], "dns": {}}
    delegate = {"cniVersion": "0.4.0", "interfaces": [{"name": "net1", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/p"}],
                "ips": [{"version": "4", "address": "10.70.0.9/16", "interface": 0, "gateway": "10.70.0.1"}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.70.0.1"}, {"dst": "10.80.0.0/16", "gw": "10.70.0.1"}]}
    before = copy.deepcopy((primary, delegate))
    merged = merge(primary, [("net1", delegate, ("10.70.0.1",))], "0.4.0")
    entries = network_status("podnet", "eth0", primary, [("team-a/underlay", "net1", delegate)])
    assert (primary, delegate) == before
    assert [i["name"] for i in merged["interfaces"]] == ["eth0", "net1"]
    assert merged["ips"][1] == {"version": "4", "address": "10.70.0.9/16", "interface": 1, "gateway": "10.70.0.1"}
    assert {"dst": "0.0.0.0/0", "gw": "10.70.0.1"} in merged["routes"]
    assert [e["ips"] for e in entries] == [["10.244.0.5"], ["10.70.0.9"]]
