"""What one node's pool holds, in memory: its ENIs and each address's state.

    idle      on an ENI of the node in the cloud, no pod holds it: ready now
    cooling   freed by a pod, not handed out again until `until` (monotonic seconds)
    assigned  held by a pod (by its CNI handle)

Shared mode: the addresses are secondary addresses of the ENIs. Exclusive mode: each slot
is a whole ENI, named by its primary address (`address` -> ENI ID is the same map).
The pool manager (pool.py) changes it under its lock; reconcile.py builds it from the
cloud and the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EniSlot:
    id: str
    subnet_id: str
    device_index: int
    primary_ip: str
    attachment_id: str | None = None
    mac: str = ""
    podnet: bool = True  # made by podnet (may be deleted); False: the instance's own
    addresses: set[str] = field(default_factory=set)  # secondary addresses the cloud holds for it


@dataclass(frozen=True)
class PoolCounts:
    idle: int
    cooling: int
    assigned: int
    waiting: int
    enis: int
    addresses: int  # every pod address the node holds in the cloud (idle + cooling + assigned)


@dataclass
class PoolState:
    enis: dict[str, EniSlot] = field(default_factory=dict)
    idle: dict[str, str] = field(default_factory=dict)  # address -> ENI, oldest first
    cooling: dict[str, tuple[str, float]] = field(default_factory=dict)  # address -> (ENI, until)
    assigned: dict[str, str] = field(default_factory=dict)  # address -> handle
    handles: dict[str, str] = field(default_factory=dict)  # handle -> address
    eni_of: dict[str, str] = field(default_factory=dict)  # every known pod address -> its ENI
    # device indices of the instance's other ENIs (its own primary one when pods may not use
    # it, another tool's): they count against the instance's ENI limit all the same
    foreign: set[int] = field(default_factory=set)

    def attached(self) -> int:
        return len(self.enis) + len(self.foreign)

    def used_indices(self) -> set[int]:
        return {e.device_index for e in self.enis.values()} | self.foreign

    def counts(self, waiting: int = 0) -> PoolCounts:
        return PoolCounts(len(self.idle), len(self.cooling), len(self.assigned), waiting, len(self.enis),
                          len(self.eni_of))

    def add_idle(self, address: str, eni: str) -> None:
        self.eni_of[address] = eni
        self.idle[address] = eni

    def assign(self, address: str, handle: str) -> None:
        self.idle.pop(address, None)
        self.cooling.pop(address, None)
        self.assigned[address] = handle
        self.handles[handle] = address

    def free(self, address: str, until: float) -> None:
        handle = self.assigned.pop(address, None)
        if handle is not None and self.handles.get(handle) == address:
            del self.handles[handle]
        eni = self.eni_of.get(address)
        if eni is not None:
            self.cooling[address] = (eni, until)

    def forget(self, address: str) -> None:
        """The address left the node (released to the cloud, or gone there)."""
        self.idle.pop(address, None)
        self.cooling.pop(address, None)
        handle = self.assigned.pop(address, None)
        if handle is not None and self.handles.get(handle) == address:
            del self.handles[handle]
        eni = self.eni_of.pop(address, None)
        if eni is not None and eni in self.enis:
            self.enis[eni].addresses.discard(address)
