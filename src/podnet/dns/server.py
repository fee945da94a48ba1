"""The node's DNS server: cluster names from the index, the rest forwarded and cached.

Hot path (UDP): a query with one question and at most an EDNS0 OPT record is
checked with a few byte comparisons, its lower-cased question is looked up in
the index's table of rendered responses (or the upstream cache), and the reply
is the query's ID and question bytes (so the client's case is echoed) around
the precomputed header and sections. No parsing into objects, no allocation
beyond the reply. Everything else (cache misses, autopath, truncation, odd or
malformed messages) takes the slow path, which parses with our own code or, for
unusual messages, dnspython.

Server-side search (autopath, as CoreDNS): for a query from a known local pod
for ``<name>.<its ns>.svc.<zone>`` that does not exist, the server walks the
rest of the pod's search path itself and answers with a CNAME from the asked
name to the first name that exists, plus that name's records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from time import monotonic

from podnet.dns import wire
from podnet.dns.cache import CacheEntry, ResponseCache, entry_from_response
from podnet.dns.index import Answer, ClusterIndex
from podnet.dns.upstream import UpstreamError, UpstreamPool
from podnet.dns.wire import (
    AA,
    ANY,
    AXFR,
    CD,
    CNAME,
    FORMERR,
    IN,
    IXFR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPT,
    QR,
    RA,
    RD,
    REFUSED,
    SERVFAIL,
    TC,
)
from podnet.hostport import parse_host_port

log = logging.getLogger(__name__)

# kinds of rendered zone answers; SLOW_ONLY is added for those the fast path must not serve
FINAL, CHASE, AUTOPATH, SLOW_ONLY = 0, 1, 2, 8
OPT_PLAIN = wire.opt_rr(False)
OPT_DO = wire.opt_rr(True)
MAX_CHASE = 8


class Silent(Exception):
    """Drop the packet without an answer."""


class NotFast(Exception):
    """Our own parser declines: let dnspython look at it."""


class Query:
    __slots__ = ("qid", "flags", "qname", "lname", "qtype", "qclass", "question", "edns", "do", "key")

    def __init__(self, qid: int, flags: int, qname: bytes, qtype: int, qclass: int, edns: int | None, do: bool):
        self.qid = qid
        self.flags = flags
        self.qname = qname
        self.lname = qname.lower()
        self.qtype = qtype
        self.qclass = qclass
        tc = struct.pack("!HH", qtype, qclass)
        self.question = qname + tc
        self.key = self.lname + tc
        self.edns = edns  # the client's UDP payload size (>= 512), None without EDNS
        self.do = do


def parse_query(data: bytes) -> Query:
    """Parse the common case (one question, optional OPT); raise NotFast or Silent otherwise."""
    n = len(data)
    if n < 12:
        raise Silent
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    if flags & QR:
        raise Silent  # a response: never answer one
    if flags & 0x7800 or qd != 1 or an or ns or ar > 1:
        raise NotFast
    off = 12
    while True:
        if off >= n:
            raise NotFast
        c = data[off]
        if c == 0:
            break
        if c > 63:
            raise NotFast
        off += c + 1
    if off - 12 >= wire.MAX_NAME:
        raise NotFast
    qend = off + 5
    if qend > n:
        raise NotFast
    qtype, qclass = struct.unpack_from("!HH", data, off + 1)
    edns, do = None, False
    if ar:
        if qend + 11 > n or data[qend] != 0:
            raise NotFast
        rtype, size, _ext, version, eflags, rdlen = struct.unpack_from("!HHBBHH", data, qend + 1)
        if rtype != OPT or version != 0 or qend + 11 + rdlen != n:
            raise NotFast
        edns, do = max(512, size), bool(eflags & 0x8000)
    elif qend != n:
        raise NotFast
    return Query(qid, flags, data[12:off + 1], qtype, qclass, edns, do)


def error_reply(data: bytes, rcode: int) -> bytes:
    """A bare reply (no sections) carrying rcode, for a message we will not parse further."""
    qid, flags = struct.unpack_from("!HH", data)
    return wire.header(qid, QR | (flags & 0x7800) | (flags & RD) | rcode, 0, 0, 0, 0)


@dataclass
class Result:
    """Records for one name, owners absolute (used to compose chased and autopath answers)."""

    rcode: int
    answer: list
    authority: list
    additional: list
    aa: bool


def fast_safe(typeclass: bytes) -> bool:
    """Whether the fast path may find an entry for these type/class bytes.

    The fast path lower-cases the whole question, type and class included. An
    entry is only visible to it when those four bytes hold no ASCII letter, so
    lower-casing cannot turn one record type into another (65 'A' -> 97 'a').
    """
    return typeclass.lower() == typeclass.upper()


_SHARED: dict[tuple, tuple] = {}  # identical headers / counts are shared between cached entries


def _shared(value: tuple) -> tuple:
    if len(_SHARED) > 100_000:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def _entry_from_answer(ans: Answer, lname: bytes, typeclass: bytes) -> tuple:
    """A rendered zone answer: (kind, header variants, sections, extra, (rcode, an, ns, ar)).

    Header variant i: RD = i & 1, CD = i & 2, one more additional record (our OPT) = i & 4.
    """
    body, _ = wire.render(lname, ans.answer, ans.authority, ans.additional)
    an, ns, ar = len(ans.answer), len(ans.authority), len(ans.additional)
    base = QR | AA | RA | ans.rcode
    meta = _shared((ans.rcode, an, ns, ar))
    hdrs = _SHARED.get(("hdrs", *meta))
    if hdrs is None:
        hdrs = tuple(struct.pack("!HHHHH", base | (RD if i & 1 else 0) | (CD if i & 2 else 0), 1, an, ns,
                                 ar + (1 if i & 4 else 0)) for i in range(8))
        _SHARED[("hdrs", *meta)] = hdrs
    slow = 0 if fast_safe(typeclass) else SLOW_ONLY
    if ans.chase is not None:
        return (CHASE + slow, hdrs, body, ans.chase, meta)
    if ans.rcode == NXDOMAIN and ans.autopath_ns is not None:
        return (AUTOPATH + slow, hdrs, body, ans.autopath_ns, meta)
    return (FINAL + slow, hdrs, body, None, meta)


def _dangling_cname(answer: list, lname: bytes, qtype: int) -> bytes | None:
    """The end of the CNAME chain from lname when it has no record of qtype, else None."""
    if qtype in (CNAME, ANY):
        return None
    cnames = {rr[0].lower(): rr[4].lower() for rr in answer if rr[1] == CNAME}
    name = lname
    for _ in range(MAX_CHASE):
        if name not in cnames:
            break
        name = cnames[name]
    if name == lname or any(rr[0].lower() == name and rr[1] == qtype for rr in answer):
        return None
    return name


class DNSServer:
    """UDP + TCP DNS server over a ClusterIndex, forwarding other names upstream.

    Use ``await start()`` / ``await stop()`` inside an event loop, or
    ``start_thread()`` / ``stop_thread()`` to run it on a loop of its own.
    """

    def __init__(self, index: ClusterIndex, listen: Iterable[tuple[str, int]] = (("127.0.0.1", 53),),
                 upstreams: Iterable[tuple[str, int]] = (), host_search: Iterable[str] = (),
                 autopath: bool = True, local_pods: dict[str, str] | None = None,
                 cache_size: int = 10_000, max_ttl: int = 3600, max_negative_ttl: int = 1800,
                 prefetch: bool = True, upstream_timeout: float = 2.0, upstream_connections: int = 2,
                 tcp_idle_timeout: float = 10.0, max_udp_size: int = wire.EDNS_SIZE):
        self.index = index
        self.listen = [(h, int(p)) for h, p in listen]
        self.upstream = UpstreamPool(list(upstreams), upstream_connections, upstream_timeout)
        self.host_search = [wire.wire_labels(wire.name_to_wire(d)) for d in host_search if d.strip(".")]
        self.autopath = autopath
        # pod IP -> namespace; by default the index's own view of this node's pods
        self.local_pods: dict[str, str] = index.local_pods if local_pods is None else local_pods
        self.cache = ResponseCache(cache_size, max_ttl, max_negative_ttl)
        self.prefetch = prefetch
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_udp_size = max(512, max_udp_size)  # UDP answers never exceed this, whatever the client offers
        self.stats: dict[str, int] = dict.fromkeys(
            ("udp", "tcp", "fast", "slow", "fallback", "formerr", "dropped", "autopath", "autopath_miss",
             "forwarded", "cache_hits", "servfail", "truncated", "prefetches", "errors"), 0)
        self.addresses: list[tuple[str, int]] = []  # bound (host, port), UDP and TCP alike
        self._socks: list[socket.socket] = []
        self._tcp_servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[bytes, asyncio.Future] = {}
        # composed autopath answers: key -> (answer entry, asked zone entry, zone deps, upstream deps)
        self._ap_cache: dict[bytes, tuple] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ local pods

    def set_local_pods(self, pods: dict[str, str]) -> None:
        self.local_pods.clear()
        self.local_pods.update(pods)

    def add_local_pod(self, ip: str, namespace: str) -> None:
        self.local_pods[ip] = namespace

    def remove_local_pod(self, ip: str) -> None:
        self.local_pods.pop(ip, None)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            for host, port in self.listen:
                # port 0: the kernel picks a UDP port; TCP must get the same one, so retry on a clash
                for attempt in range(20 if port == 0 else 1):
                    sock = self._udp_socket(host, port)
                    bound = sock.getsockname()[:2]
                    try:
                        server = await asyncio.start_server(self._tcp_client, host, bound[1], reuse_address=True)
                    except OSError:
                        sock.close()
                        if attempt == (19 if port == 0 else 0):
                            raise
                        continue
                    break
                self._socks.append(sock)
                loop.add_reader(sock.fileno(), self._on_udp, sock)
                self._tcp_servers.append(server)
                self.addresses.append((bound[0], bound[1]))
        except BaseException:
            await self.stop()
            raise

    @staticmethod
    def _udp_socket(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((host, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop(self) -> None:
        loop = self._loop or asyncio.get_running_loop()
        for sock in self._socks:
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        for server in self._tcp_servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._tcp_servers.clear()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        await self.upstream.close()

    def start_thread(self, timeout: float = 10.0) -> None:
        """Run the server on its own event loop in a daemon thread; returns once it listens."""
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                error.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name="podnet-dns", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("DNS server did not start")
        if error:
            raise error[0]

    def stop_thread(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None

    def call(self, fn, *args) -> None:
        """Run fn(*args) on the server's loop (thread-safe), e.g. to feed the index."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ UDP

    def _on_udp(self, sock: socket.socket) -> None:
        recvfrom, sendto = sock.recvfrom, sock.sendto
        responses = self.index.responses
        local_pods = self.local_pods
        autopath = self.autopath
        external = self.cache.entries
        max_udp = self.max_udp_size
        autopath_ready = self._autopath_ready
        served = 0
        received = 0
        try:
            for _ in range(512):
                try:
                    data, addr = recvfrom(4096)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                received += 1
                # ---- fast path: one question, no other sections but an optional OPT, answer rendered
                try:
                    if not data[2] & 0xF8 and data[4:10] == b"\x00\x01\x00\x00\x00\x00":
                        if data[10:12] == b"\x00\x00":
                            # no EDNS: the question is the rest of the packet, so it is the key
                            # (a packet with trailing bytes matches nothing and takes the slow path)
                            key = data[12:].lower()
                            e = responses.get(key)
                            if e is not None:
                                if e[0] == FINAL or (e[0] == AUTOPATH and (not autopath
                                                                           or local_pods.get(addr[0]) != e[3])):
                                    resp = b"".join((data[:2], e[1][(data[2] & 1) | ((data[3] >> 3) & 2)],
                                                     data[12:], e[2]))
                                    if len(resp) <= 512:
                                        sendto(resp, addr)
                                        served += 1
                                        continue
                                elif e[0] == AUTOPATH:  # a local pod's search: a composed answer?
                                    c = autopath_ready(key, e)
                                    if c is not None:
                                        resp = b"".join((data[:2], c.hdrs[(data[2] & 1) | ((data[3] >> 3) & 2)],
                                                         data[12:], c.body))
                                        if len(resp) <= 512:
                                            sendto(resp, addr)
                                            served += 1
                                            continue
                            else:
                                x = external.get(key)
                                if x is not None and (monotonic() < x.valid_until or x.retick(monotonic())):
                                    resp = b"".join((data[:2], x.hdrs[(data[2] & 1) | ((data[3] >> 3) & 2)],
                                                     data[12:], x.body))
                                    if len(resp) <= 512:
                                        sendto(resp, addr)
                                        served += 1
                                        continue
                        elif data[10:12] == b"\x00\x01":
                            end = data.find(0, 12)
                            qend = end + 5
                            n = len(data)
                            # an OPT record exactly filling the rest of the packet, EDNS version 0
                            if (n >= qend + 11 and data[qend:qend + 3] == b"\x00\x00\x29" and not data[qend + 6]
                                    and n == qend + 11 + ((data[qend + 9] << 8) | data[qend + 10])):
                                key = data[12:qend].lower()
                                e = responses.get(key)
                                hdrs = None
                                if e is not None:
                                    if e[0] == FINAL or (e[0] == AUTOPATH and (not autopath
                                                                               or local_pods.get(addr[0]) != e[3])):
                                        hdrs, body = e[1], e[2]
                                    elif e[0] == AUTOPATH:
                                        c = autopath_ready(key, e)
                                        if c is not None:
                                            hdrs, body = c.hdrs, c.body
                                else:
                                    x = external.get(key)
                                    if x is not None and (monotonic() < x.valid_until or x.retick(monotonic())):
                                        hdrs, body = x.hdrs, x.body
                                if hdrs is not None:
                                    resp = b"".join((data[:2], hdrs[4 | (data[2] & 1) | ((data[3] >> 3) & 2)],
                                                     data[12:qend], body,
                                                     OPT_DO if data[qend + 7] & 0x80 else OPT_PLAIN))
                                    size = (data[qend + 3] << 8) | data[qend + 4]
                                    if len(resp) <= (512 if size < 512 else size if size < max_udp else max_udp):
                                        sendto(resp, addr)
                                        served += 1
                                        continue
                except Exception:  # noqa: BLE001 - the slow path decides what this packet gets
                    pass
                self._udp_slow(data, addr, sendto)
        finally:
            stats = self.stats
            stats["udp"] += received
            stats["fast"] += served

    def _udp_slow(self, data: bytes, addr, sendto) -> None:
        self.stats["slow"] += 1
        try:
            out = self._handle(data, addr[0], udp=True)
        except Exception:  # never let one packet take the server down
            log.exception("DNS query handling failed")
            self.stats["errors"] += 1
            out = error_reply(data, SERVFAIL) if len(data) >= 12 and not data[2] & 0x80 else None
        if out is None:
            return
        if isinstance(out, bytes):
            with contextlib.suppress(OSError):
                sendto(out, addr)
            return

        def done(task: asyncio.Task) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                log.error("DNS query handling failed: %r", exc)
                self.stats["errors"] += 1
                return
            res = task.result()
            if res is not None:
                with contextlib.suppress(OSError):
                    sendto(res, addr)

        self._spawn(out).add_done_callback(done)

    # ------------------------------------------------------------ TCP

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        src = peer[0] if peer else ""
        pending: set[asyncio.Task] = set()
        me = asyncio.current_task()
        if me is not None:  # stop() cancels open connections too
            self._tasks.add(me)

        def send(msg: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(msg)) + msg)

        try:
            while True:
                hdr = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
                (n,) = struct.unpack("!H", hdr)
                data = await asyncio.wait_for(reader.readexactly(n), self.tcp_idle_timeout)
                self.stats["tcp"] += 1
                try:
                    out = self._handle(data, src, udp=False)
                except Exception:
                    log.exception("DNS query handling failed")
                    self.stats["errors"] += 1
                    out = error_reply(data, SERVFAIL) if len(data) >= 12 and not data[2] & 0x80 else None
                if out is None:
                    continue
                if isinstance(out, bytes):
                    send(out)
                    continue
                task = self._spawn(out)
                pending.add(task)

                def done(t: asyncio.Task) -> None:
                    pending.discard(t)
                    if not t.cancelled() and t.exception() is None and t.result() is not None:
                        send(t.result())

                task.add_done_callback(done)
                if len(pending) > 64:
                    await asyncio.wait(list(pending), return_when=asyncio.FIRST_COMPLETED)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(me)
            for t in pending:
                t.cancel()
            writer.close()
            with contextlib.suppress(BaseException):
                await writer.wait_closed()

    # ------------------------------------------------------------ one query

    def _handle(self, data: bytes, src: str, udp: bool):
        """bytes to send, None for silence, or a coroutine producing either."""
        try:
            q = parse_query(data)
        except Silent:
            self.stats["dropped"] += 1
            return None
        except NotFast:
            got = self._fallback(data)
            if got is None or isinstance(got, bytes):
                return got
            q = got
        limit = min(q.edns, self.max_udp_size) if q.edns else 512
        if not udp:
            limit = 65535
        return self._answer(q, src, limit)

    def _fallback(self, data: bytes) -> Query | bytes | None:
        """Messages our parser declines: dnspython decides between an answer and FORMERR."""
        self.stats["fallback"] += 1
        qid, flags = struct.unpack_from("!HH", data)
        if (flags >> 11) & 0xF != 0:
            return error_reply(data, NOTIMP)
        import dns.exception
        import dns.flags
        import dns.message

        try:
            msg = dns.message.from_wire(data)
        except dns.message.UnknownTSIGKey:
            return error_reply(data, 9)  # NOTAUTH
        except (dns.exception.DNSException, ValueError, IndexError, struct.error, UnicodeError):
            self.stats["formerr"] += 1
            return error_reply(data, FORMERR)
        if msg.edns > 0:
            if len(msg.question) != 1:
                return wire.header(qid, QR | (flags & RD), 0, 0, 0, 1) + wire.opt_rr(False, wire.BADVERS >> 4)
            rr = msg.question[0]
            question = rr.name.to_wire() + struct.pack("!HH", rr.rdtype, rr.rdclass)
            return wire.header(qid, QR | (flags & RD), 1, 0, 0, 1) + question + wire.opt_rr(False, wire.BADVERS >> 4)
        if len(msg.question) != 1 or msg.answer or msg.authority:
            self.stats["formerr"] += 1
            return error_reply(data, FORMERR)
        rrset = msg.question[0]
        try:
            qname = rrset.name.to_wire()
        except dns.exception.DNSException:
            return error_reply(data, FORMERR)
        edns = max(512, msg.payload) if msg.edns == 0 else None
        return Query(qid, flags, qname, int(rrset.rdtype), int(rrset.rdclass), edns,
                     bool(msg.ednsflags & dns.flags.DO))

    def _assemble(self, q: Query, flags: int, counts: tuple[int, int, int], body: bytes, limit: int) -> bytes:
        an, ns, ar = counts
        flags |= QR | RA | (q.flags & (RD | CD))
        opt = b""
        if q.edns is not None:
            ar += 1
            opt = OPT_DO if q.do else OPT_PLAIN
        msg = wire.header(q.qid, flags, 1, an, ns, ar) + q.question + body + opt
        if len(msg) > limit:
            self.stats["truncated"] += 1
            msg = wire.header(q.qid, flags | TC, 1, 0, 0, 1 if opt else 0) + q.question + opt
        return msg

    def _error(self, q: Query, rcode: int, limit: int) -> bytes:
        if rcode == SERVFAIL:
            self.stats["servfail"] += 1
        return self._assemble(q, rcode, (0, 0, 0), b"", limit)

    def _from_entry(self, q: Query, entry: tuple, limit: int) -> bytes:
        rcode, an, ns, ar = entry[4]
        return self._assemble(q, AA | rcode, (an, ns, ar), entry[2], limit)

    def _from_cache(self, q: Query, e: CacheEntry, limit: int) -> bytes:
        body = e.render(q.lname, monotonic())
        return self._assemble(q, e.rcode, e.counts, body, limit)

    def _zone_entry(self, q: Query) -> tuple | None:
        entry = self.index.responses.get(q.key)
        if entry is not None:
            return entry
        gen = self.index.generation
        res = self.index.resolve(q.lname, q.qtype)
        if res is None:
            return None
        ans, group = res
        entry = _entry_from_answer(ans, q.lname, q.key[-4:])
        self.index.cache_response(q.key, group, entry, gen)
        return entry

    def _answer(self, q: Query, src: str, limit: int):
        if q.qclass != IN:
            return self._error(q, REFUSED, limit)
        if q.qtype in (AXFR, IXFR):
            return self._error(q, REFUSED if q.qtype == AXFR else NOTIMP, limit)
        if q.qtype == OPT:
            return self._error(q, FORMERR, limit)
        entry = self._zone_entry(q)
        if entry is not None:
            kind = entry[0] & 7
            if kind == FINAL:
                return self._from_entry(q, entry, limit)
            if kind == AUTOPATH:
                if self.autopath and self.local_pods.get(src) == entry[3]:
                    return self._autopath_cached(q, entry, limit) or self._autopath(q, entry, limit)
                return self._from_entry(q, entry, limit)
            return self._chase(q, entry, limit)
        now = monotonic()
        e = self.cache.get(q.key, now)
        if e is not None:
            self.stats["cache_hits"] += 1
            if e.second != int(now - e.stored):
                e.hits += 1
                self.cache.touch(q.key)
            if self.prefetch and self.cache.wants_prefetch(e, now):
                e.prefetching = True
                self.stats["prefetches"] += 1
                self._spawn(self._refresh(q.key, q.lname, q.qtype, q.qclass))
            return self._from_cache(q, e, limit)
        return self._forward(q, limit)

    # ------------------------------------------------------------ upstream

    async def _fetch(self, key: bytes, lname: bytes, qtype: int, qclass: int) -> CacheEntry:
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            self.stats["forwarded"] += 1
            resp = await self.upstream.query(lname, qtype, qclass)
            entry, cacheable = entry_from_response(resp, lname, monotonic(), self.cache.max_ttl,
                                                   self.cache.max_negative_ttl)
            entry.fast = fast_safe(key[-4:])
            if cacheable:
                self.cache.put(key, entry)
            fut.set_result(entry)
            return entry
        except BaseException as e:
            err = e if isinstance(e, UpstreamError) else UpstreamError(repr(e))
            if isinstance(e, wire.WireError | struct.error | IndexError):
                err = UpstreamError(f"malformed upstream answer: {e}")
            fut.set_exception(err)
            fut.exception()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise err from None
        finally:
            self._inflight.pop(key, None)

    async def _refresh(self, key: bytes, lname: bytes, qtype: int, qclass: int) -> None:
        with contextlib.suppress(UpstreamError):
            await self._fetch(key, lname, qtype, qclass)

    async def _forward(self, q: Query, limit: int) -> bytes:
        try:
            e = await self._fetch(q.key, q.lname, q.qtype, q.qclass)
        except UpstreamError as err:
            log.debug("forwarding %s failed: %s", wire.wire_to_text(q.qname), err)
            return self._error(q, SERVFAIL, limit)
        return self._from_cache(q, e, limit)

    async def resolve(self, lname: bytes, qtype: int, depth: int = 0) -> Result:
        """Records for a lower-case wire name: from the index, the cache or upstream.
        Raises UpstreamError when upstream is needed and fails."""
        res = self.index.resolve(lname, qtype)
        if res is not None:
            ans, _ = res
            fix = [(lname if o is None else o, t, c, ttl, rd) for o, t, c, ttl, rd in ans.answer]
            result = Result(ans.rcode, fix, list(ans.authority), list(ans.additional), True)
            if ans.chase is not None and depth < MAX_CHASE:
                try:
                    more = await self.resolve(ans.chase, qtype, depth + 1)
                except UpstreamError:
                    return result
                result.answer += more.answer
                result.authority = more.authority
                result.additional = more.additional
                result.rcode = more.rcode
                result.aa = result.aa and more.aa
            return result
        key = lname + struct.pack("!HH", qtype, IN)
        now = monotonic()
        e = self.cache.get(key, now)
        if e is None:
            e = await self._fetch(key, lname, qtype, IN)
            now = monotonic()
        an, ns, ar = e.records(lname, now)
        if e.rcode not in (NOERROR, NXDOMAIN):
            raise UpstreamError(f"upstream answered rcode {e.rcode}")
        result = Result(e.rcode, an, ns, ar, False)
        # an upstream that stops at a CNAME (local data, some forwarders): follow the chain
        target = _dangling_cname(an, lname, qtype)
        if target is not None and depth < MAX_CHASE:
            try:
                more = await self.resolve(target, qtype, depth + 1)
            except UpstreamError:
                return result
            result.answer += more.answer
            result.authority, result.additional, result.rcode = more.authority, more.additional, more.rcode
        return result

    async def _chase(self, q: Query, entry: tuple, limit: int) -> bytes:
        """ExternalName: the CNAME plus the target's records."""
        result = await self.resolve(q.lname, q.qtype)
        body, _ = wire.render(q.lname, result.answer, result.authority, result.additional)
        flags = (AA if result.aa else 0) | result.rcode
        return self._assemble(q, flags, (len(result.answer), len(result.authority), len(result.additional)),
                              body, limit)

    # ------------------------------------------------------------ autopath

    def search_path(self, namespace: str) -> list[list[bytes]]:
        """The pod's search path after its first element, as label lists (last: the bare name)."""
        zone = list(self.index.zone_labels)
        return [[b"svc", *zone], zone, *self.host_search, []]

    def _autopath_ready(self, key: bytes, asked: tuple) -> CacheEntry | None:
        """For the fast path: the composed autopath answer for key, rendered and valid now."""
        ap = self._ap_cache.get(key)
        if ap is None or ap[1] is not asked:
            return None
        composed = ap[0]
        now = monotonic()
        if now >= composed.valid_until and not composed.retick(now):
            return None
        responses = self.index.responses
        for k, e in ap[2]:
            if responses.get(k) is not e:
                return None
        entries = self.cache.entries
        for k, e in ap[3]:
            if entries.get(k) is not e or now >= e.fresh_until:
                return None  # gone, or due for a prefetch: the slow path deals with it
        self.stats["autopath"] += 1
        return composed

    def _autopath_cached(self, q: Query, entry: tuple, limit: int) -> bytes | None:
        """A composed autopath answer from an earlier walk, if everything it was made of is unchanged.

        An entry lists the rendered zone answers and upstream cache entries its walk
        consulted; it is valid while each is still the very object in its cache (any
        index change drops zone answers, any refresh replaces cache entries) and
        fresh. A dependency about to expire is prefetched, as on a direct hit.
        """
        ap = self._ap_cache.get(q.key)
        if ap is None:
            return None
        composed, asked, zone_deps, ext_deps = ap
        now = monotonic()
        responses = self.index.responses
        if now >= composed.expires or responses.get(q.key) is not asked:
            return None
        for k, e in zone_deps:
            if responses.get(k) is not e:
                return None
        entries = self.cache.entries
        for k, e in ext_deps:
            if entries.get(k) is not e or now >= e.expires:
                return None
            if self.prefetch and now >= e.fresh_until and not e.prefetching and e.ttl > 2:
                e.prefetching = True
                self.stats["prefetches"] += 1
                self._spawn(self._refresh(k, k[:-4], q.qtype, q.qclass))
        self.stats["autopath"] += 1
        return self._from_cache(q, composed, limit)

    async def _autopath(self, q: Query, entry: tuple, limit: int) -> bytes:
        ns = entry[3]
        labels = wire.wire_labels(q.qname)
        base = labels[:len(labels) - 2 - len(self.index.zone_labels)]
        tc = q.key[-4:]
        zone_deps: list[tuple[bytes, tuple]] = []
        ext_deps: list[tuple[bytes, CacheEntry]] = []
        cacheable = True
        for suffix in self.search_path(ns):
            if not base and not suffix:
                continue
            cand_labels = base + suffix
            if sum(len(x) + 1 for x in cand_labels) + 1 > wire.MAX_NAME:
                continue
            cand = wire.labels_to_wire(cand_labels)
            lower = cand.lower()
            key = lower + tc
            if self.index.is_ours(lower):
                zentry = self._zone_entry_for(lower, q.qtype, key)
                if zentry is None or self.index.responses.get(key) is not zentry:
                    cacheable = False
                else:
                    zone_deps.append((key, zentry))
                if zentry is not None and zentry[4][0] == NXDOMAIN:
                    continue
            try:
                res = await self.resolve(lower, q.qtype)
            except UpstreamError:
                cacheable = False
                continue
            if not self.index.is_ours(lower):
                e = self.cache.entries.get(key)
                if e is None or (res.rcode == NOERROR and len(res.answer) != len(e.sections[0])):
                    cacheable = False  # not cached upstream, or a CNAME chain followed further
                else:
                    ext_deps.append((key, e))
            if res.rcode != NOERROR:
                continue
            ttl = min((rr[3] for rr in res.answer), default=self.index.ttl)
            answer = [(None, CNAME, IN, ttl, cand), *res.answer]
            body, _ = wire.render(q.lname, answer, res.authority, res.additional)
            self.stats["autopath"] += 1
            if cacheable:
                self._remember_autopath(q, entry, answer, res, zone_deps, ext_deps)
            return self._assemble(q, NOERROR, (len(answer), len(res.authority), len(res.additional)), body, limit)
        self.stats["autopath_miss"] += 1
        return self._from_entry(q, entry, limit)

    def _zone_entry_for(self, lower: bytes, qtype: int, key: bytes) -> tuple | None:
        entry = self.index.responses.get(key)
        if entry is not None:
            return entry
        gen = self.index.generation
        res = self.index.resolve(lower, qtype)
        if res is None:
            return None
        entry = _entry_from_answer(res[0], lower, key[-4:])
        self.index.cache_response(key, res[1], entry, gen)
        return entry

    def _remember_autopath(self, q: Query, asked: tuple, answer: list, res: Result,
                           zone_deps: list, ext_deps: list) -> None:
        if self.index.responses.get(q.key) is not asked:
            return
        now = monotonic()
        if ext_deps:
            life = min(e.expires for _, e in ext_deps) - now
        else:
            life = float(self.index.ttl)
        if life < 1:
            return
        # records with absolute owners, except the CNAME (owned by the question)
        composed = CacheEntry(NOERROR, (answer, list(res.authority), list(res.additional)), int(life), now, 0.0)
        composed.fast = fast_safe(q.key[-4:])  # the fast path serves it only after _autopath_ready
        composed.render(q.lname, now)
        if len(self._ap_cache) >= self.cache.max_entries:
            self._ap_cache.clear()
        self._ap_cache[q.key] = (composed, asked, tuple(zone_deps), tuple(ext_deps))


# ---------------------------------------------------------------- running it as a process


def _dns_address(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, 53)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m podnet.dns.server", description="podnet node DNS server")
    p.add_argument("--listen", action="append", default=[], type=_dns_address,
                   help="IP[:PORT] or [IPV6][:PORT] (repeatable; default 127.0.0.1:53)")
    p.add_argument("--upstream", action="append", default=[], type=_dns_address,
                   help="IP[:PORT] or [IPV6][:PORT] of a resolver (repeatable)")
    p.add_argument("--zone", default="cluster.local")
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--pod-records", default="insecure", choices=("insecure", "verified", "disabled"))
    p.add_argument("--search", action="append", default=[], help="host search domain (repeatable)")
    p.add_argument("--local-pod", action="append", default=[], help="POD_IP=NAMESPACE (repeatable)")
    p.add_argument("--no-autopath", action="store_true")
    p.add_argument("--manifests", action="append", default=[], help="file or directory of objects to load")
    p.add_argument("--store", help="store URL to list and watch (the agent's way)")
    p.add_argument("--node", help="this node's name (its pods become autopath clients)")
    p.add_argument("--cache-size", type=int, default=10_000)
    p.add_argument("--stats-file", help="write counters as JSON here on exit")
    p.add_argument("--ready-file", help="write the bound addresses as JSON here once listening")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    index = ClusterIndex(zone=args.zone, ttl=args.ttl, pod_records=args.pod_records, node_name=args.node)
    if args.manifests:
        from podnet.model.manifests import load_paths

        index.load(load_paths(args.manifests))
    server = DNSServer(index, args.listen or [("127.0.0.1", 53)],
                       upstreams=args.upstream, host_search=args.search,
                       autopath=not args.no_autopath, cache_size=args.cache_size)
    for item in args.local_pod:
        ip, _, ns = item.partition("=")
        server.add_local_pod(ip, ns)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        watcher = None
        if args.store:
            watcher = threading.Thread(target=_watch_store, args=(args.store, server), daemon=True)
            watcher.start()
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "addresses": server.addresses}, f)
            os.replace(tmp, args.ready_file)
        await stop.wait()
        await server.stop()

    asyncio.run(run())
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            json.dump({**server.stats, "index": index.stats(), "upstream_queries": server.upstream.queries}, f)
    return 0


def _watch_store(url: str, server: DNSServer) -> None:
    """List then watch the store with the agent's follower: a compacted history reloads
    the index (what was deleted meanwhile goes), a failed watch is retried."""
    from podnet.agent.cache import ObjectCache
    from podnet.agent.dataplanes import DnsDataplane
    from podnet.agent.follow import StoreFollower
    from podnet.store.url import open_store

    dns = DnsDataplane(server.index)
    follower = StoreFollower(ObjectCache(unkept=dns.kinds), [dns], prefix="/podnet/objects/")
    kv = open_store(url, create=False)
    try:
        rev = follower.relist(kv)
    finally:
        kv.close()
    follower.watch(lambda: open_store(url, create=False), rev + 1)


if __name__ == "__main__":
    sys.exit(main())
