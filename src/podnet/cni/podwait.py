"""A CNI ADD for a Pod the store does not know yet waits for it, bounded.

With the Kubernetes API as the source, the kubelet calls the plugin as soon as the Pod is
scheduled, and kube-sync may not have written the Pod into podnet's store yet (it is one watch
event behind the API server). IPAM reads the Pod (its annotations choose pools and addresses),
so the ADD waits for it (`podnet agent --pod-wait SECONDS`) instead of failing or allocating
without it; past the bound it answers "try again later" (code 11), and the kubelet retries.
"""

from __future__ import annotations

import time

from podnet.cni.errors import CNIError
from podnet.cni.spec import E_TRY_AGAIN
from podnet.model.objects import Pod
from podnet.store.base import KeyValueStore
from podnet.store.objects import object_key


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
