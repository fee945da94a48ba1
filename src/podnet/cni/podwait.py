"""A CNI ADD for a Pod the store does not know yet waits for it, bounded.

With the Kubernetes API as the source, the kubelet calls the plugin as soon as the Pod is
scheduled, and kube-sync may not have written the Pod into podnet's store yet (it is one watch
event behind the API server). IPAM reads the Pod (its annotations choose pools and addresses),
so the ADD waits for it (`podnet agent --pod-wait SECONDS`) instead of failing or allocating
without it; past the bound it answers "try again later" (code 11), and the kubelet retries.

The Pod may also be deleted while its ADD runs (the kubelet gives up on a sandbox whose Pod
went). The ADD notes the Pod's uid when it starts (pod_uid) and looks again when its
interfaces are made (deleted_since): a Pod gone, or replaced by one of the same name, means
the ADD removes what it made and fails, so no address waits for a DEL that may never come.
"""

from __future__ import annotations

import time

from podnet.cni.errors import CNIError
from podnet.cni.spec import E_TRY_AGAIN
from podnet.model.objects import Pod
from podnet.store.base import KeyValueStore
from podnet.store.objects import object_key

ABSENT = None  # pod_uid of a Pod the store does not hold


def wait_for_pod(kv: KeyValueStore, namespace: str, name: str, timeout: float) -> float:
    """Seconds waited until the Pod is in the store; CNIError(11) after `timeout`."""
    key = object_key(Pod, name, namespace)
    started = time.monotonic()
    pause = 0.005
    while kv.get(key) is None:
        waited = time.monotonic() - started
        if waited >= timeout:
            raise CNIError(E_TRY_AGAIN, f"pod {namespace}/{name} is not in podnet's store after {timeout:g} s: "
                                        "is kube-sync running?")
        time.sleep(min(pause, timeout - waited))
        pause = min(pause * 2, 0.1)
    return time.monotonic() - started


def pod_uid(kv: KeyValueStore, namespace: str, name: str) -> str | None:
    """The uid of the Pod the store holds ("" if it has none), None if it holds no such Pod."""
    rec = kv.get(object_key(Pod, name, namespace))
    if rec is None:
        return ABSENT
    meta = rec.value.get("metadata") if isinstance(rec.value, dict) else None
    return str((meta or {}).get("uid") or "")


def deleted_since(kv: KeyValueStore, namespace: str, name: str, uid: str | None) -> bool:
    """Whether the Pod seen with `uid` at the start of an ADD is gone (or another Pod of that
    name holds its place). A Pod that was not in the store at the start is not looked for: a
    runtime without Kubernetes has none."""
    if uid is ABSENT:
        return False
    now = pod_uid(kv, namespace, name)
    return now is ABSENT or bool(uid and now and now != uid)
