"""Sessions and routes per node for a cluster shape, computed from the configurations the
agent would render (podnet.bgp.config and render), not from a formula: what `podnet plan`
states and what the benchmarks compare with the lab.

A cluster of `nodes` BGP nodes, `blocks` blocks per node, and either a full mesh (k=0)
or `k` route reflectors (nodes with one cluster ID; the mesh off; one BGPPeer selecting
the reflectors). Per node: the BGP protocols in its rendered text, and the paths it
receives (every other node's blocks, once per session that carries them: once in a
mesh, once per reflector for a client).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from podnet.agent.view import BlockRecord
from podnet.bgp.config import compile_node
from podnet.bgp.render import render
from podnet.model.objects import BGPConfiguration, BGPPeer, IPPool, Node

POOL_CIDR = "10.0.0.0/8"
BLOCK_SIZE = 26
RR_LABEL = "route-reflector"


@dataclass(frozen=True)
class NodeShape:
    role: str  # "mesh", "client" or "reflector"
    sessions: int  # BGP protocols in the rendered configuration
    paths_received: int  # block routes learnt, counted once per session that carries them
    routes_installed: int  # distinct prefixes in the kernel (other nodes' blocks)
    config_bytes: int
    render_seconds: float  # compile + render of this node's text


def node_address(i: int) -> str:
    return str(ipaddress.IPv4Address("172.16.0.1") + i)


def cluster(nodes: int, k: int) -> tuple[list[Node], BGPConfiguration, list[BGPPeer], list[IPPool]]:
    objs = []
    for i in range(nodes):
        rr = i < k
        objs.append(Node.model_validate({
            "metadata": {"name": f"node-{i:05d}", "labels": {RR_LABEL: "true"} if rr else {}},
            "spec": {"bgp": {"routeReflectorClusterID": "244.0.0.1"} if rr else {}},
            "status": {"addresses": [{"type": "InternalIP", "address": node_address(i)}]}}))
    config = BGPConfiguration.model_validate({"metadata": {"name": "default"},
                                              "spec": {"nodeToNodeMeshEnabled": k == 0}})
    peers = [BGPPeer.model_validate({"metadata": {"name": "reflectors"},
                                     "spec": {"peerSelector": {"matchLabels": {RR_LABEL: "true"}}}})] if k else []
    pool = IPPool.model_validate({"metadata": {"name": "pods"}, "spec": {"cidr": POOL_CIDR, "encapsulation": "None",
                                                                         "blockSize": BLOCK_SIZE}})
    return objs, config, peers, [pool]


def node_blocks(i: int, blocks: int) -> list[BlockRecord]:
    base = int(ipaddress.IPv4Network(POOL_CIDR).network_address)
    return [BlockRecord(str(ipaddress.IPv4Network((base + (i * blocks + b) * 2 ** (32 - BLOCK_SIZE), BLOCK_SIZE))),
                        "pods", f"node-{i:05d}", ()) for b in range(blocks)]


def shape(nodes: int, k: int, blocks: int = 2) -> dict[str, NodeShape]:
    """The rendered configuration of a client (or mesh node) and of a reflector."""
    objs, config, peers, pools = cluster(nodes, k)
    out = {}
    picks = [("reflector", 0), ("client", nodes - 1)] if k else [("mesh", nodes - 1)]
    for role, i in picks:
        t = time.perf_counter()
        cfg = compile_node(objs[i].name, objs, config, peers, pools, node_blocks(i, blocks))
        assert cfg is not None
        text = render(cfg)
        took = time.perf_counter() - t
        sessions = text.count("\nprotocol bgp ")
        others = (nodes - 1) * blocks
        carriers = 1 if role in ("mesh", "reflector") else k  # a reflector hears each client directly
        out[role] = NodeShape(role, sessions, others * carriers, others, len(text.encode()), took)
    return out
