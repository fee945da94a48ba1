"""An agent stopped cleanly starts again from its snapshot (what its dataplanes held, on
the node) instead of listing the store, and still ends up with what the store says:
changes made while it was down arrive through the watch, a store whose history no
longer reaches the snapshot is listed again, and a snapshot that is damaged, or left by
an agent that did not stop cleanly, is not used. Shown with real packets."""

import os
from pathlib import Path

import pytest

from podnet.agent.snapshot import SUFFIX
from podnet.lab.cluster import followed_revision, restart_agent, wait_endpoints, wait_programmed
from podnet.model.objects import NetworkPolicy, Service
from tests.kernel.labs import (
    ip_of,
    log_offsets,
    log_since,
    node_sh,
    reaches,
    running_lab,
    web_client_intruder,
)

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root and network namespaces")]

WEB = [{"name": "http", "containerPort": 8080}]


def service_doc(name: str, port: int) -> dict:
    """A Service of the web pod, at a ClusterIP of its own (written straight to the store)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": f"10.96.200.{port}", "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}


def service(name: str, port: int) -> Service:
    return Service.model_validate(service_doc(name, port))


POLICY = NetworkPolicy.model_validate({
    "metadata": {"name": "web-from-clients", "namespace": "default"},
    "spec": {"podSelector": {"matchLabels": {"app": "web"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}]}})


@pytest.fixture(scope="module")
def lab():
    spec = {"underlay": {"cidr": "10.99.0.0/24"},
            "nodes": [{"name": "node-1"}, {"name": "node-2"}],
            "pods": web_client_intruder(WEB),
            "manifests": [service_doc("web", 80)]}
    with running_lab(spec, "sn") as lab:
        yield lab


def snapshot_of(lab, node: str) -> Path:
    return Path(lab.node(node)["socket"] + SUFFIX)


def cluster_ip(lab, name: str) -> str:
    svc = lab.store().get(Service, name, "default")
    assert svc is not None and svc.spec.cluster_ip
    return svc.spec.cluster_ip


def apply(lab, *objects) -> None:
    lab.store().apply(list(objects))


def caught_up(lab) -> None:
    """Every agent has programmed what the store holds now (slices written for it too)."""
    kv = lab.store().kv
    wait_endpoints(lab.state, kv.revision(), 30)
    wait_programmed(lab.state, followed_revision(kv), 30)


def restarted(lab, node: str, while_down=lambda: None, kill: bool = False) -> str:
    """Restart the node's agent; what it logged from its stop to its first sync."""
    since = log_offsets(lab)
    restart_agent(lab.state, node, kill=kill, while_down=while_down)
    return log_since(lab, node, since)


def test_a_clean_restart_starts_from_the_snapshot_and_takes_the_changes_made_meanwhile(lab):
    web_pod = f"tcp:{ip_of(lab, 'web')}:8080"
    web = f"tcp:{cluster_ip(lab, 'web')}:80"
    assert reaches(lab, "client", web) and reaches(lab, "intruder", web_pod)

    def while_node_1_is_down():
        assert snapshot_of(lab, "node-1").exists(), "a clean stop leaves a snapshot"
        apply(lab, POLICY)  # the web pod (node-1) admits clients only

    log = restarted(lab, "node-1", while_node_1_is_down)
    assert "started from" in log, log
    assert not snapshot_of(lab, "node-1").exists(), "a snapshot is used once"
    caught_up(lab)
    assert reaches(lab, "client", web_pod) and not reaches(lab, "intruder", web_pod)

    def while_node_2_is_down():  # node-2's clients reach Services through node-2's own table
        apply(lab, service("web2", 81))
        lab.store().delete(Service, "web", "default")

    log = restarted(lab, "node-2", while_node_2_is_down)
    assert "started from" in log, log
    caught_up(lab)
    assert reaches(lab, "client", f"tcp:{cluster_ip(lab, 'web2')}:81")
    assert not reaches(lab, "client", web)  # the Service deleted while the agent was down
    apply(lab, service("web", 80))
    lab.store().delete(NetworkPolicy, "web-from-clients", "default")
    caught_up(lab)


def test_an_agent_killed_leaves_no_snapshot_and_lists_at_its_next_start(lab):
    def while_down():
        assert not snapshot_of(lab, "node-2").exists()  # the last start used it up; a crash writes none

    log = restarted(lab, "node-2", while_down, kill=True)
    assert "started from" not in log, log
    caught_up(lab)
    assert reaches(lab, "client", f"tcp:{cluster_ip(lab, 'web')}:80")


def test_a_damaged_snapshot_is_refused_and_the_store_listed(lab):
    def damage():
        path = snapshot_of(lab, "node-2")
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))

    log = restarted(lab, "node-2", damage)
    assert "do not match their checksum" in log and "started from" not in log, log
    assert not snapshot_of(lab, "node-2").exists()
    assert reaches(lab, "client", f"tcp:{cluster_ip(lab, 'web')}:80")


def test_a_snapshot_older_than_the_store_history_ends_in_a_fresh_list(lab):
    apply(lab, service("gone", 82))
    caught_up(lab)
    gone = f"tcp:{cluster_ip(lab, 'gone')}:82"
    assert reaches(lab, "client", gone)

    def while_down():  # the Service goes, and with it the history that says so
        lab.store().delete(Service, "gone", "default")
        kv = lab.store().kv
        kv.compact(kv.revision())

    since = log_offsets(lab)
    restart_agent(lab.state, "node-2", while_down=while_down)
    caught_up(lab)
    log = log_since(lab, "node-2", since)
    assert "started from" in log and "compacted" in log, log
    assert not reaches(lab, "client", gone)
    assert reaches(lab, "client", f"tcp:{cluster_ip(lab, 'web')}:80")


def test_kernel_state_changed_while_the_agent_was_down_is_repaired_by_the_first_sync_from_the_snapshot(lab):
    web_pod = f"tcp:{ip_of(lab, 'web')}:8080"
    web = f"tcp:{cluster_ip(lab, 'web')}:80"
    apply(lab, POLICY)
    caught_up(lab)
    assert reaches(lab, "client", web_pod) and not reaches(lab, "intruder", web_pod)

    def flush_policy():  # the node's pods open while no agent runs
        node_sh(lab, "node-1", "nft", "flush", "table", "ip", "podnet-policy")

    def delete_services():
        node_sh(lab, "node-2", "nft", "delete", "table", "ip", "podnet-svc")

    log = restarted(lab, "node-1", flush_policy)
    assert "started from" in log, log
    # closed again by the first sync, before the agent reports ready: no resync waited for
    assert not reaches(lab, "intruder", web_pod) and reaches(lab, "client", web_pod)
    log = restarted(lab, "node-2", delete_services)
    assert "started from" in log, log
    assert reaches(lab, "client", web)
    lab.store().delete(NetworkPolicy, "web-from-clients", "default")
    caught_up(lab)
