"""The lab's EndpointSlice controller: keeps every selector Service's EndpointSlices in
step with the Pods, Services and Nodes in the store, as Kubernetes' controller does.

It follows the store with the agent's informer (StoreFollower: one list, then one
watch) as one more event-fed consumer: each event updates its indexes and marks only
the Services it concerns (a Service's own change; a Pod's change for the Services
whose selector picks the pod before or after it; a Node's zone change for the
Services with pods on that node; a change by someone else to a slice it manages).
The main thread takes the marked Services in batches, plans their slices
(endpoints.plan_slices) and writes only slices whose content changed, one
compare-and-swap transaction per Service. A write that loses its race re-reads that
Service's slices from the store and plans again.

When every event up to revision R is reflected in the slices it writes R to its
`--synced-file`, which is what the lab and the tests wait on. It holds nothing
that is not in the store: killed at any moment it loses nothing (each write is one
transaction), and started again it lists and reconciles everything.

    python -m podnet.lab.endpointcontroller --store URL --synced-file PATH [--ready-file PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from podnet.agent.cache import ObjectCache
from podnet.agent.contract import Dataplane
from podnet.agent.follow import StoreFollower
from podnet.errors import PodnetError
from podnet.lab.endpoints import (
    ZONE_LABEL,
    SlicePlan,
    managed_service,
    plan_slices,
    selects,
    serves,
    trigger_time,
)
from podnet.model.objects import KINDS, EndpointSlice, Node, Pod, Service
from podnet.store import credentials, open_store, reopen
from podnet.store.base import AlreadyExists, Conflict, KeyValueStore, NotFound, Op
from podnet.store.credentials import EtcdCredentials
from podnet.store.objects import (
    OBJECTS_PREFIX,
    UndecodableObject,
    decode,
    key_of,
    kind_prefix,
    object_key,
    split_object_key,
    stored_form,
)

log = logging.getLogger("podnet.endpoints")

ServiceRef = tuple[str, str]  # (namespace, name)
CAS_ATTEMPTS = 5
RETRY_SECONDS = 1.0


def _endpoint_view(pod: Pod) -> tuple:
    """What of a pod its endpoints are made of: a change elsewhere concerns no Service."""
    return (pod.metadata.uid, tuple(sorted(pod.labels.items())), serves(pod), pod.status.pod_ip, pod.spec.node_name,
            pod.spec.hostname, pod.spec.subdomain,
            tuple((p.name, p.protocol, p.container_port) for c in pod.spec.containers for p in c.ports))


class EndpointController(Dataplane):
    """Indexes of Pods, Services, Node zones and slices, fed by the follower; the
    Services to reconcile, each with the time of the first change not yet written."""

    name = "endpointslices"

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.dirty: dict[ServiceRef, float] = {}
        self.revision = 0  # every event up to here is in the indexes
        self._reset()

    def _reset(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.pods_by_ns: dict[str, set[str]] = {}
        self.pods_by_node: dict[str, set[str]] = {}
        self.services: dict[ServiceRef, Service] = {}
        self.services_by_ns: dict[str, set[str]] = {}
        self.zones: dict[str, str | None] = {}
        self.slices: dict[str, EndpointSlice] = {}  # every slice, by key (their names are taken)
        self.managed: dict[ServiceRef, set[str]] = {}  # slice keys this controller manages, per Service

    # ------------------------------------------------------------------ events (the follower's thread)

    def begin_reload(self) -> None:
        with self.cond:
            self._reset()

    def end_reload(self, listed: frozenset[str] | set[str]) -> None:  # begin_reload started afresh
        with self.cond:
            now = time.time()
            for ref in [*self.services, *self.managed]:
                self.dirty.setdefault(ref, now)

    def on_event(self, ev) -> bool:  # noqa: ANN001 - an ObjectEvent
        parts = split_object_key(ev.key)
        if parts is None:
            return False
        kind, ns, name = parts
        now = time.time()
        with self.cond:
            before = len(self.dirty)
            if kind == Pod.KIND:
                self._on_pod(ev.key, ns or "default", ev.object, now)
            elif kind == Service.KIND:
                self._on_service((ns or "default", name), ev.object, now)
            elif kind == Node.KIND:
                self._on_node(name, ev.object, now)
            elif kind == EndpointSlice.KIND:
                self._on_slice(ev.key, ns or "default", ev.object, ev.revision, now)
            return len(self.dirty) > before

    def _mark(self, ref: ServiceRef, now: float) -> None:
        self.dirty.setdefault(ref, now)

    def _on_pod(self, key: str, ns: str, pod: Pod | None, now: float) -> None:
        old = self.pods.pop(key, None)
        if old is not None:
            self.pods_by_node.get(old.spec.node_name or "", set()).discard(key)
        if pod is not None:
            self.pods[key] = pod
            self.pods_by_ns.setdefault(ns, set()).add(key)
            self.pods_by_node.setdefault(pod.spec.node_name or "", set()).add(key)
        else:
            self.pods_by_ns.get(ns, set()).discard(key)
        if old is not None and pod is not None and _endpoint_view(old) == _endpoint_view(pod):
            return
        for name in self.services_by_ns.get(ns, ()):
            svc = self.services[(ns, name)]
            if selects(svc, old) or selects(svc, pod):
                self._mark((ns, name), now)

    def _on_service(self, ref: ServiceRef, svc: Service | None, now: float) -> None:
        old = self.services.get(ref)
        if svc is None:
            self.services.pop(ref, None)
            self.services_by_ns.get(ref[0], set()).discard(ref[1])
        else:
            self.services[ref] = svc
            self.services_by_ns.setdefault(ref[0], set()).add(ref[1])
        if old is None or svc is None or old.spec != svc.spec:
            self._mark(ref, now)

    def _on_node(self, name: str, node: Node | None, now: float) -> None:
        zone = node.labels.get(ZONE_LABEL) if node is not None else None
        if node is None:
            old = self.zones.pop(name, None)
        else:
            old = self.zones.get(name)
            self.zones[name] = zone
        if old == zone:
            return
        for key in self.pods_by_node.get(name, ()):
            pod = self.pods[key]
            ns = pod.namespace or "default"
            for svc_name in self.services_by_ns.get(ns, ()):
                if selects(self.services[(ns, svc_name)], pod):
                    self._mark((ns, svc_name), now)

    def _on_slice(self, key: str, ns: str, s: EndpointSlice | None, revision: int, now: float) -> None:
        old = self.slices.get(key)
        if old is not None and int(old.metadata.resource_version or 0) >= revision:
            return  # this controller's own write (or older news than it has)
        self._put_slice(key, ns, s)
        for sl in (old, s):
            svc = managed_service(sl) if sl is not None else None
            if svc is not None:
                self._mark((ns, svc), now)

    def _put_slice(self, key: str, ns: str, s: EndpointSlice | None) -> None:
        old = self.slices.pop(key, None)
        if old is not None and (svc := managed_service(old)) is not None:
            self.managed.get((ns, svc), set()).discard(key)
        if s is not None:
            self.slices[key] = s
            if (svc := managed_service(s)) is not None:
                self.managed.setdefault((ns, svc), set()).add(key)

    def sync(self, full: bool) -> str:  # the controller writes from its own loop (run)
        return ""

    def on_change(self, revision: int, _dirty: list[Dataplane]) -> None:
        with self.cond:
            self.revision = max(self.revision, revision)
            self.cond.notify_all()

    # ------------------------------------------------------------------ reconciling (the main thread)

    def take(self, stopping: threading.Event, after: int) -> tuple[dict[ServiceRef, float], int] | None:
        """Wait for Services to reconcile or for a revision past `after`; None when stopping."""
        with self.cond:
            while not self.dirty and self.revision <= after and not stopping.is_set():
                self.cond.wait()
            if stopping.is_set():
                return None
            batch, self.dirty = self.dirty, {}
            return batch, self.revision

    def again(self, batch: dict[ServiceRef, float]) -> None:
        with self.cond:
            for ref, when in batch.items():
                self.dirty[ref] = min(when, self.dirty.get(ref, when))

    def plan(self, ref: ServiceRef, when: float) -> SlicePlan:
        """The writes that bring one Service's slices to what its pods say now."""
        ns, name = ref
        with self.cond:
            return plan_slices(
                ns, name, self.services.get(ref),
                [self.pods[k] for k in self.pods_by_ns.get(ns, ())], self.zones.get,
                [self.slices[k] for k in self.managed.get(ref, ())],
                lambda n: object_key(EndpointSlice, n, ns) in self.slices, trigger_time(when))

    def reconcile(self, kv: KeyValueStore, ref: ServiceRef, when: float) -> str:
        """Bring one Service's slices to what its pods say; what changed ("" if nothing)."""
        ns, name = ref
        for _ in range(CAS_ATTEMPTS):
            plan = self.plan(ref, when)
            if not plan:
                return ""
            ops = [Op.create(key_of(s), stored_form(s)) for s in plan.create]
            ops += [Op.update(key_of(s), stored_form(s), int(s.metadata.resource_version or 0)) for s in plan.update]
            ops += [Op.delete(key_of(s), int(s.metadata.resource_version or 0)) for s in plan.delete]
            try:
                rev = kv.txn(ops)
            except (Conflict, AlreadyExists, NotFound) as e:
                log.info("Service %s/%s: %s; reading its slices again", ns, name, e)
                self._reread(kv, ns)
                continue
            with self.cond:
                for s in [*plan.create, *plan.update]:
                    self._put_slice(key_of(s), ns, s.with_meta(resource_version=str(rev)))  # type: ignore[arg-type]
                for s in plan.delete:
                    self._put_slice(key_of(s), ns, None)
            return describe(plan)
        raise PodnetError(f"Service {ns}/{name}: its slices kept changing under {CAS_ATTEMPTS} writes")

    def _reread(self, kv: KeyValueStore, ns: str) -> None:
        """The namespace's slices as the store has them now (newer than the watch has told)."""
        records, _ = kv.list(kind_prefix(EndpointSlice, ns))
        fresh: dict[str, EndpointSlice] = {}
        for r in records:
            with contextlib.suppress(UndecodableObject):
                fresh[r.key] = decode(r)  # type: ignore[assignment]
        with self.cond:
            for key in [k for k in self.slices if k.startswith(kind_prefix(EndpointSlice, ns))]:
                if key not in fresh:
                    self._put_slice(key, ns, None)
            for key, s in fresh.items():
                old = self.slices.get(key)
                if old is None or int(old.metadata.resource_version or 0) < int(s.metadata.resource_version or 0):
                    self._put_slice(key, ns, s)


def describe(plan: SlicePlan) -> str:
    return "; ".join(f"{what} {', '.join(f'{s.name} ({len(s.endpoints)} endpoints)' for s in slices)}"
                     for what, slices in (("created", plan.create), ("updated", plan.update),
                                          ("deleted", plan.delete)) if slices)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(url: str, synced_file: Path, ready_file: Path | None, stopping: threading.Event | None = None,
        creds: EtcdCredentials | None = None) -> None:
    """Follow the store at `url` and keep its EndpointSlices current until `stopping` is set."""
    stopping = stopping or threading.Event()
    ctl = EndpointController()
    follower = StoreFollower(ObjectCache(unkept=KINDS), [ctl], ctl.on_change, prefix=OBJECTS_PREFIX)
    kv = open_store(url, create=False, credentials=creds)
    try:
        rev = follower.relist(kv)
        watcher = threading.Thread(target=follower.watch, args=(lambda: reopen(kv), rev + 1),
                                   name="watch", daemon=True)
        watcher.start()
        stop_waiting = threading.Thread(target=lambda: (stopping.wait(), ctl.on_change(0, [])), daemon=True)
        stop_waiting.start()
        reconcile_rounds(ctl, stopping, lambda ref, when: ctl.reconcile(kv, ref, when), synced_file, ready_file)
    finally:
        follower.stop()
        kv.close()



def reconcile_rounds(ctl: EndpointController, stopping: threading.Event,
                     reconcile: Callable[[ServiceRef, float], str], synced_file: Path,
                     ready_file: Path | None) -> None:
    """Reconcile the Services each change touched, round after round, until `stopping`; after a
    round, the revision whose changes are all in the slices goes to `synced_file` (and, the
    first time, to `ready_file`). A Service whose slices could not be written (the store or the
    API server away or busy) is kept for the next round."""
    written = -1
    ready = False
    while True:
        got = ctl.take(stopping, written)
        if got is None:
            return
        batch, rev = got
        failed: dict[ServiceRef, float] = {}
        for ref, when in sorted(batch.items()):
            try:
                done = reconcile(ref, when)
            except PodnetError as e:
                log.warning("Service %s/%s: %s", *ref, e)
                failed[ref] = when
                continue
            if done:
                log.info("Service %s/%s: %s", *ref, done)
        if failed:
            ctl.again(failed)
            stopping.wait(RETRY_SECONDS)
            continue
        if rev:
            write_atomically(synced_file, f"{rev}\n")
            if not ready and ready_file is not None:
                write_atomically(ready_file, f"{rev}\n")
                ready = True
        written = rev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m podnet.lab.endpointcontroller",
                                description="keep the store's EndpointSlices in step with its Pods and Services")
    p.add_argument("--store", required=True, metavar="URL")
    p.add_argument("--synced-file", required=True, type=Path,
                   help="where the last store revision whose changes are in the slices is written")
    p.add_argument("--ready-file", type=Path, help="written once the first list is reconciled")
    credentials.add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        run(args.store, args.synced_file, args.ready_file, creds=credentials.from_args(args))
    except PodnetError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
