"""Programming the kernel: pod interfaces, cross-node routes, VXLAN and NAT."""
