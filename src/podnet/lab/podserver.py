"""The tiny server in each lab pod: answers on every declared port with the pod's name.

    python -m podnet.lab.podserver --name web-1 --port tcp:8080 --port udp:5353 [--bind ADDR]
                                   [--ready-file PATH]

TCP and SCTP: on accept, send "NAME\\n"; if the client then sends a line starting
with "peer", answer "NAME PEER_IP\\n" (the source address as this pod sees it,
to show NAT). UDP: answer every datagram with "NAME\\n", or "NAME PEER_IP\\n" when
it starts with "peer". SCTP ports are skipped (with a note) where the kernel has
no SCTP. Standard library only: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys


def _listen(proto: str, port: int, bind: str | None) -> list[socket.socket]:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    ipproto = socket.IPPROTO_SCTP if proto == "sctp" else 0
    attempts: list[tuple[int, str]] = []
    if bind:
        attempts.append((socket.AF_INET6 if ":" in bind else socket.AF_INET, bind))
    else:
        attempts += [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    last: OSError | None = None
    for family, addr in attempts:
        try:
            s = socket.socket(family, kind, ipproto)
        except OSError as e:
            last = e
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not bind:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((addr, port))
            if kind == socket.SOCK_STREAM:
                s.listen(128)
            s.setblocking(False)
            return [s]
        except OSError as e:
            s.close()
            last = e
    assert last is not None
    raise last


def _peer_ip(addr: tuple) -> str:
    ip = addr[0]
    return ip[7:] if ip.startswith("::ffff:") else ip


def serve(name: str, ports: list[tuple[str, int]], bind: str | None = None, ready_file: str | None = None) -> int:
    sel = selectors.DefaultSelector()
    answer = f"{name}\n".encode()
    for proto, port in ports:
        try:
            socks = _listen(proto, port, bind)
        except OSError as e:
            if proto == "sctp":
                print(f"{name}: sctp/{port} skipped: {e.strerror}", file=sys.stderr, flush=True)
                continue
            print(f"{name}: cannot listen on {proto}/{port}: {e.strerror}", file=sys.stderr, flush=True)
            return 1
        for s in socks:
            sel.register(s, selectors.EVENT_READ, ("listen" if proto != "udp" else "udp", s))
    print(f"{name}: serving {' '.join(f'{p}/{n}' for p, n in ports)}", flush=True)
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(ready_file + ".tmp", ready_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        for key, _ in sel.select():
            role, s = key.data
            if role == "listen":
                try:
                    conn, addr = s.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.send(answer)
                sel.register(conn, selectors.EVENT_READ, ("conn", (conn, addr)))
            elif role == "udp":
                try:
                    data, addr = s.recvfrom(2048)
                except OSError:
                    continue
                reply = f"{name} {_peer_ip(addr)}\n".encode() if data.startswith(b"peer") else answer
                with contextlib.suppress(OSError):
                    s.sendto(reply, addr)
            else:
                conn, addr = s
                try:
                    data = conn.recv(2048)
                except OSError:
                    data = b""
                if data.startswith(b"peer"):
                    with contextlib.suppress(OSError):
                        conn.send(f"{name} {_peer_ip(addr)}\n".encode())
                elif not data:
                    sel.unregister(conn)
                    conn.close()


def parse_port(text: str) -> tuple[str, int]:
    proto, _, port = text.partition(":")
    proto = proto.lower()
    if proto not in ("tcp", "udp", "sctp") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected PROTO:PORT with PROTO tcp, udp or sctp, got {text!r}")
    return proto, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podnet.lab.podserver")
    p.add_argument("--name", required=True)
    p.add_argument("--port", action="append", type=parse_port, default=[])
    p.add_argument("--bind")
    p.add_argument("--ready-file")
    args = p.parse_args(argv)
    return serve(args.name, args.port, args.bind, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
