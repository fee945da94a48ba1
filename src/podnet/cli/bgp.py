"""`podnet bgp status`: a node's BGP sessions, from its BIRD (`show protocols all` on the
control socket the agent gave it), or every node's of a lab (`--lab`).

Per session: the peer's address and AS, its kind (Mesh, Node, Global), the BGP state and
since when, and the routes imported from and exported to the peer. Exit status 3 when a
session is not Established (Calico's readiness fails then too), 1 when BIRD does not answer.
"""

from __future__ import annotations

import argparse
import sys

from podnet.bgp.control import BirdError
from podnet.bgp.status import Session, sessions
from podnet.cli.output import EXIT_ERROR, EXIT_FOUND, Column, add_output_flag, emit, is_table, print_table
from podnet.cni import DEFAULT_SOCKET

BIRD_CONTROL = "bird.ctl"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bgp", help="BGP (BIRD) on the nodes")
    psub = p.add_subparsers(dest="bgp_command", metavar="SUBCOMMAND")
    psub.required = True
    s = psub.add_parser(
        "status", help="the BGP sessions of a node (or of every node of a lab)",
        description="Reads BIRD's sessions over its control socket. "
        f"Exit status: 0 every session Established, {EXIT_FOUND} one is not, 1 BIRD does not answer.")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--socket", default=DEFAULT_SOCKET,
                       help=f"the agent's CNI socket; BIRD's control socket is next to it, in <socket>.bird/ "
                       f"(default {DEFAULT_SOCKET})")
    where.add_argument("--control-socket", metavar="PATH", help="BIRD's control socket itself")
    where.add_argument("--lab", nargs="?", const="", metavar="NAME",
                       help="every node of a lab (the only one when NAME is left out)")
    add_output_flag(s)
    s.set_defaults(func=cmd_status)


def control_sockets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(node, control socket) to read."""
    if args.lab is not None:
        from podnet.lab.cluster import find_lab

        st = find_lab(args.lab or None)
        return [(n["name"], f"{n['socket']}.bird/{BIRD_CONTROL}") for n in st.data.get("nodes", [])]
    if args.control_socket:
        return [("", args.control_socket)]
    return [("", f"{args.socket}.bird/{BIRD_CONTROL}")]


COLUMNS = [
    Column("NODE", lambda r: r[0], empty=""),
    Column("PEER", lambda r: r[1].neighbor),
    Column("AS", lambda r: r[1].neighbor_as),
    Column("TYPE", lambda r: r[1].kind),
    Column("STATE", lambda r: r[1].state),
    Column("SINCE", lambda r: r[1].since),
    Column("IMPORTED", lambda r: r[1].imported),
    Column("EXPORTED", lambda r: r[1].exported),
    Column("PROTOCOL", lambda r: r[1].name, wide=True),
    Column("INFO", lambda r: r[1].last_error or r[1].info, wide=True),
]


def cmd_status(args: argparse.Namespace) -> int:
    nodes: list[dict] = []
    rows: list[tuple[str, Session]] = []
    failed = False
    for node, ctl in control_sockets(args):
        try:
            found = sessions(ctl)
        except BirdError as e:
            failed = True
            nodes.append({"node": node or None, "controlSocket": ctl, "error": str(e), "sessions": []})
            continue
        nodes.append({"node": node or None, "controlSocket": ctl, "error": None,
                      "sessions": [s.as_dict() for s in found]})
        rows += [(node, s) for s in found]
    if is_table(args.output):
        print_table(COLUMNS, rows, wide=args.output == "wide")
        for n in nodes:
            if n["error"]:
                print(f"error: {n['node'] + ': ' if n['node'] else ''}{n['error']}", file=sys.stderr)
    else:
        emit({"nodes": nodes}, args.output)
    if failed:
        return EXIT_ERROR
    return 0 if all(s.established for _, s in rows) else EXIT_FOUND
