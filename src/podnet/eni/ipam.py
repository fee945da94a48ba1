"""The CNI handler's IPAM over a node's ENI pool: the same interface as podnet.ipam.IPAM
(allocate, release, lookup, capacity_problem), so the handler does not know which one
it has. One instance per store connection (the handler's sessions), one pool per node.

allocate: the pool hands out an address (idle at once, or after the next batched call),
then one store transaction records it for the pod (records.py); if that fails the
address goes back to the pool unused. release: one transaction (the handle's record
deleted, the address's turned into a cooling one), then the pool cools it down.
"""

from __future__ import annotations

from podnet.eni import records as rec
from podnet.eni.errors import PoolUnavailable
from podnet.eni.pool import EniPool
from podnet.ipam.allocator import Allocation
from podnet.store.base import AlreadyExists, Conflict, KeyValueStore, NotFound

PREFIX_LEN = 32


class EniIPAM:
    def __init__(self, kv: KeyValueStore, pool: EniPool):
        self.kv = kv
        self.pool = pool
        self.node = pool.cfg.node

    def _allocation(self, handle: str, address: str, eni: str) -> Allocation:
        return Allocation(address, PREFIX_LEN, self.pool.cfg.network, eni, handle)

    def allocate(self, handle: str, node: str, *, namespace: str | None = None, pod: str | None = None,
                 **_: object) -> Allocation:
        held = rec.get_handle(self.kv, self.node, handle)
        if held is not None:
            r = rec.get_address(self.kv, self.node, held)
            if r is not None and r.handle == handle:
                return self._allocation(handle, held, r.eni or "")
        for _attempt in range(3):
            lease = self.pool.acquire(handle)
            current = rec.get_address(self.kv, self.node, lease.address)
            if current is not None and current.handle and current.handle != handle:
                # the store says another pod holds it (the memory was behind): never hand it out
                self.pool.hold(lease.address, current.handle)
                self.pool.cancel_handle(handle)
                continue
            try:
                self.kv.txn(rec.assign_ops(self.node, handle, lease.address, lease.eni, current))
            except (AlreadyExists, Conflict, NotFound):
                self.pool.cancel(lease)
                continue
            except BaseException:
                self.pool.cancel(lease)
                raise
            return self._allocation(handle, lease.address, lease.eni)
        raise PoolUnavailable(f"the ENI address records of node {self.node} changed concurrently three times; "
                              "try again later")

    def release(self, handle: str) -> None:
        address = rec.get_handle(self.kv, self.node, handle)
        if address is None:
            return
        current = rec.get_address(self.kv, self.node, address)
        eni = current.eni if current is not None else None
        self.kv.txn(rec.release_ops(self.node, handle, address, eni, self.pool.cfg.cooldown))
        self.pool.release(address)

    def lookup(self, handle: str) -> Allocation | None:
        address = rec.get_handle(self.kv, self.node, handle)
        if address is None:
            return None
        r = rec.get_address(self.kv, self.node, address)
        return self._allocation(handle, address, (r.eni if r else "") or "")

    def capacity_problem(self, node: str) -> str | None:
        return self.pool.capacity_problem()
