"""The install manifests in deploy/: they parse as Kubernetes objects (each one read into the
official client's model of its kind, with no field lost on the way back: a misspelt field is
one the model drops), the CRDs are the ones made from podnet's models, their schemas accept
the podnet.io objects of examples/ and refuse what podnet refuses, kubectl applies them, and
kube-sync runs with exactly the RBAC they grant."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import yaml

from podnet.errors import ValidationError
from podnet.kube.client import KubeClient, KubeConfig
from podnet.kube.crds import render
from podnet.kube.sync import KubeSync, KubeSyncConfig
from podnet.model.manifests import Source, parse_object
from podnet.multinet import ANNOTATION_STATUS
from podnet.multinet.status import write_status
from podnet.store import open_store
from tests.support import openapi_schema

kubernetes = pytest.importorskip("kubernetes")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "examples"


def manifests() -> list[dict]:
    docs = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def schemas() -> dict[str, dict]:
    return {d["spec"]["names"]["kind"]: d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            for d in manifests() if d["kind"] == "CustomResourceDefinition"}


def _prune_none(x):  # noqa: ANN001, ANN202
    if isinstance(x, dict):
        return {k: _prune_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_prune_none(v) for v in x]
    return x


def _typed_round_trip(doc: dict) -> dict:
    from kubernetes.client import ApiClient

    api = ApiClient()
    group, _, version = doc["apiVersion"].rpartition("/")
    model = "V1" + doc["kind"] if not group else \
        "V1" + doc["kind"] if group in ("apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io") else None
    assert model, doc["apiVersion"]

    class Raw:
        data = json.dumps(doc)

    obj = api.deserialize(Raw(), model)
    return _prune_none(api.sanitize_for_serialization(obj))


def test_every_manifest_is_a_kubernetes_object_with_no_unknown_field():
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                                          "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "DaemonSet",
                                          "Deployment"}
    for doc in docs:
        assert _typed_round_trip(doc) == _prune_none(json.loads(json.dumps(doc))), \
            f"{doc['kind']}/{doc['metadata']['name']}: a field the Kubernetes model does not know"


def test_only_privileged_containers_carry_bidirectional_mounts():
    """The API server refuses a Pod (and so a DaemonSet's template) with a Bidirectional mount in
    a container that is not privileged (ValidateVolumeMounts in Kubernetes' validation); the
    fake API server does not check Pod specs, so the rule is checked here."""
    offenders, agent = [], None
    for doc in manifests():
        if doc["kind"] not in ("DaemonSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            privileged = (c.get("securityContext") or {}).get("privileged") is True
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional" and not privileged:
                    offenders.append(f"{doc['kind']}/{doc['metadata']['name']} container {c['name']}: {m['name']}")
            if doc["metadata"]["name"] == "podnet-agent" and c["name"] == "agent":
                agent = c
    assert offenders == []
    # The agent itself stays unprivileged and still sees the host's bpffs (its pins outlive it).
    assert agent["securityContext"]["privileged"] is False
    assert {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"} in \
        agent["volumeMounts"]


def _workload(name: str) -> dict:
    (doc,) = [d for d in manifests() if d["kind"] == "DaemonSet" and d["metadata"]["name"] == name]
    return doc


def test_node_dns_runs_apart_from_the_agent_with_the_same_addresses_and_store():
    """Pods' DNS outlives the agent (tests/kernel/test_lab_dns_outage.py shows it with the
    processes): the agent leaves answering to `podnet dns serve`, which runs in a DaemonSet of
    its own (an upgrade of the agent replaces the agent's pod whole), on the same DNS
    addresses, from the same store with the same credentials; its update starts the new pod
    before it stops the old one, and it never resolves through itself."""
    from podnet.cli.main import build_parser

    agent_ds, dns_ds = _workload("podnet-agent"), _workload("podnet-node-dns")
    (agent,) = [c for c in agent_ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    dns_pod = dns_ds["spec"]["template"]["spec"]
    (dns,) = dns_pod["containers"]
    parse = build_parser().parse_args
    agent_args, dns_args = parse(agent["args"]), parse(dns["args"])
    assert agent_args.dns_server == "separate"
    assert (dns_args.command, dns_args.dns_command) == ("dns", "serve")
    assert dns_args.node == agent_args.node == "$(NODE_NAME)"
    assert (dns_args.dns_address, dns_args.cluster_dns_ip) == (agent_args.dns_address, agent_args.cluster_dns_ip)
    assert dns["env"] == agent["env"]  # NODE_NAME, the store and its credentials
    mount = {"name": "etcd-tls", "mountPath": "/etc/podnet/etcd", "readOnly": True}
    assert mount in dns["volumeMounts"] and mount in agent["volumeMounts"]
    assert [v for v in dns_pod["volumes"] if v["name"] == "etcd-tls"] == \
        [v for v in agent_ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-tls"]
    assert dns_pod["hostNetwork"] is True and dns_pod["dnsPolicy"] == "Default"
    assert dns_ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # Ready once it listens: the file it writes then, which its probe reads.
    assert dns_args.ready_file and dns_args.ready_file in " ".join(dns["readinessProbe"]["exec"]["command"])
    assert dns_args.metrics_port is None  # a surge pod could not bind the old pod's port
    assert dns["securityContext"]["privileged"] is False
    assert dns["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}


def test_containers_can_read_the_secrets_they_mount():
    """A Secret's files belong to root with the volume's defaultMode (0644 unless set); a
    container running as another user reads them only if the mode lets others read, or through
    the pod's fsGroup (the kubelet gives the files that group, and group read)."""
    unreadable = []
    for doc in manifests():
        if doc["kind"] not in ("DaemonSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext") or {}
        secrets = {v["name"]: v["secret"].get("defaultMode", 0o644) for v in spec.get("volumes", []) if "secret" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            user = (c.get("securityContext") or {}).get("runAsUser", pod_sc.get("runAsUser", 0))
            for m in c.get("volumeMounts", []):
                mode = secrets.get(m["name"])
                if mode is None or user == 0 or mode & 0o004 or "fsGroup" in pod_sc:
                    continue
                unreadable.append(f"{doc['kind']}/{doc['metadata']['name']} container {c['name']} (user {user}): "
                                  f"{m['name']} mode {mode:o}")
    assert unreadable == []


def test_the_crds_are_made_from_the_models():
    assert (DEPLOY / "crds.yaml").read_text() == render(), "regenerate: python -m podnet.kube.crds > deploy/crds.yaml"


def example_objects() -> list[dict]:
    out = []
    for f in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not isinstance(doc, dict):
                continue
            items = (doc.get("spec") or {}).get("manifests") if doc.get("kind") == "Lab" else [doc]
            out += [o for o in items or () if str(o.get("apiVersion", "")).startswith("podnet.io/")
                    and o.get("kind") != "Lab"]
    return out


def test_the_schemas_accept_every_podnet_object_of_the_examples():
    found = schemas()
    objs = example_objects()
    assert {o["kind"] for o in objs} >= {"IPPool"}
    for obj in objs:
        _, unknown, errors = openapi_schema.check(obj, found[obj["kind"]], strict=True)
        assert not unknown and not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors or unknown}"
        parse_object(obj, Source("example", 0))  # and podnet takes it


BAD = [
    ("IPPool", {"cidr": "10.0.0.0/16", "encapsulation": "GRE"}, "spec.encapsulation"),
    ("IPPool", {"cidr": "10.0.0.0/16", "blockSize": 200}, "spec.blockSize"),
    ("IPPool", {"cidr": "10.0.0.0/16", "disabled": "maybe"}, "spec.disabled"),
    ("IPPool", {"blockSize": 26}, "spec.cidr"),
    ("IPPool", {"cidr": "10.0.0.0/16", "natOutgoin": True}, "spec.natOutgoin"),
    ("IPPool", {"cidr": "10.0.0.0/16", "allowedUses": ["Everything"]}, "spec.allowedUses[0]"),
    ("IPPool", {"cidr": "10.0.0.0/16", "nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
     "spec.nodeSelector.matchExpressions[0].operator"),
    ("IPReservation", {}, "spec.reservedCIDRs"),
    ("IPAMConfig", {"maxBlocksPerHost": "many"}, "spec.maxBlocksPerHost"),
]


@pytest.mark.parametrize("kind,spec,field", BAD, ids=[f"{k}-{f}" for k, _, f in BAD])
def test_what_podnet_refuses_the_schema_refuses(kind, spec, field):
    obj = {"apiVersion": "podnet.io/v1", "kind": kind, "metadata": {"name": "bad"}, "spec": spec}
    with pytest.raises(ValidationError):
        parse_object(obj, Source("bad", 0))
    _, _, errors = openapi_schema.check(obj, schemas()[kind], strict=True)
    assert any(e.field == field for e in errors), errors


@pytest.mark.kubectl
def test_kubectl_applies_the_manifests(api, kubectl):
    out = kubectl("apply", "-f", str(DEPLOY)).stdout
    assert "daemonset.apps/podnet-agent created" in out and "deployment.apps/podnet-kube-sync created" in out
    assert "customresourcedefinition.apiextensions.k8s.io/ippools.podnet.io created" in out
    assert api.get("apps/v1", "DaemonSet", "podnet-agent", "kube-system")["spec"]["template"]["spec"]["hostNetwork"]


def test_kube_sync_runs_with_exactly_the_rbac_it_is_granted(api, tmp_path):
    for doc in manifests():
        if doc["kind"] == "CustomResourceDefinition":
            api.create(doc)
    api.create({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",  # Multus's
                "metadata": {"name": "network-attachment-definitions.k8s.cni.cncf.io"},
                "spec": {"group": "k8s.cni.cncf.io", "scope": "Namespaced",
                         "names": {"plural": "network-attachment-definitions", "kind": "NetworkAttachmentDefinition",
                                   "singular": "network-attachment-definition"},
                         "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                             "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}})
    rules = [r for d in manifests() if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    token = api.add_user("system:serviceaccount:kube-system:podnet-kube-sync", rules)
    kc = api.kubeconfig(str(tmp_path / "kc"), token=token, user="kube-sync")
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    pod = api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": "default"},
                      "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}})
    api.create({"apiVersion": "podnet.io/v1", "kind": "IPPool", "metadata": {"name": "bad"},
                "spec": {"cidr": "10.1.0.0/16", "blockSize": 40}})  # refused: an Event and a status
    url = f"sqlite://{tmp_path}/s.db"
    open_store(url, create=True).close()
    sync = KubeSync(KubeClient(KubeConfig.load(kc)), lambda: open_store(url, create=False),
                    KubeSyncConfig(identity="rbac", lease_duration=2, renew_deadline=1.5, retry=0.2))
    t = threading.Thread(target=sync.run, daemon=True)
    t.start()
    try:
        assert sync.synced.wait(30)
        with open_store(url) as kv:
            kv.put("/podnet-alloc/agents/n1", {"ready": True})
            write_status(kv, "default", "p1", pod["metadata"]["uid"], [{"name": "podnet", "interface": "eth0"}])
        with api.changed:
            assert api.changed.wait_for(lambda: any(
                c["type"] == "NetworkUnavailable" for c in (api.get("v1", "Node", "n1").get("status") or {}).get(
                    "conditions") or ()) and api.objects("v1", "Event") and ANNOTATION_STATUS in (
                api.get("v1", "Pod", "p1", "default")["metadata"].get("annotations") or {}), 20)
    finally:
        sync.stop()
        t.join(30)
    user = "system:serviceaccount:kube-system:podnet-kube-sync"
    used = {(g, r, v) for (u, v, g, r) in api.stats.users if u == user}
    assert not api.stats.forbidden, api.stats.forbidden
    assert ("", "nodes/status", "patch") in used and ("", "events", "create") in used
    assert ("coordination.k8s.io", "leases", "create") in used and ("podnet.io", "ippools/status", "patch") in used
    for rule in rules:  # every rule granted is used
        assert any(g in rule["apiGroups"] and r in rule["resources"] and v in rule["verbs"] for g, r, v in used) \
            or set(rule["resources"]) <= {"ipreservations/status", "ipamconfigs/status", "cloudnetworks/status",
                                          "bgpconfigurations/status", "bgppeers/status"}, rule
    assert os.path.exists(kc)
