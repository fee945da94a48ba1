"""One cluster configuration in the store: the Service CIDR `podnet apply` allocates
ClusterIPs from is the one the agents program and the lab writes."""

from __future__ import annotations

import ipaddress
import json

import pytest

from podnet.cli.main import main
from podnet.cluster import CLUSTER_CONFIG_KEY, agent_settings, ensure_cluster_config
from podnet.errors import PodnetError
from podnet.store import open_store

SVC = ("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\n"
       "spec: {selector: {app: api}, ports: [{port: 80}]}\n")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("PODNET_SERVICE_CIDR", raising=False)
    return f"sqlite://{tmp_path}/podnet.db"


def apply(capsys, store, tmp_path, text, *flags):
    f = tmp_path / "m.yaml"
    f.write_text(text)
    code = main(["--store", store, "apply", "-f", str(f), *flags])
    return code, capsys.readouterr()


def cluster_ip(capsys, store) -> str:
    assert main(["--store", store, "get", "svc", "api", "-o", "json"]) == 0
    return json.loads(capsys.readouterr().out)["spec"]["clusterIP"]


def test_apply_allocates_from_the_service_cidr_the_store_holds(store, tmp_path, capsys):
    with open_store(store) as kv:  # as `lab up` writes it, with the lab's /16
        ensure_cluster_config(kv, service_cidr="10.96.0.0/16")
    code, out = apply(capsys, store, tmp_path, SVC)
    assert code == 0, out
    assert ipaddress.ip_address(cluster_ip(capsys, store)) in ipaddress.ip_network("10.96.0.0/16")


def test_the_first_apply_sets_the_service_cidr_and_later_ones_may_only_repeat_it(store, tmp_path, capsys):
    assert apply(capsys, store, tmp_path, SVC, "--service-cidr", "10.97.0.0/24")[0] == 0
    with open_store(store) as kv:
        assert kv.get(CLUSTER_CONFIG_KEY).value == {"serviceCIDR": "10.97.0.0/24", "clusterDomain": "cluster.local"}
    assert apply(capsys, store, tmp_path, SVC)[0] == 0
    assert apply(capsys, store, tmp_path, SVC, "--service-cidr", "10.97.0.0/24")[0] == 0
    code, out = apply(capsys, store, tmp_path, SVC.replace("name: api", "name: web"), "--service-cidr", "10.96.0.0/12")
    assert code == 1
    assert out.err.splitlines() == [
        "error: --service-cidr 10.96.0.0/12 differs from the cluster's Service CIDR 10.97.0.0/24 (store key "
        f"{CLUSTER_CONFIG_KEY}, field serviceCIDR, set once when the store was first used): leave it out to "
        "use the cluster's"]
    assert main(["--store", store, "get", "svc", "web"]) == 1  # nothing applied


def test_the_agent_takes_the_clusters_settings_and_warns_when_its_flags_differ(store):
    warnings: list[str] = []
    with open_store(store) as kv:
        assert agent_settings(kv, None, None, warnings.append) == (("10.96.0.0/12",), "cluster.local")
        ensure_cluster_config(kv, service_cidr="10.96.0.0/16")
        assert agent_settings(kv, None, None, warnings.append) == (("10.96.0.0/16",), "cluster.local")
        assert agent_settings(kv, ["10.96.0.0/16"], None, warnings.append) == (("10.96.0.0/16",), "cluster.local")
        assert warnings == []
        assert agent_settings(kv, ["10.96.0.0/12"], None, warnings.append) == (("10.96.0.0/12",), "cluster.local")
        assert warnings == [f"--service-cidr 10.96.0.0/12 overrides the cluster's Service CIDR 10.96.0.0/16 (store "
                            f"key {CLUSTER_CONFIG_KEY}): Services applied with the cluster's are not served here"]


def test_a_damaged_cluster_configuration_is_named(store):
    with open_store(store) as kv:
        kv.put(CLUSTER_CONFIG_KEY, {"serviceCIDR": "10.96.0.1/12"})
        with pytest.raises(PodnetError, match=f"store key {CLUSTER_CONFIG_KEY}: field serviceCIDR '10.96.0.1/12' "
                                              "is not a valid CIDR"):
            agent_settings(kv, None, None, print)
        # the domain goes into every pod's resolv.conf: a trailing newline would split its search line
        kv.put(CLUSTER_CONFIG_KEY, {"serviceCIDR": "10.96.0.0/12", "clusterDomain": "cluster.local\n"})
        with pytest.raises(PodnetError) as e:
            agent_settings(kv, None, None, print)
        assert str(e.value).startswith(f"store key {CLUSTER_CONFIG_KEY}: field clusterDomain "
                                       "'cluster.local\\n' is not a domain name")
        kv.put(CLUSTER_CONFIG_KEY, {"serviceCIDR": "10.96.0.0/12"})
        for bad in ("cluster.local\n", "Cluster.Local", "a..b", ""):
            with pytest.raises(PodnetError, match="--cluster-domain .* is not a domain name"):
                agent_settings(kv, None, bad, print)
