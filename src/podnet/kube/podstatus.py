"""The Pod's network-status annotation (`k8s.v1.cni.cncf.io/network-status`, multinet/status.py)
between podnet's store and the API server.

The agent that sets up a Pod's additional networks writes the annotation into the Pod in the
store: the store's copy is the authority for it. kube-sync carries it to the API Pod (a merge
patch of metadata.annotations, as Multus writes it), where users and other controllers read it.
Two rules keep kube-sync from fighting itself or the agent:

  - reflecting an API Pod into the store keeps the store's annotation (same uid): an API Pod
    without it yet, or with an older one, never erases what the agent wrote; the API Pod is
    patched instead (`carry`);
  - the patched API Pod comes back through the watch with the annotation the store already
    holds: the projected value equals the stored one and nothing is written (no loop).

A Pod with another uid (deleted and made again under the same name) keeps nothing of the old
one's annotation.
"""

from __future__ import annotations

import copy
from typing import Any

from podnet.multinet import ANNOTATION_STATUS


def annotation(value: Any) -> str | None:
    """The annotation of an object (API or stored form), if any."""
    meta = value.get("metadata") if isinstance(value, dict) else None
    ann = (meta or {}).get("annotations") or {}
    text = ann.get(ANNOTATION_STATUS)
    return text if isinstance(text, str) else None


def uid(value: Any) -> str:
    meta = value.get("metadata") if isinstance(value, dict) else None
    return str((meta or {}).get("uid") or "")


def carry(projected: dict, stored: dict | None) -> tuple[dict, str | None]:
    """The value to store for an API Pod whose projection is `projected`, given what the store
    holds (`stored`): the store's annotation kept when the uid is the same. Also the annotation
    the API Pod lacks (None when it has the store's already, or there is none to carry)."""
    owned = annotation(stored)
    if owned is None or uid(stored) != uid(projected) or annotation(projected) == owned:
        return projected, None
    out = copy.deepcopy(projected)
    out.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_STATUS] = owned
    return out, owned


def patch(uid_: str, text: str) -> dict:
    """The merge patch that sets the annotation; the uid makes it a precondition (a Pod made
    again under the same name is not patched with the old one's networks)."""
    meta: dict[str, Any] = {"annotations": {ANNOTATION_STATUS: text}}
    if uid_:
        meta["uid"] = uid_
    return {"metadata": meta}
