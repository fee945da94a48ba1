"""A lab with the Kubernetes API as its source (`podnet lab up --source kubernetes FILE`).

The lab then plays a cluster's control plane around the API server instead of writing the store:

  - the API server: the fake of the source checkout's tests/support/fake_apiserver.py (no
    kube-apiserver can run here), on 127.0.0.1 over HTTPS with a token, its ClusterIPs from the
    lab's spec.serviceCIDR; podnet's CRDs and Multus's NetworkAttachmentDefinition CRD installed;
  - `podnet kube-sync`, which reflects the API into the lab's store, where the agents read it
    (the agents know nothing of the API, as on a cluster);
  - every object of the lab file created through the API, Pods Pending; the kubelet's part
    (sandbox, CNI ADD, then the Pod's status Running with its addresses) patched through it;
  - the EndpointSlice controller (lab/kubeendpoints.py) reading and writing the API, as
    kube-controller-manager does.

The fake lives in the checkout's tests/support, as the cloud lab's EC2 stand-in does: a lab with
this source needs the checkout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import yaml

from podnet.errors import PodnetError
from podnet.kube import podstatus
from podnet.kube.client import Conflict, KubeClient, KubeConfig, KubeError, Resource
from podnet.kube.crds import network_attachment_definition_crd, render
from podnet.kube.project import Rejected, to_stored
from podnet.kube.sync import reflected_kinds, resource_of
from podnet.model.objects import KubeObject, Namespace, Pod
from podnet.store.base import KeyValueStore
from podnet.store.objects import kind_prefix, object_key, stored_form

SOURCES = ("store", "kubernetes")
API_KEY = "kube-apiserver"
KUBE_SYNC_KEY = "kube-sync"
ENDPOINTS_KEY = "endpoint-controller"
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False)
POD_WAIT = 30.0  # seconds an agent's ADD waits for kube-sync to bring the Pod into the store


def fake_apiserver_source() -> Path:
    """The checkout holding tests/support/fake_apiserver.py, or an error saying one is needed."""
    import podnet

    root = Path(podnet.__file__).resolve().parents[2]
    path = root / "tests" / "support" / "fake_apiserver.py"
    if not path.exists():
        raise PodnetError(f"a lab with --source kubernetes runs podnet's stand-in API server from the source "
                          f"checkout ({path} is missing): run the lab from a checkout of podnet")
    return root


def check_supported(spec: Any) -> None:
    """Refuse, naming the file and field, what a Kubernetes API cannot carry."""
    for i, node in enumerate(spec.nodes):
        if node.bgp is not None:
            raise PodnetError(f"{spec.file or 'the lab'}: field spec.nodes[{i}].bgp (node {node.name}): a Node of the "
                              "Kubernetes API has no spec.bgp (podnet reads it from its own store): run this lab "
                              "with --source store")


def client_of(st: Any) -> KubeClient:
    return KubeClient(KubeConfig.from_kubeconfig(st.data["kube"]["kubeconfig"]), user_agent="podnet-lab")


def start(st: Any, store_url: str, service_cidr: str, timeout: float, say: Any) -> KubeClient:
    """The API server with the CRDs, then kube-sync against it and the lab's store."""
    from podnet.lab.cluster import log_tail, podnet_command

    root = fake_apiserver_source()
    kdir = st.dir / "kube"
    entry = st.start_process(API_KEY, [sys.executable, "-m", "tests.support.fake_apiserver", "--dir", str(kdir),
                                       "--bookmark-interval", "1", "--service-cidr", service_cidr],
                             env={"PYTHONPATH": str(root)}, role="apiserver")
    url_file = kdir / "url"
    deadline = time.monotonic() + timeout
    while not url_file.exists():
        if st.process_pid(entry) is None or time.monotonic() > deadline:
            raise PodnetError(f"the API server did not start; log {entry['log']}:\n{log_tail(entry['log'])}")
        time.sleep(0.05)
    kubeconfig = str(kdir / "kubeconfig")
    st.set(kube={"url": url_file.read_text().strip(), "kubeconfig": kubeconfig})
    client = client_of(st)
    for crd in [*yaml.safe_load_all(render()), network_attachment_definition_crd()]:
        client.create(CRDS, crd)
    say(f"API server {st.data['kube']['url']} (pid {entry['pid']}), kubeconfig {kubeconfig}")
    sync = st.start_process(KUBE_SYNC_KEY, [*podnet_command(), "--store", store_url, "kube-sync", "--kubeconfig",
                                            kubeconfig, "--identity", f"lab-{st.name}", "--lease-duration", "5",
                                            "--renew-deadline", "4", "--retry-period", "0.5"], role="controller")
    say(f"kube-sync: pid {sync['pid']}, log {sync['log']}")
    return client


def restart_kube_sync(st: Any, kill: bool = False, while_down: Any = lambda: None) -> dict:
    """Stop kube-sync (`kill`: SIGKILL, as a crash), run `while_down`, start it again with the
    same command; returns the new record."""
    from podnet.lab.cluster import _restart

    entry = st.process(KUBE_SYNC_KEY)
    if entry is None:
        raise PodnetError(f"lab {st.name} has no kube-sync (it was not brought up with --source kubernetes)")
    return _restart(st, entry, kill, while_down)


def api_body(obj: KubeObject) -> dict:
    """An object as it is sent to the API server: its stored form; a Pod without status (the
    kubelet reports it)."""
    body = stored_form(obj)
    if isinstance(obj, Pod):
        body.pop("status", None)
        body["metadata"].pop("uid", None)
    return body


def create_all(client: KubeClient, objects: list[KubeObject]) -> dict[str, dict]:
    """Create the objects through the API (Namespaces first); the created objects by key."""
    made = {}
    for obj in sorted(objects, key=lambda o: not isinstance(o, Namespace)):
        res = resource_of(type(obj))
        try:
            try:
                out = client.create(res, api_body(obj), obj.namespace if obj.NAMESPACED else None)
            except Conflict:
                if not isinstance(obj, Namespace):
                    raise
                # default and kube-system exist from the start: the lab's labels go on them
                out = client.patch(res, obj.name, {"metadata": {"labels": dict(obj.labels)}})
        except KubeError as e:
            raise PodnetError(f"creating {obj.KIND} {obj.namespace + '/' if obj.namespace else ''}{obj.name} "
                              f"through the API server: {e}") from None
        made[object_key(type(obj), obj.name, obj.namespace if obj.NAMESPACED else None)] = out
    return made


def set_running(client: KubeClient, pod: Pod, ips: list[str], host_ip: str) -> int:
    """The kubelet's status report; the resourceVersion it made."""
    status = {"phase": "Running", "hostIP": host_ip, **({"podIP": ips[0], "podIPs": [{"ip": i} for i in ips]}
                                                         if ips else {})}
    try:
        out = client.patch(resource_of(Pod), pod.name, {"status": status}, pod.namespace, sub="status")
    except KubeError as e:
        raise PodnetError(f"pod {pod.namespace}/{pod.name}: reporting its status to the API server: {e}") from None
    return int(out["metadata"]["resourceVersion"])


def start_endpoint_controller(st: Any, timeout: float, say: Any) -> None:
    from podnet.lab.cluster import _wait_servers

    ready, synced = st.dir / f"{ENDPOINTS_KEY}.ready", st.dir / f"{ENDPOINTS_KEY}.synced"
    entry = st.start_process(ENDPOINTS_KEY, [sys.executable, "-m", "podnet.lab.kubeendpoints", "--kubeconfig",
                                             st.data["kube"]["kubeconfig"], "--synced-file", str(synced),
                                             "--ready-file", str(ready)],
                             role="controller", ready=str(ready), synced=str(synced), server=ENDPOINTS_KEY)
    _wait_servers(st, [entry], timeout)
    say(f"endpoint controller (through the API server): pid {entry['pid']}, log {entry['log']}")


def _comparable(value: dict) -> dict:
    """A stored value without what the store owns (the agents' network-status annotation)."""
    if podstatus.annotation(value) is None:
        return value
    out = {**value, "metadata": {**value["metadata"], "annotations": dict(value["metadata"]["annotations"])}}
    out["metadata"]["annotations"].pop(podstatus.ANNOTATION_STATUS)
    if not out["metadata"]["annotations"]:
        del out["metadata"]["annotations"]
    return out


def unreflected(client: KubeClient, kv: KeyValueStore) -> list[str]:
    """The API objects the store does not hold as kube-sync writes them (or holds and the API
    no longer has)."""
    missing = []
    for cls in reflected_kinds():
        res = resource_of(cls)
        try:
            items = client.list(res).get("items") or []
        except KubeError:
            items = []  # a kind the API server does not serve
        want = {}
        for obj in items:
            obj.setdefault("kind", res.kind)
            obj.setdefault("apiVersion", res.api_version)
            meta = obj.get("metadata") or {}
            try:
                want[object_key(cls, meta.get("name", ""), meta.get("namespace"))] = _comparable(to_stored(obj))
            except Rejected:
                continue
        records, _ = kv.list(kind_prefix(cls))
        have = {r.key: _comparable(r.value) for r in records}
        missing += [k for k, v in want.items() if have.get(k) != v]
        missing += [k for k in have if k not in want]
    return missing


def wait_reflected(st: Any, client: KubeClient, kv: KeyValueStore, timeout: float) -> None:
    """Until the store holds what the API server holds (kube-sync has caught up)."""
    from podnet.lab.cluster import log_tail

    deadline = time.monotonic() + timeout
    entry = st.process(KUBE_SYNC_KEY)
    while missing := unreflected(client, kv):
        if entry is not None and st.process_pid(entry) is None:
            raise PodnetError(f"kube-sync exited; log {entry['log']}:\n{log_tail(entry['log'])}")
        if time.monotonic() > deadline:
            raise PodnetError(f"kube-sync has not reflected {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} into the store within {timeout:g}s; "
                              f"log {entry['log'] if entry else '?'}")
        time.sleep(0.1)
