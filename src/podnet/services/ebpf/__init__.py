"""Services on tc eBPF (`--service-proxy ebpf`): native/bpf/services.c and its maps,
written from the same ServiceState as the nftables backend. See docs/ebpf.md."""

from podnet.services.ebpf.applier import EbpfServiceApplier

__all__ = ["EbpfServiceApplier"]
