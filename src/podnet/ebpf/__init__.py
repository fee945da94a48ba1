"""podnet's eBPF foundation, shared by the Service load balancer and NetworkPolicy:

    build.py     compile native/bpf/*.c into build/bpf/*.o (set-up; only what changed)
    syscall.py   bpf(2) through ctypes: pinned maps opened, read and written
    bpffs.py     the bpffs and the per-agent pin directory
    programs.py  load an object once (libbpf), pin its programs, adopt them after a restart
    attach.py    THE hook layout on a pod's host-side veth, tc clsact direct-action attach/detach

docs/ebpf.md describes the design.
"""
