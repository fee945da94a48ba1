"""A Service applied with `podnet apply` to a lab's store gets its ClusterIP from the
lab's Service CIDR (the cluster configuration the lab wrote), and the lab's agents,
which take the Service CIDR from the same place, carry traffic to it."""

from __future__ import annotations

import ipaddress
import os

import pytest

from podnet.cli.main import main
from podnet.lab.cluster import wait_endpoints, wait_programmed
from podnet.model.objects import Service
from tests.kernel.labs import running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

# "api" hashes outside 10.96.0.0/16 in the Kubernetes default 10.96.0.0/12: applied with
# that default, its ClusterIP would fall outside the lab's Service CIDR.
SVC = ("apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: default}\n"
       "spec: {selector: {app: api}, ports: [{name: http, port: 80, targetPort: http}]}\n")


def test_services_applied_to_a_lab_store_get_cluster_ips_its_agents_program(tmp_path, monkeypatch):
    monkeypatch.delenv("PODNET_SERVICE_CIDR", raising=False)
    spec = {"underlay": {"cidr": "10.98.3.0/24"}, "nodes": [{"name": "node-1"}, {"name": "node-2"}],
            "pods": [{"name": "api-1", "node": "node-2", "labels": {"app": "api"},
                      "ports": [{"name": "http", "containerPort": 8080}]},
                     {"name": "c1", "node": "node-1", "ports": [{"containerPort": 9000}]}]}
    with running_lab(spec, "cc") as lab:
        manifest = tmp_path / "api.yaml"
        manifest.write_text(SVC)
        assert main(["--store", lab.state.data["store"], "apply", "-f", str(manifest)]) == 0
        store = lab.store()
        svc = store.get(Service, "api", "default")
        assert svc is not None
        assert ipaddress.ip_address(svc.spec.cluster_ip) in ipaddress.ip_network("10.96.0.0/16"), svc.spec.cluster_ip
        # The lab's endpoint controller gives it its slice; the agents program both.
        wait_endpoints(lab.state, int(svc.metadata.resource_version or 0), 30)
        wait_programmed(lab.state, store.kv.revision(), 30)
        (result,) = lab.probe("c1", [f"tcp:{svc.spec.cluster_ip}:80"], timeout=2)
        assert result.get("ok") and result.get("name") == "api-1", result
