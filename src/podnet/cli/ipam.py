"""`podnet ipam`: show pool use, check consistency, release leaks, allocate and free by hand.

  podnet ipam show [-o table|wide|yaml|json]
  podnet ipam check [-o ...]        exit 0 and "no problems found" when clean; otherwise the
                                    findings, one a row, and exit 3 (so scripts can test it)
  podnet ipam release --leaked [--grace 15m] [-o ...]
  podnet ipam allocate --node N --handle H [--namespace NS --pod P] [--pool NAME ...] [--ip ADDR]
  podnet ipam free --handle H
"""

from __future__ import annotations

import argparse
import re

from podnet.cli.common import kv_from_args
from podnet.cli.output import EXIT_FOUND, Column, add_output_flag, emit, is_table, print_table
from podnet.errors import PodnetError

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in '90s', '15m', '1h30m', '2d' or a bare number of seconds."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    if s and DURATION_RE.sub("", s) == "" and DURATION_RE.match(s):
        return float(sum(float(n) * DURATION_UNITS[u] for n, u in DURATION_RE.findall(s)))
    raise PodnetError(f"invalid duration {text!r}: expected e.g. 90s, 15m, 1h or 1h30m")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ipam", help="IP address management: pools, blocks, leaks")
    sub = p.add_subparsers(dest="ipam_command", metavar="SUBCOMMAND")
    sub.required = True

    show = sub.add_parser("show", help="pool use and the blocks of each node")
    add_output_flag(show, json_flag=True)
    show.set_defaults(func=cmd_show)

    check = sub.add_parser("check", help=f"find leaked addresses and inconsistent records (exit {EXIT_FOUND} if any)")
    add_output_flag(check, json_flag=True)
    check.set_defaults(func=cmd_check)

    rel = sub.add_parser("release", help="release leaked addresses seen leaked for longer than --grace")
    rel.add_argument("--leaked", action="store_true", help="release leaked addresses")
    rel.add_argument("--grace", default="15m",
                     help="how long an address must have been seen leaked before it is freed (default 15m)")
    add_output_flag(rel, json_flag=True)
    rel.set_defaults(func=cmd_release)

    alloc = sub.add_parser("allocate", help="allocate one address and print it")
    alloc.add_argument("--node", required=True)
    alloc.add_argument("--handle", required=True)
    alloc.add_argument("--namespace")
    alloc.add_argument("--pod")
    alloc.add_argument("--pool", action="append", dest="pools", metavar="NAME",
                       help="allocate from this pool (repeat for several, in order of preference)")
    alloc.add_argument("--ip", help="allocate this exact address")
    alloc.set_defaults(func=cmd_allocate)

    free = sub.add_parser("free", help="release every address a handle holds")
    free.add_argument("--handle", required=True)
    free.set_defaults(func=cmd_free)


POOL_COLUMNS = [
    Column("POOL", lambda p: p["name"] + (" (disabled)" if p["disabled"] else "")),
    Column("CIDR", lambda p: p["cidr"]),
    Column("BLOCK", lambda p: f"/{p['blockSize']}"),
    Column("BLOCKS", lambda p: f"{p['blocks']}/{p['blockCapacity']}"),
    Column("USED", lambda p: p["used"]),
    Column("TOTAL", lambda p: p["total"]),
    Column("UTIL", lambda p: f"{p['utilisation']:.1f}%"),
    Column("FREE", lambda p: p["total"] - p["used"], wide=True),
    Column("DISABLED", lambda p: p["disabled"], wide=True),
]

BLOCK_COLUMNS = [
    Column("NODE", lambda b: b["node"]),
    Column("BLOCK", lambda b: b["cidr"]),
    Column("POOL", lambda b: b["pool"]),
    Column("USED", lambda b: f"{b['used']}/{b['size']}"),
    Column("FREE", lambda b: b["size"] - b["used"], wide=True),
    Column("UTIL", lambda b: f"{100.0 * b['used'] / b['size']:.1f}%" if b["size"] else "0.0%", wide=True),
]

FINDING_COLUMNS = [
    Column("KIND", lambda f: f.kind),
    Column("NODE", lambda f: f.node, wide=True),
    Column("BLOCK", lambda f: f.block, wide=True),
    Column("ADDRESS", lambda f: f.address, wide=True),
    Column("HANDLE", lambda f: f.handle, wide=True),
    Column("POD", lambda f: f.pod, wide=True),
    Column("MESSAGE", lambda f: f.message),
]

LEAK_COLUMNS = [
    Column("RESULT", lambda r: r[0]),
    Column("ADDRESS", lambda r: r[1].address),
    Column("HANDLE", lambda r: r[1].handle),
    Column("BLOCK", lambda r: r[1].block, wide=True),
    Column("KIND", lambda r: r[1].kind, wide=True),
    Column("REASON", lambda r: r[1].reason),
]


def cmd_show(args: argparse.Namespace) -> int:
    from podnet.ipam.usage import usage

    with kv_from_args(args) as kv:
        data = usage(kv)
    if not is_table(args.output):
        emit(data, args.output)
        return 0
    wide = args.output == "wide"
    if not data["pools"]:
        print("no IPPools")
    else:
        print_table(POOL_COLUMNS, data["pools"], wide=wide)
    if data["blocks"]:
        print()
        print_table(BLOCK_COLUMNS, sorted(data["blocks"], key=lambda b: (b["node"] is None, b["node"] or "")),
                    wide=wide)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from podnet.ipam.audit import check

    with kv_from_args(args) as kv:
        findings = check(kv)
    if not is_table(args.output):
        emit([f.to_dict() for f in findings], args.output)
    elif not findings:
        print("no problems found")
    else:
        print_table(FINDING_COLUMNS, findings, wide=args.output == "wide")
    return EXIT_FOUND if findings else 0


def cmd_release(args: argparse.Namespace) -> int:
    from podnet.ipam.audit import release_leaked

    if not args.leaked:
        raise PodnetError("nothing to release: pass --leaked (to free one handle use `podnet ipam free --handle H`)")
    grace = parse_duration(args.grace)
    with kv_from_args(args) as kv:
        report = release_leaked(kv, grace)
    if not is_table(args.output):
        emit({
            "released": [leak.to_dict() for leak in report.released],
            "waiting": [leak.to_dict() for leak in report.waiting],
            "forgotten": report.forgotten,
        }, args.output)
        return 0
    if not report.released and not report.waiting:
        print("no leaked addresses")
        return 0
    rows = [("released", leak) for leak in report.released] + [("waiting", leak) for leak in report.waiting]
    print_table(LEAK_COLUMNS, rows, wide=args.output == "wide")
    if report.waiting:
        print(f"waiting: leaked, released once seen leaked for {args.grace}")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from podnet.ipam import IPAM

    with kv_from_args(args) as kv:
        got = IPAM(kv).allocate(args.handle, args.node, namespace=args.namespace, pod=args.pod,
                                pools=args.pools, address=args.ip)
    print(got.address)
    return 0


def cmd_free(args: argparse.Namespace) -> int:
    from podnet.ipam import IPAM

    with kv_from_args(args) as kv:
        freed = IPAM(kv).release(args.handle)
    if freed:
        for a in freed:
            print(a)
    else:
        print(f"handle {args.handle} holds no address")
    return 0
