"""The lab's EndpointSlice controller when the Kubernetes API is the lab's source: the part of
kube-controller-manager that makes EndpointSlices. It reads Pods, Services, Nodes and
EndpointSlices from the API server (podnet's reflector, kube/reflector.py) and writes the slices
there, where kube-sync reflects them into podnet's store like every other object: nothing of it
goes to the store directly.

Its indexes and its planning are the store-fed controller's (endpointcontroller.py,
endpoints.plan_slices); only the source and the writes differ. The API has no transactions:
each slice is one create, update (on its resourceVersion) or delete, as upstream's controller
writes them; a write that loses its race reads the namespace's slices again and plans again.

When every API change up to resourceVersion R is in the slices it writes R to its
`--synced-file` (R: the lowest resourceVersion its watches have reached, bookmarks included).

    python -m podnet.lab.kubeendpoints --kubeconfig PATH --synced-file PATH [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from podnet.errors import PodnetError
from podnet.kube.client import ApiError, Conflict, KubeClient, KubeConfig, KubeError, NotFound
from podnet.kube.project import Rejected, to_model
from podnet.kube.reflector import Change, Reflector
from podnet.kube.sync import resource_of
from podnet.lab.endpointcontroller import (
    CAS_ATTEMPTS,
    EndpointController,
    ServiceRef,
    describe,
    reconcile_rounds,
)
from podnet.model.objects import EndpointSlice, KubeObject, Node, Pod, Service
from podnet.store.objects import kind_prefix, object_key, stored_form

log = logging.getLogger("podnet.endpoints")

SLICES = resource_of(EndpointSlice)
KINDS: tuple[type[KubeObject], ...] = (Pod, Service, Node, EndpointSlice)


def _model(obj: dict) -> KubeObject | None:
    """The API object as podnet's model, with its resourceVersion (what slice updates compare)."""
    try:
        model = to_model(obj)
    except Rejected as e:
        log.warning("ignored: %s", e)
        return None
    return model.with_meta(resource_version=str((obj.get("metadata") or {}).get("resourceVersion") or ""))


class KubeEndpointController(EndpointController):
    """EndpointController's indexes fed by API watches; slices written through the API."""

    def __init__(self, client: KubeClient) -> None:
        super().__init__()
        self.client = client
        self.reflectors: list[Reflector] = []

    def on_api_change(self, cls: type[KubeObject], changes: list[Change]) -> None:
        now = time.time()
        with self.cond:
            for ch in changes:
                model = _model(ch.object) if ch.type != "DELETED" and ch.object else None
                if ch.type != "DELETED" and model is None:
                    continue
                ns, _, name = ch.key.rpartition("/")
                key = object_key(cls, name, ns or None)
                if cls is Pod:
                    self._on_pod(key, ns or "default", model, now)  # type: ignore[arg-type]
                elif cls is Service:
                    self._on_service((ns or "default", name), model, now)  # type: ignore[arg-type]
                elif cls is Node:
                    self._on_node(name, model, now)  # type: ignore[arg-type]
                else:  # an EndpointSlice: its resourceVersion says whether it is news (or this one's write)
                    rv = int(((ch.object or {}).get("metadata") or {}).get("resourceVersion") or 0)
                    self._on_slice(key, ns, model, rv, now)  # type: ignore[arg-type]
        self.on_change(self.watched_revision(), [])

    def watched_revision(self) -> int:
        """Every API change up to here has reached the indexes (the slowest watch's position)."""
        revs = [int(r.resource_version or 0) for r in self.reflectors]
        return min(revs) if revs and all(r.synced.is_set() for r in self.reflectors) else 0

    # ------------------------------------------------------------------ writing

    def reconcile_api(self, ref: ServiceRef, when: float) -> str:
        ns, name = ref
        for _ in range(CAS_ATTEMPTS):
            plan = self.plan(ref, when)
            if not plan:
                return ""
            try:
                for s in plan.create:
                    self._written(ns, self.client.create(SLICES, stored_form(s), ns))
                for s in plan.update:
                    body = stored_form(s)
                    body["metadata"]["resourceVersion"] = s.metadata.resource_version
                    self._written(ns, self.client.replace(SLICES, body))
                for s in plan.delete:
                    try:
                        self.client.delete(SLICES, s.name, ns)
                    except NotFound:
                        pass
                    with self.cond:
                        self._put_slice(object_key(EndpointSlice, s.name, ns), ns, None)
            except (Conflict, NotFound) as e:
                log.info("Service %s/%s: %s; reading its slices again", ns, name, e)
                self._reread_api(ns)
                continue
            except KubeError as e:
                raise PodnetError(f"Service {ns}/{name}: writing its slices: {e}") from None
            return describe(plan)
        raise PodnetError(f"Service {ns}/{name}: its slices kept changing under {CAS_ATTEMPTS} writes")

    def _written(self, ns: str, obj: dict) -> None:
        model = _model(obj)
        if model is not None:
            with self.cond:
                self._put_slice(object_key(EndpointSlice, model.name, ns), ns, model)  # type: ignore[arg-type]

    def _reread_api(self, ns: str) -> None:
        try:
            items = self.client.list(SLICES, ns).get("items") or []
        except KubeError as e:
            log.warning("listing the slices of namespace %s: %s", ns, e)
            return
        fresh = {}
        for obj in items:
            obj.setdefault("kind", SLICES.kind)
            obj.setdefault("apiVersion", SLICES.api_version)
            model = _model(obj)
            if model is not None:
                fresh[object_key(EndpointSlice, model.name, ns)] = model
        with self.cond:
            for key in [k for k in self.slices if k.startswith(kind_prefix(EndpointSlice, ns))]:
                if key not in fresh:
                    self._put_slice(key, ns, None)
            for key, s in fresh.items():
                self._put_slice(key, ns, s)  # type: ignore[arg-type]


def run(kubeconfig: str, synced_file: Path, ready_file: Path | None, stopping: threading.Event | None = None) -> None:
    stopping = stopping or threading.Event()
    client = KubeClient(KubeConfig.from_kubeconfig(kubeconfig), user_agent="podnet-lab-endpointslice-controller")
    ctl = KubeEndpointController(client)

    def handler(cls: type[KubeObject]):
        return lambda _r, changes, _rv, _relist: ctl.on_api_change(cls, changes)

    ctl.reflectors = [Reflector(KubeClient(client.cfg), resource_of(cls), handler(cls), stopping=stopping)
                      for cls in KINDS]
    threads = [threading.Thread(target=r.run, name=f"watch-{r.name}", daemon=True) for r in ctl.reflectors]
    for t in threads:
        t.start()

    def follow_bookmarks() -> None:  # a watch that only moves on bookmarks still moves the revision
        last = 0
        while not stopping.wait(0.2):
            rev = ctl.watched_revision()
            if rev > last:
                last = rev
                ctl.on_change(rev, [])
        ctl.on_change(0, [])  # wake take() to see stopping

    threading.Thread(target=follow_bookmarks, daemon=True).start()
    reconcile_rounds(ctl, stopping, ctl.reconcile_api, synced_file, ready_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m podnet.lab.kubeendpoints",
                                description="keep the API server's EndpointSlices in step with its Pods and Services")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--synced-file", required=True, type=Path,
                   help="where the last resourceVersion whose changes are in the slices is written")
    p.add_argument("--ready-file", type=Path, help="written once the first lists are reconciled")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        run(args.kubeconfig, args.synced_file, args.ready_file)
    except (PodnetError, ApiError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
