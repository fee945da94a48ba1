"""The store's key layout: what every node agent follows, and what only its writers read.

Followed by every agent (one list and one watch of SHARED):

  /podnet/objects/<Kind>/[<namespace>/]<name>     Kubernetes-shaped objects
  /podnet/ipam/blocks/<cidr, '/' as '-'>          IPAM blocks: every node routes by them
  /podnet/cluster/...                             cluster-wide settings

Read and written only by IPAM, the CNI handler and `podnet apply` (ALLOC): per-pod
and per-Service bookkeeping that no other node needs. Kept outside SHARED so that
an agent of a 5 000-node cluster neither lists nor watches 300 000 records it would
throw away (handles and attachments of every pod, every ClusterIP and node port):

  /podnet-alloc/ipam/affinities/<node>/<block>    block affinities
  /podnet-alloc/ipam/handles/<handle>             which blocks hold a handle's addresses
  /podnet-alloc/ipam/leaks/<block>/<ordinal>      leaks seen by `ipam release --leaked`
  /podnet-alloc/attachments/<node>/<handle>       CNI attachment records
  /podnet-alloc/services/clusterips/<ip>          ClusterIP allocations
  /podnet-alloc/services/nodeports/<port>         node port allocations
  /podnet-alloc/agents/<node>                     the node's agent is ready (kube-sync tells the API server)
  /podnet-alloc/kube-sync/leader                  kube-sync's fencing record: the term of its leader
"""

SHARED = "/podnet/"
ALLOC = "/podnet-alloc/"
AGENTS = ALLOC + "agents/"
KUBE_SYNC_FENCE = ALLOC + "kube-sync/leader"
