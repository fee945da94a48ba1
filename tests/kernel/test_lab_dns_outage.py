"""Node DNS that outlives the agent: a lab's node DNS process (`podnet dns serve`, the
lab's default `dnsServer: separate`) keeps answering pods while the node's agent is
killed with SIGKILL and restarted, follows the store on its own meanwhile, and comes
back from its own crash with a fresh list. With `dnsServer: inprocess` (the agent
answers, as before) the same lookups fail while the agent is down.

The lookups are a real client in a pod: glibc's resolver (`getent ahostsv4`, with the
pod's resolv.conf: 169.254.20.10, the Kubernetes search path, ndots:5) for a Service's
short name and for a name only the lab's upstream dnsmasq knows, and `dig` at the
kube-dns ClusterIP, in a shell loop that logs one line per lookup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from podnet.lab.cluster import node_dns_key, restart_agent, restart_node_dns, wait_programmed
from podnet.lab.connectivity import Lab
from podnet.lab.spec import DEFAULT_SERVICE_CIDR
from podnet.model.objects import ObjectMeta, Service, ServicePort, ServiceSpec
from podnet.services.clusterip import allocate_cluster_ips, release_service
from tests.kernel.labs import running_lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("dig", "dnsmasq", "getent")),
                       reason="needs dig, dnsmasq and getent"),
]

EXTERNAL_IP = "10.98.0.10"
ZONE = "example.test"
KUBE_DNS = "10.96.0.10"  # the tenth address of the lab's Service CIDR


def lab_spec(dns_server: str) -> dict:
    return {"underlay": {"cidr": "10.99.0.0/24"}, "dnsServer": dns_server,
            "external": {"address": f"{EXTERNAL_IP}/24", "dns": {"zone": ZONE, "records": {"www": EXTERNAL_IP}}},
            "nodes": [{"name": "node-1"}],
            "pods": [{"name": "web-1", "namespace": "shop", "node": "node-1", "labels": {"app": "web"},
                      "ports": [{"name": "http", "containerPort": 8080}]},
                     {"name": "client", "namespace": "shop", "node": "node-1"}],
            "manifests": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                           "spec": {"selector": {"app": "web"},
                                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}]}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(lab_spec("separate"), "dnsout") as lab:
        yield lab


def cluster_ip(lab: Lab, name: str) -> str:
    store = lab.store()
    try:
        svc = store.get(Service, name, "shop")
    finally:
        store.kv.close()
    assert svc is not None and svc.spec.cluster_ip
    return svc.spec.cluster_ip


# A shell loop in the pod: one line per lookup, "ok NAME ADDRESS" or "fail NAME STATUS",
# until the stop file exists.
LOOP = r'''
stop=$1
while [ ! -e "$stop" ]; do
  for name in web www.example.test; do
    if out=$(getent ahostsv4 "$name"); then echo "ok $name ${out%% *}"; else echo "fail $name $?"; fi
  done
  if out=$(dig +short +tries=1 +time=2 "@$2" web.shop.svc.cluster.local) && [ -n "$out" ] && \
     [ -z "${out##[0-9]*}" ]; then echo "ok @kube-dns $out"; else echo "fail @kube-dns $out"; fi
done
'''


class Lookups:
    """The loop in a pod and its log."""

    def __init__(self, lab: Lab, pod: str, directory: Path):
        self.log, self.stop_file = directory / "lookups.log", directory / "lookups.stop"
        self.log.unlink(missing_ok=True)
        self.stop_file.unlink(missing_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", lab.pod(pod)["netns"], "sh", "-c", LOOP, "loop",
                                          str(self.stop_file), KUBE_DNS], stdout=out, stderr=subprocess.STDOUT)

    def lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith(("ok ", "fail "))]

    def wait_for(self, count: int, timeout: float = 60.0) -> list[str]:
        """Wait until the log holds `count` lookups."""
        deadline = time.monotonic() + timeout
        while len(lines := self.lines()) < count:
            assert self.proc.poll() is None, f"the lookup loop exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"only {len(lines)} of {count} lookups in {timeout:g}s"
            time.sleep(0.05)  # poll interval of a file the loop appends to
        return lines

    def stop(self) -> list[str]:
        self.stop_file.touch()
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.lines()


@contextlib.contextmanager
def lookups(lab: Lab, pod: str) -> Iterator[Lookups]:
    loop = Lookups(lab, pod, lab.state.dir)
    try:
        yield loop
    finally:
        loop.stop()


def agent_pid(lab: Lab) -> int:
    pid = lab.state.process_pid(lab.state.process("agent-node-1"))
    assert pid is not None
    return pid


def gone(lab: Lab, entry: dict) -> bool:
    """The recorded process has exited (a zombie not reaped yet counts as gone)."""
    return lab.state.process_pid(entry) is None


def test_pods_resolve_without_a_failure_while_the_agent_is_killed_and_restarted(lab):
    web, dns_pid = cluster_ip(lab, "web"), lab.state.process_pid(lab.state.process(node_dns_key("node-1")))
    old, old_entry = agent_pid(lab), lab.state.process("agent-node-1")
    during: list[str] = []
    with lookups(lab, "shop/client") as loop:
        loop.wait_for(6)  # the loop runs: two rounds before the kill

        def while_down() -> None:
            assert gone(lab, old_entry)  # stop_process waited for the agent to be gone
            start = len(loop.lines())
            during.extend(loop.wait_for(start + 9)[start:])  # three rounds with no agent on the node
            assert gone(lab, old_entry) and lab.state.process("agent-node-1") is old_entry  # none started yet

        restart_agent(lab.state, "node-1", kill=True, while_down=while_down)
        store = lab.store()
        try:
            wait_programmed(lab.state, store.kv.revision(), 30)  # the restarted agent's .synced
        finally:
            store.kv.close()
        after = len(loop.lines())
        loop.wait_for(after + 6)
        lines = loop.stop()
    assert agent_pid(lab) != old
    assert lab.state.process_pid(lab.state.process(node_dns_key("node-1"))) == dns_pid  # never restarted
    assert len(during) >= 9
    failed = [line for line in lines if line.startswith("fail")]
    assert not failed, f"{len(failed)} of {len(lines)} lookups failed: {failed[:5]}"
    answers = {tuple(line.split()[1:]) for line in lines}
    assert answers == {("web", web), ("www.example.test", EXTERNAL_IP), ("@kube-dns", web)}, answers


def _new_service(lab: Lab, name: str) -> tuple[Service, int]:
    store = lab.store()
    try:
        svc = Service(metadata=ObjectMeta(name=name, namespace="shop"),
                      spec=ServiceSpec(selector={"app": "web"}, ports=[ServicePort(name="http", port=80)]))
        (svc,) = allocate_cluster_ips([svc], store, DEFAULT_SERVICE_CIDR)
        rev, _ = store.apply([svc])
        return svc, rev
    finally:
        store.kv.close()


def _delete_service(lab: Lab, svc: Service) -> int:
    store = lab.store()
    try:
        rev = store.delete(Service, svc.name, "shop")
        release_service(store, svc)
        return rev
    finally:
        store.kv.close()


def _wait_dns_synced(lab: Lab, rev: int, timeout: float = 15.0) -> None:
    """Wait until the node DNS process has followed the store to `rev` (its synced file)."""
    path = Path(lab.state.process(node_dns_key("node-1"))["synced"])
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text()) >= rev:
                return
        assert time.monotonic() < deadline, f"the DNS process did not follow the store to {rev}"
        time.sleep(0.02)  # poll interval of a file the process writes


def dig(lab: Lab, name: str) -> list[str]:
    proc = lab.exec("shop/client", ["dig", "+short", "+tries=1", "+time=3", name], timeout=20)
    assert proc.returncode == 0, proc
    return proc.stdout.split()


def test_a_service_created_while_the_agent_is_down_resolves(lab):
    name = "while-down.shop.svc.cluster.local"
    seen: dict[str, list[str]] = {}

    def while_down() -> None:
        svc, rev = _new_service(lab, "while-down")
        try:
            _wait_dns_synced(lab, rev)
            seen["created"] = [svc.spec.cluster_ip or "", *dig(lab, name)]
        finally:
            _wait_dns_synced(lab, _delete_service(lab, svc))
        seen["deleted"] = dig(lab, name)

    restart_agent(lab.state, "node-1", kill=True, while_down=while_down)
    ip, *answer = seen["created"]
    assert answer == [ip]
    assert seen["deleted"] == []


def test_the_dns_process_restarts_from_a_fresh_list(lab):
    """Killed with SIGKILL, the node DNS process starts again from the store: a Service
    created while it was down resolves, and one deleted meanwhile is gone."""
    gone, _ = _new_service(lab, "gone")
    made: list[Service] = []
    try:
        _wait_dns_synced(lab, _new_service(lab, "kept")[1])
        assert dig(lab, "gone.shop.svc.cluster.local") == [gone.spec.cluster_ip]

        def while_down() -> None:
            _delete_service(lab, gone)
            made.append(_new_service(lab, "fresh")[0])

        new = restart_node_dns(lab.state, "node-1", kill=True, while_down=while_down)
        assert lab.state.process_pid(new) is not None
        assert dig(lab, "fresh.shop.svc.cluster.local") == [made[0].spec.cluster_ip]
        assert dig(lab, "gone.shop.svc.cluster.local") == []
        assert dig(lab, "kept.shop.svc.cluster.local") == [cluster_ip(lab, "kept")]
    finally:
        store = lab.store()
        try:
            for svc in store.list(Service, "shop"):
                if svc.name in ("kept", "fresh", "gone"):
                    store.delete(Service, svc.name, "shop")
                    release_service(store, svc)
        finally:
            store.kv.close()


def test_with_the_agent_answering_lookups_fail_while_it_is_down():
    """The contrast: `dnsServer: inprocess` (the agent's own server, as before) leaves the
    pods without DNS from the kill to the restart."""
    with running_lab(lab_spec("inprocess"), "dnsin") as lab:
        assert lab.state.process(node_dns_key("node-1")) is None
        old = agent_pid(lab)
        during: list[str] = []
        with lookups(lab, "shop/client") as loop:
            loop.wait_for(3)

            def while_down() -> None:
                start = len(loop.lines())
                during.extend(loop.wait_for(start + 4)[start:])

            restart_agent(lab.state, "node-1", kill=True, while_down=while_down)
        assert agent_pid(lab) != old
        # all but at most one lookup already under way at the kill
        assert sum(line.startswith("fail") for line in during) >= len(during) - 1, during
