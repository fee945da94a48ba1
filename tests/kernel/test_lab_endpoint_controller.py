"""The lab's endpoint controller keeps EndpointSlices in step with the store after `lab up`:
a Service applied with `podnet apply` to a running lab gets endpoints, a selector change
moves its traffic to the pods it now selects, a deleted pod leaves its slices, and
`lab down` leaves no controller process."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from podnet.lab.cluster import podnet_command, wait_endpoints, wait_programmed
from podnet.lab.connectivity import Lab
from podnet.lab.state import proc_starttime, proc_state
from podnet.model.objects import EndpointSlice, Service
from tests.kernel.labs import running_lab

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

HTTP = [{"name": "http", "containerPort": 8080}]


def podnet(lab: Lab, *args: str) -> str:
    proc = subprocess.run([*podnet_command(), "--store", lab.state.data["store"], *args], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def apply_service(lab: Lab, tmp_path: Path, name: str, app: str) -> Service:
    manifest = tmp_path / f"{name}-{app}.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\n"
                        f"metadata: {{name: {name}, namespace: default}}\n"
                        f"spec: {{selector: {{app: {app}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n")
    podnet(lab, "apply", "-f", str(manifest))
    svc = lab.store().get(Service, name, "default")
    assert svc is not None and svc.spec.cluster_ip
    settle(lab, int(svc.metadata.resource_version or 0))
    return svc


def settle(lab: Lab, revision: int) -> None:
    """The controller has written the slices the store up to `revision` calls for, and every
    agent has programmed them."""
    wait_endpoints(lab.state, revision, 30)
    wait_programmed(lab.state, lab.store().kv.revision(), 30)


def answers(lab: Lab, client: str, svc: Service, n: int = 12) -> Counter:
    return Counter(r.get("name") if r.get("ok") else "no answer"
                   for r in lab.probe(client, [f"tcp:{svc.spec.cluster_ip}:80"] * n, timeout=3))


def endpoints(lab: Lab, svc: str) -> set[str]:
    return {e.target_ref.name for s in lab.store().list(EndpointSlice, "default") if s.service_name == svc
            for e in s.endpoints}


def test_services_applied_to_a_running_lab_follow_their_selector(tmp_path):
    spec = {"underlay": {"cidr": "10.98.7.0/24"}, "nodes": [{"name": "node-1"}, {"name": "node-2"}],
            "pods": [{"name": "blue-1", "node": "node-1", "labels": {"app": "blue"}, "ports": HTTP},
                     {"name": "blue-2", "node": "node-2", "labels": {"app": "blue"}, "ports": HTTP},
                     {"name": "green-1", "node": "node-2", "labels": {"app": "green"}, "ports": HTTP},
                     {"name": "c1", "node": "node-1", "ports": [{"containerPort": 9000}]}]}
    with running_lab(spec, "ec") as lab:
        ctl = lab.state.process("endpoint-controller")
        assert ctl is not None and lab.state.process_pid(ctl)

        # a new Service selecting pods that already run: endpoints, and traffic, on both nodes
        name = f"web{os.getpid() % 1000}"
        svc = apply_service(lab, tmp_path, name, "blue")
        assert endpoints(lab, name) == {"blue-1", "blue-2"}
        assert set(answers(lab, "c1", svc)) == {"blue-1", "blue-2"}

        # its selector changed: the traffic follows
        svc = apply_service(lab, tmp_path, name, "green")
        assert endpoints(lab, name) == {"green-1"}
        assert set(answers(lab, "c1", svc)) == {"green-1"}

        # the pod it selects deleted: no endpoint left, nobody answers
        podnet(lab, "delete", "pod", "green-1")
        settle(lab, lab.store().kv.revision())  # the deletion is the store's last write
        assert endpoints(lab, name) == set()
        assert set(answers(lab, "c1", svc, n=3)) == {"no answer"}
    # lab down stopped the controller (gone, its PID reused, or a zombie this process has not reaped)
    assert proc_starttime(ctl["pid"]) != ctl["starttime"] or proc_state(ctl["pid"]) == "Z"
