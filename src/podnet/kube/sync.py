"""`podnet kube-sync`: the Kubernetes API as podnet's source. One active replica (a Lease,
kube/leader.py) reflects Namespaces, Nodes, Pods, Services, EndpointSlices, NetworkPolicies and
podnet's own kinds (podnet.io/v1, served as CRDs) into podnet's store, which stays the one
place every node's agent follows: N agents never watch the API server.

    API server --reflector per kind (list + watch)--> queue --writer--> store (txn)
        ^                                                   |
        +---- write-back: Events and status of invalid objects, Node NetworkUnavailable=False

The writer keeps what the store holds of each reflected kind (value and revision). For each
change it writes the object's dataplane fields (kube/project.py) when they differ from the
stored value, as one compare-and-swap; changes of one batch (a relist: every change it implies)
go in transactions of up to `batch_size` writes, each whole or not at all. A relist also removes
stored objects the API no longer has (deleted while nobody watched, or under another leader).

Every transaction also compares the fencing record (/podnet-alloc/kube-sync/leader), which the
leader writes with its term when it takes over: a deposed leader that still writes loses the
compare, stops, and leaves the store to the new one.

Objects podnet refuses (a custom resource the API server's schema let through, a value podnet
does not take) never reach the store: the last valid version stays, and the object gets a
Warning Event naming the field and, for podnet's kinds, the status condition Accepted=False.

When a node's agent has programmed the node it says so in the store (/podnet-alloc/agents/<node>,
written by the agent); kube-sync then sets the Node's condition NetworkUnavailable=False, as
Calico does, so that the scheduler places pods there.

The network-status annotation an agent writes into a Pod in the store (a Pod with additional
networks) is patched onto the API Pod, and reflecting the API Pod keeps it (kube/podstatus.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from podnet.kube import podstatus
from podnet.kube.client import ApiError, KubeClient, KubeError, Resource
from podnet.kube.leader import LeaderElector
from podnet.kube.project import Rejected, ref_of, to_stored
from podnet.kube.reflector import Change, Reflector
from podnet.model.objects import KINDS, KubeObject
from podnet.store.base import (
    AlreadyExists,
    Conflict,
    KeyValueStore,
    NotFound,
    Op,
    StoreError,
    StoreUnavailable,
)
from podnet.store.layout import AGENTS, KUBE_SYNC_FENCE
from podnet.store.objects import kind_prefix, object_key, split_object_key

log = logging.getLogger("podnet.kube")

PODNET_GROUP = "podnet.io"
NODES = Resource("", "v1", "nodes", "Node", False)
PODS = Resource("", "v1", "pods", "Pod", True)
EVENTS = Resource("", "v1", "events", "Event", True)
COMPONENT = "podnet-kube-sync"


def resource_of(cls: type[KubeObject]) -> Resource:
    group, _, version = cls.API_VERSIONS[0].rpartition("/")
    return Resource(group, version, cls.PLURAL, cls.KIND, cls.NAMESPACED)


def reflected_kinds() -> list[type[KubeObject]]:
    """Every kind podnet reads: the core ones and its own (podnet.io/v1, as CRDs)."""
    return list(KINDS.values())


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Deposed(StoreError):
    """Another kube-sync took over: its fencing record replaced ours."""


# ---------------------------------------------------------------- write-back


class Reporter:
    """What kube-sync tells the API server, from a thread of its own so that a slow API server
    never holds up the store: Events and status conditions of objects podnet refuses, and
    NetworkUnavailable=False on the Nodes whose agent is ready."""

    def __init__(self, client: KubeClient, identity: str, enabled: bool = True):
        self.client = client
        self.identity = identity
        self.enabled = enabled
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._reported: dict[str, str] = {}  # uid or ref -> the message last reported
        self._accepted: set[str] = set()  # uids whose Accepted=True was written
        self._ready_nodes: set[str] = set()
        self._available: set[str] = set()  # nodes whose condition is NetworkUnavailable=False
        self._statuses: dict[str, tuple[str, str]] = {}  # ns/name -> (uid, network-status) queued
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.done = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kube-report", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except KubeError as e:
                log.warning("write-back to the API server failed: %s", e)
            self.done += 1

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0 or self._queue.empty()

    # ------------------------------------------------------------ invalid objects

    def rejected(self, obj: dict, err: Rejected) -> None:
        meta = obj.get("metadata") or {}
        ident = meta.get("uid") or ref_of(obj)
        message = f"podnet refuses {err}: the store keeps the last valid version, if any"
        with self._lock:
            if self._reported.get(ident) == message:
                return
            self._reported[ident] = message
            self._accepted.discard(ident)
        log.warning("%s", message)
        if self.enabled:
            self._queue.put(lambda: self._report_invalid(obj, message))

    def accepted(self, obj: dict) -> None:
        """A podnet.io object podnet takes: its status says so (once)."""
        if not obj.get("apiVersion", "").startswith(PODNET_GROUP + "/"):
            return
        meta = obj.get("metadata") or {}
        ident = meta.get("uid") or ref_of(obj)
        conds = (obj.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Accepted" and c.get("status") == "True" for c in conds if isinstance(c, dict)):
            with self._lock:
                self._accepted.add(ident)
                self._reported.pop(ident, None)
            return
        with self._lock:
            if ident in self._accepted:
                return
            self._accepted.add(ident)
            self._reported.pop(ident, None)
        if self.enabled:
            self._queue.put(lambda: self._set_condition(obj, "True", "Valid", "podnet accepted the object"))

    def _report_invalid(self, obj: dict, message: str) -> None:
        meta = obj.get("metadata") or {}
        now = now_rfc3339()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": meta.get("namespace") or "default"},
            "involvedObject": {k: v for k, v in {
                "apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
                "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion")}.items() if v},
            "reason": "InvalidObject", "message": message, "type": "Warning",
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT, "reportingInstance": self.identity,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        self.client.create(EVENTS, event, event["metadata"]["namespace"])
        if obj.get("apiVersion", "").startswith(PODNET_GROUP + "/"):
            self._set_condition(obj, "False", "Invalid", message)

    def _set_condition(self, obj: dict, status: str, reason: str, message: str) -> None:
        cls = KINDS.get(obj.get("kind", ""))
        if cls is None:
            return
        meta = obj.get("metadata") or {}
        cond = {"type": "Accepted", "status": status, "reason": reason, "message": message,
                "lastTransitionTime": now_rfc3339()}
        if meta.get("generation"):
            cond["observedGeneration"] = meta["generation"]
        try:
            self.client.patch(resource_of(cls), meta["name"], {"status": {"conditions": [cond]}},
                              meta.get("namespace"), sub="status")
        except ApiError as e:
            if e.code != 404:
                raise
            log.info("%s: no status to write (%s)", ref_of(obj), e.message)

    # ------------------------------------------------------------ network-status

    def network_status(self, namespace: str, name: str, uid: str, text: str) -> None:
        """The API Pod should carry the store's network-status annotation: patch it (once while
        that patch waits in the queue; again when asked after it was sent)."""
        key = f"{namespace}/{name}"
        with self._lock:
            if self._statuses.get(key) == (uid, text):
                return
            self._statuses[key] = (uid, text)
        if self.enabled:
            self._queue.put(lambda: self._patch_network_status(namespace, name, uid, text))

    def _patch_network_status(self, namespace: str, name: str, uid: str, text: str, attempt: int = 0) -> None:
        with self._lock:
            self._statuses.pop(f"{namespace}/{name}", None)  # sent from now on: a later loss asks again
        try:
            self.client.patch(PODS, name, podstatus.patch(uid, text), namespace)
        except ApiError as e:
            if e.code in (404, 409):  # gone, or made again under the same name (the uid precondition)
                log.info("Pod %s/%s: network-status not patched: %s", namespace, name, e.message)
                return
            self._again_later(f"Pod {namespace}/{name}: patching its network-status", e, attempt,
                              lambda: self._patch_network_status(namespace, name, uid, text, attempt + 1))
            return
        except KubeError as e:
            self._again_later(f"Pod {namespace}/{name}: patching its network-status", e, attempt,
                              lambda: self._patch_network_status(namespace, name, uid, text, attempt + 1))
            return
        log.info("Pod %s/%s: network-status annotation patched from the store", namespace, name)

    def _again_later(self, what: str, err: KubeError, attempt: int, job: Callable[[], None]) -> None:
        """A write-back that failed for a transient reason: nothing else would ask again until
        the object changes, so queue it again after a capped backoff."""
        delay = min(30.0, 0.5 * 2 ** attempt)
        log.warning("%s failed (%s); again in %.1f s", what, err, delay)
        timer = threading.Timer(delay, lambda: self._queue.put(job) if self.enabled else None)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------ NetworkUnavailable

    def node_seen(self, node: dict) -> None:
        """A Node from the API: set the condition if its agent is ready and it is not set yet."""
        name = (node.get("metadata") or {}).get("name", "")
        conds = (node.get("status") or {}).get("conditions") or []
        available = any(isinstance(c, dict) and c.get("type") == "NetworkUnavailable" and c.get("status") == "False"
                        for c in conds)
        with self._lock:
            if available:
                self._available.add(name)
                return
            self._available.discard(name)
            due = name in self._ready_nodes
        if due and self.enabled:
            self._queue.put(lambda: self._network_available(name))

    def agent_ready(self, node: str) -> None:
        with self._lock:
            self._ready_nodes.add(node)
            due = node not in self._available
        if due and self.enabled:
            self._queue.put(lambda: self._network_available(node))

    def _network_available(self, node: str, attempt: int = 0) -> None:
        with self._lock:
            if node in self._available:
                return
        now = now_rfc3339()
        patch = {"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "PodnetIsUp",
                                            "message": "the podnet agent has programmed this node",
                                            "lastTransitionTime": now, "lastHeartbeatTime": now}]}}
        try:
            self.client.patch(NODES, node, patch, sub="status", content_type="application/strategic-merge-patch+json")
        except ApiError as e:
            if e.code == 404:
                log.info("Node %s is not in the API yet: its NetworkUnavailable condition waits for it", node)
                return
            self._again_later(f"Node {node}: setting NetworkUnavailable=False", e, attempt,
                              lambda: self._network_available(node, attempt + 1))
            return
        except KubeError as e:
            self._again_later(f"Node {node}: setting NetworkUnavailable=False", e, attempt,
                              lambda: self._network_available(node, attempt + 1))
            return
        with self._lock:
            self._available.add(node)
        log.info("Node %s: NetworkUnavailable=False (its agent is ready)", node)


# ---------------------------------------------------------------- the store side


@dataclass
class WriterStats:
    writes: int = 0  # objects written or deleted
    txns: int = 0
    unchanged: int = 0  # changes that left the dataplane fields as they were: nothing written
    rejected: int = 0
    conflicts: int = 0


@dataclass
class _Batch:
    cls: type[KubeObject]
    changes: list[Change]
    listed: set[str] | None = None  # a relist: every API key of the kind
    done: threading.Event = field(default_factory=threading.Event)


class StoreWriter:
    def __init__(self, kv: KeyValueStore, identity: str, term: int, reporter: Reporter, batch_size: int = 100):
        self.kv = kv
        self.identity = identity
        self.term = term
        self.reporter = reporter
        self.batch_size = max(2, batch_size)
        self.stored: dict[str, tuple[dict, int]] = {}  # store key -> (value, revision)
        self.fence_rev = 0
        self.stats = WriterStats()
        self.revision = 0  # the store revision of the last write

    @property
    def fence_value(self) -> dict:
        return {"holder": self.identity, "term": self.term}

    def take_fence(self) -> None:
        self.fence_rev = self.kv.put(KUBE_SYNC_FENCE, self.fence_value)

    def load(self, kinds: Iterable[type[KubeObject]]) -> None:
        for cls in kinds:
            records, _ = self.kv.list(kind_prefix(cls))
            for r in records:
                self.stored[r.key] = (r.value, r.revision)

    def apply(self, *batches: _Batch) -> None:
        """Write what the batches change, in as few transactions as the store takes (one per
        batch_size writes): a transaction per watch event would cap the changes per second at
        what the store commits per second (a 3-member etcd: fewer than 200)."""
        pending: dict[str, dict | None] = {}  # store key -> its value after the batches (None: deleted)
        for batch in batches:
            self._stage(batch, pending)
        ops = []
        for skey, value in pending.items():
            old = self.stored.get(skey)
            if value is None:
                if old is not None:
                    ops.append(Op.delete(skey, old[1]))
            elif old is None:
                ops.append(Op.create(skey, value))
            elif old[0] != value:
                ops.append(Op.update(skey, value, old[1]))
        self.commit(ops)

    def _current(self, skey: str, pending: dict[str, dict | None]) -> dict | None:
        if skey in pending:
            return pending[skey]
        old = self.stored.get(skey)
        return old[0] if old is not None else None

    def _stage(self, batch: _Batch, pending: dict[str, dict | None]) -> None:
        cls = batch.cls
        touched: set[str] = set()
        for ch in batch.changes:
            skey = _store_key(cls, ch.key)
            if ch.type == "DELETED":
                if skey not in touched:
                    pending[skey] = None
                    touched.add(skey)
                continue
            obj = ch.object or {}
            if cls.KIND == "Node":
                self.reporter.node_seen(obj)
            try:
                value = to_stored(obj)
            except Rejected as e:
                self.stats.rejected += 1
                self.reporter.rejected(obj, e)
                continue
            self.reporter.accepted(obj)
            current = self._current(skey, pending)
            if cls.KIND == "Pod":
                value = self._keep_network_status(skey, value, current)
            touched.add(skey)
            if current is not None and current == value:
                self.stats.unchanged += 1
                continue
            pending[skey] = value
        if batch.listed is not None:
            keep = {_store_key(cls, k) for k in batch.listed}
            prefix = kind_prefix(cls)
            for skey in [k for k in [*self.stored, *pending] if k.startswith(prefix) and k not in keep]:
                if skey not in touched and _kind_of_store_key(skey) == cls.KIND:
                    pending[skey] = None

    def _keep_network_status(self, skey: str, value: dict, stored: dict | None) -> dict:
        """The store's network-status annotation stays (the agent wrote it); an API Pod without
        it gets it patched on."""
        value, missing = podstatus.carry(value, stored)
        if missing is not None:
            parts = split_object_key(skey)
            if parts is not None:
                self.reporter.network_status(parts[1] or "default", parts[2], podstatus.uid(value), missing)
        return value

    def commit(self, ops: list[Op], stopping: threading.Event | None = None) -> None:
        step = self.batch_size - 1  # and the fencing compare
        for i in range(0, len(ops), step):
            self._txn(ops[i:i + step], stopping)

    def _txn(self, ops: list[Op], stopping: threading.Event | None) -> None:
        pause = 0.1
        while True:
            fence = Op.update(KUBE_SYNC_FENCE, self.fence_value, self.fence_rev)
            try:
                rev = self.kv.txn([*ops, fence])
            except (Conflict, NotFound, AlreadyExists) as e:
                if e.key == KUBE_SYNC_FENCE:
                    raise Deposed(f"another kube-sync leads now (its fencing record replaced term {self.term})") \
                        from None
                self.stats.conflicts += 1
                ops = self._refresh(ops, e.key)  # someone else wrote it: start from what is there
                if not ops:
                    return
                continue
            except StoreUnavailable as e:
                log.warning("store unavailable (%s); writing again in %.1f s", e, pause)
                if stopping is not None and stopping.wait(pause):
                    raise
                if stopping is None:
                    time.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            self.fence_rev = rev
            self.revision = rev
            self.stats.txns += 1
            for op in ops:
                self.stats.writes += 1
                if op.kind == "put":
                    self.stored[op.key] = (op.value, rev)  # type: ignore[assignment]
                else:
                    self.stored.pop(op.key, None)
            return

    def _refresh(self, ops: list[Op], key: str) -> list[Op]:
        rec = self.kv.get(key)
        if rec is None:
            self.stored.pop(key, None)
        else:
            self.stored[key] = (rec.value, rec.revision)
        out = []
        for op in ops:
            if op.key != key:
                out.append(op)
            elif op.kind == "put":
                value = op.value
                if rec is not None and _kind_of_store_key(key) == "Pod":
                    value = self._keep_network_status(key, value, rec.value)  # type: ignore[arg-type]
                if rec is not None and rec.value == value:
                    continue
                out.append(Op.update(key, value, rec.revision) if rec else Op.create(key, value))  # type: ignore[arg-type]
            elif rec is not None:
                out.append(Op.delete(key, rec.revision))
        return out


def _store_key(cls: type[KubeObject], api_key: str) -> str:
    ns, _, name = api_key.rpartition("/")
    return object_key(cls, name, ns or None)


def _kind_of_store_key(key: str) -> str:
    parts = split_object_key(key)
    return parts[0] if parts else ""


# ---------------------------------------------------------------- the controller


@dataclass
class KubeSyncConfig:
    identity: str
    lease_namespace: str = "kube-system"
    lease_name: str = "podnet-kube-sync"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0
    batch_size: int = 100
    page_size: int = 500
    write_back: bool = True
    kinds: list[type[KubeObject]] | None = None


class KubeSync:
    def __init__(self, client: KubeClient, open_kv: Callable[[], KeyValueStore], cfg: KubeSyncConfig):
        self.client = client
        self.open_kv = open_kv
        self.cfg = cfg
        self.kinds = cfg.kinds or reflected_kinds()
        self.stopping = threading.Event()
        self.elector = LeaderElector(client, cfg.lease_namespace, cfg.lease_name, cfg.identity,
                                     duration=cfg.lease_duration, renew_deadline=cfg.renew_deadline, retry=cfg.retry)
        self.writer: StoreWriter | None = None
        self.reflectors: list[Reflector] = []
        self.synced = threading.Event()  # leading, and every kind listed and written
        self.deposed = False
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._agents_kv: KeyValueStore | None = None
        self._pods_kv: KeyValueStore | None = None
        self.progress = threading.Condition()  # notified after each round of writes

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (on the writer's progress, not by polling) until predicate() holds."""
        with self.progress:
            return self.progress.wait_for(predicate, timeout)

    def run(self) -> None:
        """Campaign, lead while elected; returns when stopped or no longer leading."""
        self.elector.run(self._lead, self.stopping)

    def stop(self, *_: object) -> None:
        self.stopping.set()

    # ------------------------------------------------------------ leading

    def _lead(self, lost: threading.Event) -> None:
        kv = self.open_kv()
        reporter = Reporter(self.client, self.cfg.identity, self.cfg.write_back)
        end = threading.Event()
        threads: list[threading.Thread] = []
        try:
            writer = self.writer = StoreWriter(kv, self.cfg.identity, self.elector.term, reporter, self.cfg.batch_size)
            writer.take_fence()
            writer.load(self.kinds)
            reporter.start()
            self.reflectors = [Reflector(self.client, resource_of(cls), self._handler(cls), stopping=end,
                                         page_size=self.cfg.page_size) for cls in self.kinds]
            for r in self.reflectors:
                threads.append(threading.Thread(target=r.run, name=f"reflect-{r.name}", daemon=True))
            threads.append(threading.Thread(target=self._follow_agents, args=(reporter, end), name="agents",
                                            daemon=True))
            if any(cls.KIND == "Pod" for cls in self.kinds):
                threads.append(threading.Thread(target=self._follow_network_status, args=(reporter, end),
                                                name="network-status", daemon=True))
            for t in threads:
                t.start()
            threading.Thread(target=self._watch_end, args=(lost, end), daemon=True).start()
            self._write_loop(writer, end)
        except Deposed as e:
            log.error("%s; this replica stops writing", e)
            self.deposed = True
        except StoreError as e:
            log.error("the store failed: %s", e)
        finally:
            end.set()
            self._queue.put(None)
            for own in (self._agents_kv, self._pods_kv):
                if own is not None:
                    own.close()
            for r in self.reflectors:
                r.client.close()
            for t in threads:
                t.join(10)
            reporter.stop()
            kv.close()
            self.synced.clear()

    def _watch_end(self, lost: threading.Event, end: threading.Event) -> None:
        while not (lost.wait(0.5) or end.is_set() or self.stopping.is_set()):
            pass
        end.set()
        self._queue.put(None)

    def _handler(self, cls: type[KubeObject]) -> Callable[[Reflector, list[Change], str, bool], None]:
        def handle(r: Reflector, changes: list[Change], rv: str, relist: bool) -> None:
            self._queue.put(_Batch(cls, changes, set(r.known) if relist else None))
        return handle

    def _write_loop(self, writer: StoreWriter, end: threading.Event) -> None:
        first_lists = {cls.KIND for cls in self.kinds}
        while not end.is_set():
            batch = self._queue.get()
            if batch is None:
                continue
            batches = [batch]
            while len(batches) < 64:  # what else is queued goes along
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    end.set()
                    break
                batches.append(more)
            writer.apply(*batches)
            for b in batches:
                if b.listed is not None:
                    first_lists.discard(b.cls.KIND)
                b.done.set()
            if not first_lists and not self.synced.is_set():
                log.info("the store holds every kind listed from the API server (revision %d)", writer.revision)
                self.synced.set()
            with self.progress:
                self.progress.notify_all()

    def _follow_agents(self, reporter: Reporter, end: threading.Event) -> None:
        """Agents that say they are ready (AGENTS in the store) get NetworkUnavailable=False."""
        while not end.is_set():
            try:
                kv = self._agents_kv = self.open_kv()
                records, rev = kv.list(AGENTS)
                for r in records:
                    if isinstance(r.value, dict) and r.value.get("ready"):
                        reporter.agent_ready(r.key[len(AGENTS):])
                for ev in kv.watch(AGENTS, rev + 1, previous=False):
                    if end.is_set():
                        return
                    if ev.type != "DELETED" and isinstance(ev.value, dict) and ev.value.get("ready"):
                        reporter.agent_ready(ev.key[len(AGENTS):])
                return
            except StoreError as e:
                if end.is_set():
                    return
                log.warning("following the agents' readiness: %s; again in a moment", e)
                end.wait(1.0)

    def _follow_network_status(self, reporter: Reporter, end: threading.Event) -> None:
        """Pods whose network-status the agent wrote into the store: the API Pod gets it too."""
        prefix = kind_prefix(KINDS["Pod"])
        pods = next(r for r in self.reflectors if r.resource.kind == "Pod")

        def seen(key: str, value: object) -> None:
            text = podstatus.annotation(value)
            parts = split_object_key(key)
            if text is None or parts is None:
                return
            ns, name = parts[1] or "default", parts[2]
            api = pods.objects.get(f"{ns}/{name}")
            if api is None or podstatus.uid(api) != podstatus.uid(value) or podstatus.annotation(api) == text:
                return  # not (or no longer) in the API, or it has it already
            reporter.network_status(ns, name, podstatus.uid(value), text)

        while not end.is_set():
            try:
                if not pods.synced.wait(1.0):
                    continue
                kv = self._pods_kv = self.open_kv()
                records, rev = kv.list(prefix)
                for r in records:
                    seen(r.key, r.value)
                for ev in kv.watch(prefix, rev + 1, previous=False):
                    if end.is_set():
                        return
                    if ev.type != "DELETED":
                        seen(ev.key, ev.value)
                return
            except StoreError as e:
                if end.is_set():
                    return
                log.warning("following the Pods' network-status in the store: %s; again in a moment", e)
                end.wait(1.0)
