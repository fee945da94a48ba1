"""The lab: a Kubernetes cluster emulated in network namespaces on one host.

`spec` reads and checks a lab file, `topology` builds the underlay and the node
namespaces, `runtime` runs CNI conflists as a container runtime does, `cluster`
brings a whole lab up and down (agents, pods, their servers) and `connectivity`
probes it with real connections.
"""
