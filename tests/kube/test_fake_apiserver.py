"""The fake API server against real clients: the official Python client (`kubernetes`) and
kubectl get, apply, patch, watch and delete against it as against a kube-apiserver, and see
its errors (401, 403, 404, 409, 410, 422) as they would see a real one's."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.io"},
    "spec": {"group": "example.io", "scope": "Cluster",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                               "spec": {"type": "object", "required": ["size"], "properties": {
                                   "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                   "color": {"type": "string", "enum": ["red", "blue"]}}},
                               "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]},
}


def pod(name: str, ns: str = "default", **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "img", "ports": [{"name": "http", "containerPort": 80}]}]}}


@pytest.fixture
def core(api, kubeconfig):
    c = config.new_client_from_config(config_file=kubeconfig)
    yield client.CoreV1Api(c)
    c.close()


# ---------------------------------------------------------------- the Python client


def test_python_client_crud_and_selectors(api, core):
    core.create_namespace({"metadata": {"name": "shop"}})
    created = core.create_namespaced_pod("shop", pod("web-1", "shop", app="web"))
    core.create_namespaced_pod("shop", pod("db-1", "shop", app="db"))
    assert created.status.phase == "Pending" and created.metadata.uid
    listed = core.list_namespaced_pod("shop", label_selector="app in (web)")
    assert [p.metadata.name for p in listed.items] == ["web-1"]
    assert int(listed.metadata.resource_version) >= int(created.metadata.resource_version)
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(field_selector="metadata.name=db-1").items] \
        == ["db-1"]
    patched = core.patch_namespaced_pod("web-1", "shop", {"metadata": {"labels": {"tier": "front"}}})
    assert patched.metadata.labels == {"app": "web", "tier": "front"}
    status = core.patch_namespaced_pod_status("web-1", "shop", {"status": {"podIP": "10.1.0.5", "phase": "Running"}})
    assert (status.status.pod_ip, status.status.phase) == ("10.1.0.5", "Running")
    ns = core.read_namespace("shop")
    assert ns.metadata.labels["kubernetes.io/metadata.name"] == "shop"  # as the API server sets it

    stale = core.read_namespaced_pod("web-1", "shop")
    core.patch_namespaced_pod("web-1", "shop", {"metadata": {"labels": {"v": "2"}}})
    stale.metadata.labels = {"v": "stale"}
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_pod("web-1", "shop", stale)
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("nowhere", pod("x", "nowhere"))
    assert e.value.status == 404 and json.loads(e.value.body)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("shop", pod("web-1", "shop"))
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    core.delete_namespaced_pod("web-1", "shop")
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("web-1", "shop")
    assert e.value.status == 404


def test_python_client_services_get_addresses_and_node_ports(core):
    svc = core.create_namespaced_service("default", {"metadata": {"name": "web"}, "spec": {
        "type": "NodePort", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}})
    assert svc.spec.cluster_ip.startswith("10.") and 30000 <= svc.spec.ports[0].node_port <= 32767
    assert svc.spec.ports[0].target_port == 80
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service("default", {"metadata": {"name": "other"}, "spec": {
            "clusterIP": svc.spec.cluster_ip, "ports": [{"port": 81}]}})
    assert e.value.status == 422 and "already allocated" in e.value.body


def test_python_client_watch_with_bookmarks(api, core):
    listed = core.list_namespaced_pod("default")
    seen: list[tuple[str, str]] = []
    w = watch.Watch()

    def changes() -> None:
        core.create_namespaced_pod("default", pod("a"))
        core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"x": "y"}}})
        core.delete_namespaced_pod("a", "default")

    started = threading.Thread(target=changes)
    started.start()
    try:
        for ev in w.stream(core.list_namespaced_pod, "default", resource_version=listed.metadata.resource_version,
                           allow_watch_bookmarks=True, timeout_seconds=30):
            obj = ev["raw_object"]
            seen.append((ev["type"], obj["metadata"].get("name", "")))
            if ev["type"] == "BOOKMARK" and ("DELETED", "a") in seen:
                break
    finally:
        w.stop()
        started.join()
    changes_seen = [s for s in seen if s[0] != "BOOKMARK"]
    assert changes_seen == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert ("BOOKMARK", "") in seen


def test_python_client_gets_410_after_compaction(api, core):
    rv = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("a"))
    api.compact()
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=5):
            pass
    assert e.value.status == 410


def test_paginated_list_is_one_snapshot_and_expires_with_compaction(api, core):
    for i in range(5):
        core.create_namespaced_pod("default", pod(f"p{i}"))
    first = core.list_namespaced_pod("default", limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"] and first.metadata._continue
    core.delete_namespaced_pod("p3", "default")
    core.create_namespaced_pod("default", pod("p9"))
    rest = core.list_namespaced_pod("default", limit=10, _continue=first.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["p2", "p3", "p4"]  # the first page's snapshot
    assert rest.metadata.resource_version == first.metadata.resource_version
    api.compact()
    with pytest.raises(ApiException) as e:
        core.list_namespaced_pod("default", limit=10, _continue=first.metadata._continue)
    assert e.value.status == 410


def test_tokens_and_rbac(api, kubeconfig, tmp_path):
    bad = api.kubeconfig(str(tmp_path / "bad"), token="not-a-token")
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(config.new_client_from_config(config_file=bad)).list_namespace()
    assert e.value.status == 401
    token = api.add_user("reader", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    reader = client.CoreV1Api(config.new_client_from_config(
        config_file=api.kubeconfig(str(tmp_path / "reader"), token=token, user="reader")))
    reader.list_namespaced_pod("default")
    with pytest.raises(ApiException) as e:
        reader.create_namespaced_pod("default", pod("x"))
    assert e.value.status == 403 and 'User "reader" cannot create resource "pods"' in json.loads(e.value.body)["message"]
    assert api.stats.users[("reader", "list", "", "pods")] == 1


def test_custom_resources_are_pruned_and_validated_by_their_schema(api, kubeconfig):
    c = config.new_client_from_config(config_file=kubeconfig)
    client.ApiextensionsV1Api(c).create_custom_resource_definition(CRD)
    custom = client.CustomObjectsApi(c)
    made = custom.create_cluster_custom_object("example.io", "v1", "widgets", {
        "apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"},
        "spec": {"size": 3, "shape": "round"}})
    assert made["spec"] == {"size": 3}  # unknown fields pruned, as the API server does
    with pytest.raises(ApiException) as e:
        custom.create_cluster_custom_object("example.io", "v1", "widgets", {
            "apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "big"}, "spec": {"size": 40}})
    body = json.loads(e.value.body)
    assert e.value.status == 422 and body["details"]["causes"][0]["field"] == "spec.size"
    assert "should be less than or equal to 10" in body["message"]
    custom.patch_cluster_custom_object("example.io", "v1", "widgets", "w", {"spec": {"color": "red"}})
    assert custom.get_cluster_custom_object("example.io", "v1", "widgets", "w")["spec"] == {"size": 3, "color": "red"}
    st = custom.patch_cluster_custom_object_status("example.io", "v1", "widgets", "w", {"status": {"ok": True}})
    assert st["status"] == {"ok": True}


# ---------------------------------------------------------------- kubectl


@pytest.mark.kubectl
def test_kubectl_apply_get_patch_delete(api, kubectl, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n"
        "spec: {containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 80}]}]}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n")
    out = kubectl("apply", "-f", str(manifest)).stdout
    assert "pod/web created" in out and "service/web created" in out
    manifest.write_text(manifest.read_text().replace("containerPort: 80}", "containerPort: 80}, "
                                                     "{name: https, containerPort: 443}"))
    assert "pod/web configured" in kubectl("apply", "-f", str(manifest)).stdout
    got = json.loads(kubectl("get", "pod", "web", "-n", "shop", "-o", "json").stdout)
    assert [p["containerPort"] for p in got["spec"]["containers"][0]["ports"]] == [80, 443]
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]
    kubectl("label", "pod", "web", "-n", "shop", "tier=front")
    kubectl("patch", "pod", "web", "-n", "shop", "--type=merge", "-p", '{"metadata":{"labels":{"x":"1"}}}')
    assert api.get("v1", "Pod", "web", "shop")["metadata"]["labels"] == {"app": "web", "tier": "front", "x": "1"}
    names = kubectl("get", "pods", "-A", "-l", "app=web", "-o", "name").stdout.split()
    assert names == ["pod/web"]
    assert api.get("v1", "Service", "web", "shop")["spec"]["clusterIP"]
    kubectl("delete", "-f", str(manifest))
    assert api.get("v1", "Namespace", "shop") is None and api.get("v1", "Pod", "web", "shop") is None


@pytest.mark.kubectl
def test_kubectl_watch_sees_changes(api, kubectl):
    proc = subprocess.Popen([kubectl.path, "get", "pods", "-w", "-o", "name"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kubectl.env)
    try:
        api.create(pod("first"))  # may be seen by the list or by the watch
        assert proc.stdout.readline().strip() == "pod/first"
        api.create(pod("second"))
        assert proc.stdout.readline().strip() == "pod/second"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.kubectl
def test_kubectl_custom_resources_and_schema_errors(api, kubectl, tmp_path):
    crd = tmp_path / "crd.json"
    crd.write_text(json.dumps(CRD))
    kubectl("apply", "-f", str(crd))
    kubectl("wait", "--for=condition=established", "crd/widgets.example.io", "--timeout=30s")
    good = tmp_path / "w.yaml"
    good.write_text("apiVersion: example.io/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: 2}\n")
    assert "widget.example.io/w created" in kubectl("apply", "-f", str(good)).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: example.io/v1\nkind: Widget\nmetadata: {name: b}\nspec: {size: 2, color: green}\n")
    proc = kubectl("apply", "-f", str(bad), check=False)
    assert proc.returncode != 0 and "spec.color" in proc.stderr and "Unsupported value" in proc.stderr
    assert kubectl("get", "widgets", "-o", "name").stdout.split() == ["widget.example.io/w"]
