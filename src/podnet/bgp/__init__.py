"""BGP with BIRD: what each node announces and to whom, and BIRD run to do it.

    config.py   the store's objects -> one node's BGP configuration (pure)
    render.py   that configuration -> BIRD 2's configuration text (pure)
    bird.py     BIRD itself: check a text (`bird -p`), start, reload, supervise, stop
    control.py  BIRD's control socket (what `birdc` speaks)
    status.py   `show protocols all` -> sessions, their state and routes
    scale.py    sessions and routes per node for a cluster shape (plan, benchmarks)

The agent runs it as one more dataplane (agent/bgp.py); docs/bgp.md has the design.
"""
