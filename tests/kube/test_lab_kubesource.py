"""The lab's Kubernetes source without root: the EndpointSlice controller that reads and writes
the API server (lab/kubeendpoints.py) against the fake; what `lab up --source kubernetes`
refuses before it makes anything."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import podnet
from podnet.errors import PodnetError
from podnet.lab import kubeendpoints, kubesource
from podnet.lab.endpoints import MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from podnet.lab.spec import load_lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"


@pytest.fixture
def controller(api, kubeconfig, tmp_path):
    stopping = threading.Event()
    synced = tmp_path / "synced"
    t = threading.Thread(target=kubeendpoints.run, args=(kubeconfig, synced, None, stopping), daemon=True)
    t.start()

    def caught_up(rv: int) -> bool:
        """Wait until every API change up to rv is in the slices."""
        def done() -> bool:
            try:
                return int(synced.read_text()) >= rv
            except (OSError, ValueError):
                return False
        return wait(done)

    yield caught_up
    stopping.set()
    t.join(20)
    assert not t.is_alive()


def wait(predicate, timeout: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def rv(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


def slices(api, service: str) -> list[dict]:  # noqa: ANN001
    return [s for s in api.objects("discovery.k8s.io/v1", "EndpointSlice")
            if s["metadata"]["labels"].get(SERVICE_NAME_LABEL) == service]


def running_pod(api, name: str, ip: str) -> int:  # noqa: ANN001
    api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop",
                                                                 "labels": {"app": "web"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "web", "ports": [
                    {"name": "http", "containerPort": 8080}]}]}})
    return rv(api.patch_status("v1", "Pod", name, "shop", {"phase": "Running", "podIP": ip,
                                                          "podIPs": [{"ip": ip}]}))


def addresses(api, service: str) -> list[str]:  # noqa: ANN001
    return sorted(a for s in slices(api, service) for e in s.get("endpoints") or () for a in e["addresses"])


def test_the_endpoint_controller_keeps_slices_in_the_api_server(api, controller):
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    running_pod(api, "web-1", "10.244.0.5")
    assert controller(running_pod(api, "web-2", "10.244.0.6"))
    assert addresses(api, "web") == ["10.244.0.5", "10.244.0.6"]
    (made,) = slices(api, "web")
    assert made["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
    assert made["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    # A pod that goes leaves the slice (one update of the same slice).
    api.delete("v1", "Pod", "web-1", "shop")
    assert wait(lambda: addresses(api, "web") == ["10.244.0.6"])
    assert [s["metadata"]["name"] for s in slices(api, "web")] == [made["metadata"]["name"]]
    # A managed slice someone else deletes is made again.
    api.delete("discovery.k8s.io/v1", "EndpointSlice", made["metadata"]["name"], "shop")
    assert wait(lambda: addresses(api, "web") == ["10.244.0.6"])
    # The Service goes: its slices go.
    api.delete("v1", "Service", "web", "shop")
    assert wait(lambda: slices(api, "web") == [])


def test_the_source_needs_the_checkouts_api_server(monkeypatch, tmp_path):
    fake = tmp_path / "site-packages" / "podnet" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    monkeypatch.setattr(podnet, "__file__", str(fake))
    with pytest.raises(PodnetError, match=r"tests/support/fake_apiserver.py is missing\): run the lab from a "
                                          r"checkout of podnet"):
        kubesource.fake_apiserver_source()


def test_bgp_nodes_are_refused_naming_the_field():
    with pytest.raises(PodnetError, match=r"examples/lab/bgp.yaml: field spec.nodes\[0\].bgp \(node a-1\)"):
        kubesource.check_supported(load_lab(EXAMPLES / "bgp.yaml"))
