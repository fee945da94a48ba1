"""`podnet agent --node NAME`: the node daemon."""

from __future__ import annotations

import argparse
import logging
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node agent (in the node's network namespace)")
    p.add_argument("--node", required=True, help="this node's name (a Node object in the store)")
    p.add_argument("--socket", default="/run/podnet/cni.sock", help="CNI socket path (default %(default)s)")
    p.add_argument("--node-ip", help="underlay address (default: the Node's InternalIP)")
    p.add_argument("--resync", type=float, default=60.0, help="seconds between full reconciles (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from podnet.agent.daemon import AgentConfig, run_agent

    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(),
        format=f"%(asctime)s {args.node} %(levelname)s %(name)s: %(message)s",
    )
    cfg = AgentConfig(node=args.node, store_url=args.store, socket=args.socket, node_ip=args.node_ip,
                      resync_interval=args.resync)
    return run_agent(cfg)
