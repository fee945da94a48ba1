"""`podnet node cleanup`: remove what podnet programmed on this node (in this network
namespace), after its agent and DNS process have stopped."""

from __future__ import annotations

import argparse
import os

from podnet.cni import DEFAULT_SOCKET
from podnet.errors import PodnetError


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="this node's podnet state")
    nsub = node.add_subparsers(dest="node_command", metavar="COMMAND")
    nsub.required = True
    p = nsub.add_parser(
        "cleanup", help="remove everything podnet programmed on this node: nft tables, routes, the VXLAN device, "
                        "pod veths, node DNS addresses, iptables Service chains, the agent's socket files")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's CNI socket path (default %(default)s)")
    p.add_argument("--dns-address", action="append", default=[], metavar="IP",
                   help="another node DNS address to remove from lo (repeatable; those the NOTRACK table names "
                        "and 169.254.20.10 always are)")
    p.add_argument("--cluster-dns-ip", action="append", default=[], metavar="IP", help="likewise (repeatable)")
    p.add_argument("--iptables", default="iptables", help="iptables binary of the Service chains (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--force", action="store_true",
                   help="run even while an agent or a node DNS server runs here (it would program it all again)")
    p.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from podnet.dataplane.cleanup import NodeCleanup, StillRunning

    if os.geteuid() != 0:
        raise PodnetError("podnet node cleanup needs root (it changes the node's network configuration)")
    cleanup = NodeCleanup(socket=args.socket, dns_addresses=(*args.dns_address, *args.cluster_dns_ip),
                          iptables=args.iptables)
    running = cleanup.running()
    if running and not args.force:
        raise StillRunning("podnet still runs on this node: " + "; ".join(running)
                           + ". Stop it first (or pass --force)")
    if args.dry_run:
        steps = cleanup.plan()
        for step in steps:
            print(f"would remove {step.what}")
        print("nothing to do: podnet has nothing on this node" if not steps else f"{len(steps)} to remove")
        return 0
    report = cleanup.run(say=lambda line: print(line, flush=True))
    for line in report.left:
        print(f"left alone: {line}")
    if report.errors:
        raise PodnetError(f"{len(report.errors)} of {len(report.done) + len(report.errors)} could not be removed: "
                          + "; ".join(report.errors))
    print(f"removed {len(report.done)}: podnet has nothing left on this node" if report.done
          else "nothing to do: podnet has nothing on this node")
    return 0
