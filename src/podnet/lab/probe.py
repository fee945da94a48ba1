"""The client side of a connectivity probe, run inside a pod's namespace.

    python -m podnet.lab.probe [--timeout S] [--bind ADDR] PROTO:HOST:PORT ...

Connects to every target at once and prints one JSON list: per target the
name of whoever answered (a lab pod server says its name), the source address
the server saw ("peer", to show NAT) and an error if nothing answered. --bind
sends from one of the namespace's addresses (the external host shares its
namespace with the underlay's gateway).
Standard library only, so it starts fast.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from podnet.hostport import parse_host_port


def probe(proto: str, host: str, port: int, timeout: float, bind: str | None = None) -> dict[str, Any]:
    target = f"{proto}:{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.monotonic()
    out: dict[str, Any] = {"target": target, "ok": False, "name": None, "peer": None, "error": None}
    try:
        if proto == "udp":
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                if bind:
                    s.bind((bind, 0))
                s.settimeout(timeout / 3)
                data = b""
                for _ in range(3):  # datagrams get lost: ask up to three times
                    s.sendto(b"peer\n", (host, port))
                    try:
                        data = s.recv(2048)
                        break
                    except TimeoutError:
                        continue
                if not data:
                    raise TimeoutError("no answer")
                lines = data.decode(errors="replace").split()
        else:
            ipproto = socket.IPPROTO_SCTP if proto == "sctp" else 0
            with socket.socket(family, socket.SOCK_STREAM, ipproto) as s:
                if bind:
                    s.bind((bind, 0))
                s.settimeout(timeout)
                s.connect((host, port))
                s.sendall(b"peer\n")
                buf = b""
                deadline = time.monotonic() + timeout
                while buf.count(b"\n") < 2 and time.monotonic() < deadline:
                    chunk = s.recv(2048)
                    if not chunk:
                        break
                    buf += chunk
                text = buf.decode(errors="replace").splitlines()
                if not text:
                    raise ConnectionError("connection closed without an answer")
                lines = text[1].split() if len(text) > 1 else text[0].split()
        out["name"] = lines[0] if lines else None
        out["peer"] = lines[1] if len(lines) > 1 else None
        out["ok"] = bool(out["name"])
    except (OSError, TimeoutError) as e:
        out["error"] = "timeout" if isinstance(e, TimeoutError) else (e.strerror or str(e))
    out["ms"] = round((time.monotonic() - start) * 1000, 1)
    return out


def parse_target(text: str) -> tuple[str, str, int]:
    proto, _, rest = text.partition(":")
    try:
        if proto not in ("tcp", "udp", "sctp"):
            raise ValueError(f"protocol {proto!r} is not tcp, udp or sctp")
        host, port = parse_host_port(rest)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected PROTO:HOST:PORT, got {text!r} ({e})") from None
    return proto, host, port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podnet.lab.probe")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--bind", help="the source address to send from")
    p.add_argument("targets", nargs="+", type=parse_target)
    args = p.parse_args(argv)
    with ThreadPoolExecutor(max_workers=min(32, len(args.targets))) as pool:
        results = list(pool.map(lambda t: probe(*t, args.timeout, args.bind), args.targets))
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
