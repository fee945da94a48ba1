"""`podnet policy explain SRC DST PORT[/PROTO]`: which NetworkPolicies select the
source (egress) and the destination (ingress), which rule allows the connection,
or why none does. Computed by walking the compiled nftables state."""

from __future__ import annotations

import argparse
import json

from podnet.cli.common import objects_from_args
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
        "The answer is the compiled ruleset walked as the kernel walks it. Exit status: 0 allowed, 3 denied.",
    )
    e.add_argument("src", metavar="SRC")
    e.add_argument("dst", metavar="DST")
    e.add_argument("port", metavar="PORT[/PROTO]", help="e.g. 80, 80/TCP, 53/UDP (default protocol TCP)")
    e.add_argument("-o", "--output", choices=("text", "json"), default="text")
    e.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    store = objects_from_args(args)
    ex = explain(store.list(Pod), store.list(Namespace), store.list(NetworkPolicy), store.list(Node),
                 args.src, args.dst, args.port)
    if args.output == "json":
        print(json.dumps(ex.to_dict(), indent=2))
    else:
        print(ex.text())
    return 0 if ex.allowed else 3
