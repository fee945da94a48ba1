"""A TCP relay from inside a network namespace to addresses seen from this one.

    python -m podnet.lab.forward --netns /run/netns/NS --map LISTEN_IP:PORT=TARGET_HOST:PORT ...
                                 [--ready-file PATH]

The process runs in its own (usually the root) namespace; each listening socket
is created by a thread that has entered NS with setns(2), and a socket stays in
the namespace it was made in. Connections accepted there are relayed to the
targets from this namespace. The lab uses it so agents inside node namespaces
reach an etcd store listening on the host's loopback, without adding any
address or route to the root namespace. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import threading

from podnet.hostport import parse_host_port

CLONE_NEWNET = 0x40000000


def socket_in_netns(path: str, family: int, kind: int) -> socket.socket:
    """A socket created inside the namespace at `path` (this thread's namespace is untouched)."""
    out: dict = {}

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["sock"] = socket.socket(family, kind)
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=make)  # the thread ends in NS; this one never leaves
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _serve(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            upstream = socket.create_connection(target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            conn.close()
            continue
        # Each side writes what the other sent as soon as it comes: without NODELAY, the
        # tail of a response (or a small watch event) waits for the ACK of the data before
        # it, which the receiver delays (up to 40 ms on Linux).
        for s in (conn, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = threading.Thread(target=_pipe, args=(conn, upstream), daemon=True)
        b = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
        a.start()
        b.start()
        threading.Thread(target=_close_when_done, args=(a, b, conn, upstream), daemon=True).start()


def _close_when_done(a: threading.Thread, b: threading.Thread, *socks: socket.socket) -> None:
    a.join()
    b.join()
    for s in socks:
        s.close()


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_map(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LISTEN_IP:PORT=TARGET:PORT, got {text!r}")
    return _hostport(listen), _hostport(target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="podnet.lab.forward")
    p.add_argument("--netns", required=True, help="path of the namespace to listen in")
    p.add_argument("--map", action="append", type=parse_map, required=True)
    p.add_argument("--ready-file")
    args = p.parse_args(argv)
    threads = []
    for (lhost, lport), target in args.map:
        family = socket.AF_INET6 if ":" in lhost else socket.AF_INET
        listener = socket_in_netns(args.netns, family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((lhost, lport))
        listener.listen(64)
        t = threading.Thread(target=_serve, args=(listener, target), daemon=True)
        t.start()
        threads.append(t)
        print(f"forwarding {lhost}:{lport} in {args.netns} -> {target[0]}:{target[1]}", flush=True)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(args.ready_file + ".tmp", args.ready_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
