"""`--service-proxy ebpf` with nftables as the floor: while the eBPF programs do not
load (an old kernel, a verifier that refuses a new build, a missing object), the node's
Services stay on the nftables backend, and every sync reports the load error (the
agent's sync error metric and log), so the failure is seen and nothing stops working.
Each sync tries the programs again; once they load, the eBPF applier takes over and
removes the nftables table."""

from __future__ import annotations

import logging

from podnet.ebpf.programs import ProgramLoadError
from podnet.services.applier import NftServiceApplier, SyncResult
from podnet.services.ebpf.applier import EbpfServiceApplier
from podnet.services.model import ServiceState

log = logging.getLogger("podnet.services")


class EbpfWithNftablesFloor:
    def __init__(self, ebpf: EbpfServiceApplier, nft: NftServiceApplier):
        self.ebpf = ebpf
        self.nft = nft
        self.load_error: str | None = None  # why the programs did not load (None: they did)

    @property
    def active(self) -> str:
        return "nftables" if self.load_error else "ebpf"

    def apply(self, state: ServiceState, resync: bool = False) -> SyncResult:
        if self.ebpf.obj is None:
            try:
                self.ebpf.load()
            except ProgramLoadError as e:
                if str(e) != self.load_error:
                    log.error("services: the eBPF programs did not load; Services stay on nftables: %s", e)
                self.load_error = str(e)
                result = self.nft.apply(state, resync=resync)
                result.errors.append(f"eBPF Service programs not loaded (Services on nftables): {e}")
                return result
            if self.load_error:
                log.info("services: the eBPF programs loaded; they take over from nftables")
            self.load_error = None
        return self.ebpf.apply(state, resync=resync)

    def verify(self) -> str | None:
        return self.nft.verify() if self.load_error else self.ebpf.verify()

    def slot_orders(self) -> dict:
        return {}

    def remove(self) -> None:
        self.ebpf.remove()
