"""NetworkPolicy enforced by tc programs at each local pod's veth (native/bpf/policy.c),
from the same compiled state the nftables backend applies (policy/compiler.py):
maps.py turns that state into map contents, programmer.py keeps the kernel's maps
and attachments equal to it."""
