"""`podnet policy explain SRC DST PORT[/PROTO]`: which NetworkPolicies select the
source (egress) and the destination (ingress), which rule allows the connection,
or why none does. Computed by walking the compiled nftables state."""

from __future__ import annotations

import argparse

from podnet.cli.common import objects_from_args
from podnet.cli.output import EXIT_FOUND, Column, add_output_flag, emit, is_table, print_table
from podnet.model.objects import Namespace, NetworkPolicy, Node, Pod
from podnet.policy.explain import explain


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="NetworkPolicy tools")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    psub.required = True
    e = psub.add_parser(
        "explain",
        help="explain whether SRC may open a connection to DST on PORT/PROTO",
        description="SRC and DST are ns/pod or an IPv4 address (for ipBlock peers and nodes). "
        "The answer is the compiled ruleset walked as the kernel walks it. "
        f"Exit status: 0 allowed, {EXIT_FOUND} denied (1 error, 2 usage).",
    )
    e.add_argument("src", metavar="SRC")
    e.add_argument("dst", metavar="DST")
    e.add_argument("port", metavar="PORT[/PROTO]", help="e.g. 80, 80/TCP, 53/UDP (default protocol TCP)")
    add_output_flag(e, aliases={"text": "table"})
    e.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    store = objects_from_args(args)
    ex = explain(store.list(Pod), store.list(Namespace), store.list(NetworkPolicy), store.list(Node),
                 args.src, args.dst, args.port)
    if not is_table(args.output):
        emit(ex.to_dict(), args.output)
    else:
        print(ex.text())
        if args.output == "wide":
            print()
            print_table(DIRECTION_COLUMNS, [("egress", ex.egress), ("ingress", ex.ingress)])
    return 0 if ex.allowed else EXIT_FOUND


# -o wide: each direction's verdict as a table, after the explanation.
DIRECTION_COLUMNS = [
    Column("DIRECTION", lambda r: r[0]),
    Column("ISOLATED", lambda r: None if r[1] is None else r[1].isolated),
    Column("VERDICT", lambda r: None if r[1] is None else ("allowed" if r[1].allowed else "denied")),
    Column("ALLOWED-BY", lambda r: None if r[1] is None or r[1].allowed_by is None else
           f"{r[1].allowed_by.policy} rule {r[1].allowed_by.rule_index}"),
    Column("POLICIES", lambda r: None if r[1] is None else r[1].policies),
]
