"""Pod addresses from the cloud's network: ENI warm pools (see docs/eni.md).

    model      what one node's pool holds: ENIs, idle, cooling and assigned addresses
    limits     the instance type's limits and max pods
    watermarks how many addresses to ask for or give back (pure)
    ratelimit  one token bucket per cloud API
    cloud      the EC2 calls, through boto3, each behind its bucket
    subnets    which subnet a new ENI goes to
    records    the store records that say which pod holds which address
    pool       the pool manager: batching, watermarks, cooldown, backoff
    reconcile  the pool's state rebuilt from the cloud and the store
    ipam       the CNI handler's IPAM over a pool
    setup      a node's pool from its CloudNetwork (checked against the cloud)
    agent      the agent's part: the pool started (and retried), the CNI IPAM, the dataplane
    routing    ip rules and per-ENI route tables (shared mode)
    pods       pod interfaces: veth plus rule (shared), the ENI's link moved in (exclusive)
    plan       max pods, pinned addresses and subnet sizes for `podnet plan --cloud aws`
"""
