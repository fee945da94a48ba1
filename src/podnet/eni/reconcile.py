"""The pool's state rebuilt from the cloud (which addresses the node holds) and the store
(which of them pods hold): at agent start and every reconcile interval.

    - ENIs attached to the instance: podnet's (by tag) and, in shared mode, the instance's
      own primary ENI when its subnet is one of the CloudNetwork's; each one's addresses
      the cloud lists are the node's: held by a pod if a record says so, cooling if a
      record says that, idle otherwise (adopted: an agent killed between the cloud's
      answer and the record's write left it there).
    - an address the pool knew that the cloud no longer lists is dropped (if a pod held
      it, that is reported: the cloud took it away).
    - podnet ENIs of the node that are not attached (a crash between Create and Attach,
      or a failed Attach whose Delete failed) are deleted once older than the leak grace.
    - address records of handles without a CNI attachment record (the pod is gone and
      its DEL never came), older than the grace, are released.
    - address records of addresses the node no longer holds, with no pod on them, are
      deleted.

Nothing is handed out twice: an address is idle only if no record holds it, and the
record's compare-and-swap stands behind that when a pod takes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from podnet.eni import records as rec
from podnet.eni.cloud import TAG_CREATED, TAG_NODE, CloudClient
from podnet.eni.model import EniSlot
from podnet.eni.pool import EniPool, PoolConfig
from podnet.store.base import KeyValueStore, Op, StoreError

log = logging.getLogger("podnet.eni")

# DescribeNetworkInterfaces is the call EC2 throttles first at scale (aws-vpc-cni #617, at
# ~500 nodes): each reconcile makes one (the instance's ENIs), and the scan for never-attached
# ENIs (a second one, by tag) runs only on the first reconcile and every 10th after it.
LEAK_SCAN_EVERY = 10


class Reconciler:
    """Called by the pool's manager thread (and once before it starts)."""

    def __init__(self, cfg: PoolConfig, cloud: CloudClient, kv_factory: Callable[[], KeyValueStore],
                 attachment_exists: Callable[[KeyValueStore, str], bool] | None = None,
                 wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self.cloud = cloud
        self.kv_factory = kv_factory
        self.attachment_exists = attachment_exists
        self.wall = wall
        self.problems: list[str] = []
        self.runs = 0

    def __call__(self, pool: EniPool) -> None:
        self.runs += 1
        cfg = self.cfg
        attached = self.cloud.instance_enis(cfg.instance_id)
        usable = [e for e in attached if self._usable(e)]
        kv = self.kv_factory()
        try:
            stored = rec.read(kv, cfg.node)
            self._collect_leaked_records(kv, stored, pool)
            stored = rec.read(kv, cfg.node)
            problems = self._apply(pool, usable, stored, attached)
            self._drop_stale_records(kv, stored, pool)
        finally:
            kv.close()
        if self.runs % LEAK_SCAN_EVERY == 1 or LEAK_SCAN_EVERY == 1:
            self._delete_leaked_enis()  # a second Describe: only every LEAK_SCAN_EVERY-th run
        self.problems = problems
        for p in problems:
            log.error("node %s: %s", cfg.node, p)

    def _usable(self, eni) -> bool:
        if eni.podnet:
            return eni.tags.get(TAG_NODE) == self.cfg.node and eni.device_index is not None
        return (self.cfg.mode == "shared" and self.cfg.use_primary_eni and eni.device_index == 0
                and eni.subnet_id in self.cfg.subnets)

    def _apply(self, pool: EniPool, usable, stored: rec.NodeRecords, attached) -> list[str]:
        cfg = self.cfg
        problems = []
        now_mono, now_wall = pool.clock(), self.wall()
        with pool._cond:
            st = pool.state
            cloud_addresses: dict[str, str] = {}
            for e in usable:
                slot = st.enis.get(e.id)
                if slot is None:
                    slot = EniSlot(e.id, e.subnet_id, e.device_index, e.primary_ip, e.attachment_id, e.mac, e.podnet)
                    st.enis[e.id] = slot
                if cfg.mode == "exclusive":
                    slot.addresses = set()
                    cloud_addresses[e.primary_ip] = e.id
                else:
                    slot.addresses = set(e.secondary)
                    for a in e.secondary:
                        cloud_addresses[a] = e.id
            for eni_id in [i for i in st.enis if i not in {e.id for e in usable}]:
                del st.enis[eni_id]
            st.foreign = {e.device_index for e in attached if e.id not in {u.id for u in usable}
                          and e.device_index is not None}
            for address in [a for a in st.eni_of if a not in cloud_addresses]:
                handle = st.assigned.get(address)
                if handle is not None:
                    problems.append(f"address {address} of pod {handle} is no longer on an ENI of the instance "
                                    f"{cfg.instance_id} in the cloud")
                st.forget(address)
            for address, eni in cloud_addresses.items():
                if address in st.eni_of:
                    continue
                st.eni_of[address] = eni
                r = stored.addresses.get(address)
                if r is not None and r.handle:
                    st.assign(address, r.handle)
                elif r is not None and r.cooling_until and r.cooling_until > now_wall:
                    st.cooling[address] = (eni, now_mono + (r.cooling_until - now_wall))
                else:
                    st.idle[address] = eni
            # records the memory does not know yet (a pod took it while the agent was away)
            for address, r in stored.addresses.items():
                if r.handle and address in st.eni_of and st.assigned.get(address) != r.handle:
                    st.assign(address, r.handle)
            for handle, address in stored.handles.items():
                if address not in cloud_addresses:
                    problems.append(f"pod {handle} holds {address}, which no ENI of instance {cfg.instance_id} "
                                    "has in the cloud")
            pool._serve()
            pool._cond.notify_all()
        return problems

    def _collect_leaked_records(self, kv: KeyValueStore, stored: rec.NodeRecords, pool: EniPool) -> None:
        if self.attachment_exists is None:
            return
        now = self.wall()
        for address, r in stored.addresses.items():
            if not r.handle or (r.at or 0) > now - self.cfg.leak_grace:
                continue
            if self.attachment_exists(kv, r.handle):
                continue
            try:
                kv.txn(rec.release_ops(self.cfg.node, r.handle, address, r.eni, self.cfg.cooldown))
            except StoreError as e:
                log.warning("node %s: releasing leaked %s of %s: %s", self.cfg.node, address, r.handle, e)
                continue
            pool.release(address)
            log.warning("node %s: released %s of %s (no CNI attachment for %.0f s)", self.cfg.node, address,
                        r.handle, now - (r.at or now))

    def _drop_stale_records(self, kv: KeyValueStore, stored: rec.NodeRecords, pool: EniPool) -> None:
        with pool._cond:
            known = set(pool.state.eni_of)
        for address, r in stored.addresses.items():
            if r.handle is None and address not in known:
                try:
                    kv.txn([Op.delete(rec.address_key(self.cfg.node, address), r.revision)])
                except StoreError:
                    pass

    def _delete_leaked_enis(self) -> None:
        now = self.wall()
        for e in self.cloud.node_enis(self.cfg.node):
            if e.device_index is not None or e.status not in ("available", ""):
                continue
            try:
                created = float(e.tags.get(TAG_CREATED, "0"))
            except ValueError:
                created = 0.0
            if now - created < self.cfg.leak_grace:
                continue
            try:
                self.cloud.delete_eni(e.id)
                log.warning("node %s: deleted leaked ENI %s (never attached, made %.0f s ago)", self.cfg.node, e.id,
                            now - created)
            except Exception as ex:  # the next reconcile tries again
                log.warning("node %s: deleting leaked ENI %s: %s", self.cfg.node, e.id, ex)
