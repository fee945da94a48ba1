"""The agent says in the store when it has programmed its node (/podnet-alloc/agents/<node>):
kube-sync turns that into the Node's condition NetworkUnavailable=False, so agents need no
credentials for the Kubernetes API."""

from __future__ import annotations

import logging
import time

from podnet.store.base import KeyValueStore, StoreError
from podnet.store.layout import AGENTS

log = logging.getLogger("podnet.agent")


def report_ready(kv: KeyValueStore, node: str, revision: int) -> None:
    """Once per node, not per start: a restarted agent writes nothing, so its restart moves
    no store revision that it (or any node's .synced, which follows /podnet/ only) would
    then never reach."""
    try:
        current = kv.get(AGENTS + node)
        if current is not None and isinstance(current.value, dict) and current.value.get("ready") is True:
            return
        kv.put(AGENTS + node, {"ready": True, "revision": revision, "time": time.time()})
    except StoreError as e:  # the Node keeps its condition until the next start; nothing else waits on it
        log.warning("could not record that %s is ready: %s", node, e)
