"""NetworkPolicy enforced by tc programs at each local pod's veth (native/bpf/policy.c),
from the same compiled state the nftables backend applies (policy/compiler.py):
maps.py turns that state into map contents, programmer.py keeps the kernel's maps
and attachments equal to it."""

# Why the eBPF policy needs the eBPF Services (as Cilium's and Calico's eBPF policy need
# their own Service load balancer): the policy program at the pod's veth judges a packet
# before the stack, so with nftables or iptables Services it would see a ClusterIP where
# NetworkPolicy is specified against the endpoint the Service translates it to.
NEEDS_EBPF_SERVICES = ("the policy program judges a pod's packets before nftables or iptables Services "
                       "translate a ClusterIP to its endpoints, which egress rules are written against")


def combination_error(service_proxy: str, policy_option: str, proxy_option: str) -> str | None:
    """The error for the eBPF policy with Services other than eBPF (None: fine); the
    options are named as the caller spells them (flags, lab fields)."""
    if service_proxy == "ebpf":
        return None
    return f"{policy_option} ebpf needs {proxy_option} ebpf, not {service_proxy}: {NEEDS_EBPF_SERVICES}"
