"""`podnet ipam`: show pool use, check consistency, release leaks, allocate and free by hand.

  podnet ipam show [--json]
  podnet ipam check [--json]        exit 0 and "no problems found" when clean; otherwise the
                                    findings, one a line, and exit 1 (so scripts can test it)
  podnet ipam release --leaked [--grace 15m]
  podnet ipam allocate --node N --handle H [--namespace NS --pod P] [--pool NAME ...] [--ip ADDR]
  podnet ipam free --handle H
"""

from __future__ import annotations

import argparse
import json
import re

from podnet.cli.common import kv_from_args
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
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)

    check = sub.add_parser("check", help="find leaked addresses and inconsistent records (exit 1 if any)")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=cmd_check)

    rel = sub.add_parser("release", help="release leaked addresses seen leaked for longer than --grace")
    rel.add_argument("--leaked", action="store_true", help="release leaked addresses")
    rel.add_argument("--grace", default="15m",
                     help="how long an address must have been seen leaked before it is freed (default 15m)")
    rel.add_argument("--json", action="store_true", help="print JSON")
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


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_show(args: argparse.Namespace) -> int:
    from podnet.ipam.usage import usage

    with kv_from_args(args) as kv:
        data = usage(kv)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data["pools"]:
        print("no IPPools")
    else:
        rows = [["POOL", "CIDR", "BLOCK", "BLOCKS", "USED", "TOTAL", "UTIL"]]
        for p in data["pools"]:
            rows.append([
                p["name"] + (" (disabled)" if p["disabled"] else ""), p["cidr"], f"/{p['blockSize']}",
                f"{p['blocks']}/{p['blockCapacity']}", str(p["used"]), str(p["total"]), f"{p['utilisation']:.1f}%",
            ])
        print(_table(rows))
    if data["blocks"]:
        print()
        rows = [["NODE", "BLOCK", "POOL", "USED"]]
        for b in sorted(data["blocks"], key=lambda b: (b["node"] is None, b["node"] or "")):
            rows.append([b["node"] or "(no affinity)", b["cidr"], b["pool"] or "", f"{b['used']}/{b['size']}"])
        print(_table(rows))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from podnet.ipam.audit import check

    with kv_from_args(args) as kv:
        findings = check(kv)
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    elif not findings:
        print("no problems found")
    else:
        for f in findings:
            print(f"{f.kind}: {f.message}")
    return 1 if findings else 0


def cmd_release(args: argparse.Namespace) -> int:
    from podnet.ipam.audit import release_leaked

    if not args.leaked:
        raise PodnetError("nothing to release: pass --leaked (to free one handle use `podnet ipam free --handle H`)")
    grace = parse_duration(args.grace)
    with kv_from_args(args) as kv:
        report = release_leaked(kv, grace)
    if args.json:
        print(json.dumps({
            "released": [leak.to_dict() for leak in report.released],
            "waiting": [leak.to_dict() for leak in report.waiting],
            "forgotten": report.forgotten,
        }, indent=2))
        return 0
    for leak in report.released:
        print(f"released {leak.address} (handle {leak.handle}): {leak.reason}")
    for leak in report.waiting:
        print(f"leaked {leak.address} (handle {leak.handle}): {leak.reason}; will be released once seen "
              f"leaked for {args.grace}")
    if not report.released and not report.waiting:
        print("no leaked addresses")
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
