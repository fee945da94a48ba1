"""Node-local DNS: the cluster's records in memory, answered on each node.

- ``podnet.dns.index.ClusterIndex``: Services, EndpointSlices, Pods -> records
  (Kubernetes DNS specification), updated one object at a time.
- ``podnet.dns.server.DNSServer``: UDP + TCP server with a precomputed-bytes hot
  path, server-side search (autopath), forwarding over TCP with a cache.
- ``podnet.dns.resolvconf``: the resolv.conf a pod gets.
"""
