"""The server's sockets and the fast path.

UDP: a query with one question and at most an EDNS0 OPT record is checked with
a few byte comparisons, its lower-cased question is looked up in the index's
table of rendered responses (or the upstream cache), and the reply is the
query's ID and question bytes (so the client's case is echoed) around the
precomputed header and sections. No parsing into objects, no allocation beyond
the reply. Everything else takes the slow path (``podnet.dns.server.slowpath``).
TCP queries always take the slow path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterable
from time import monotonic

from podnet.dns import wire
from podnet.dns.cache import ResponseCache
from podnet.dns.index import ClusterIndex
from podnet.dns.server.autopath import Autopath, Composed
from podnet.dns.server.entries import AUTOPATH, FINAL, OPT_DO, OPT_PLAIN
from podnet.dns.server.query import error_reply, question_type
from podnet.dns.server.slowpath import SlowPath
from podnet.dns.upstream import UpstreamPool
from podnet.dns.wire import SERVFAIL

log = logging.getLogger("podnet.dns.server")

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux: bind an address the node does not hold (yet)


class DNSServer(SlowPath, Autopath):
    """UDP + TCP DNS server over a ClusterIndex, forwarding other names upstream.

    Use ``await start()`` / ``await stop()`` inside an event loop, or
    ``start_thread()`` / ``stop_thread()`` to run it on a loop of its own.
    """

    def __init__(self, index: ClusterIndex, listen: Iterable[tuple[str, int]] = (("127.0.0.1", 53),),
                 upstreams: Iterable[tuple[str, int]] = (), host_search: Iterable[str] = (),
                 autopath: bool = True, local_pods: dict[str, str] | None = None,
                 cache_size: int = 10_000, max_ttl: int = 3600, max_negative_ttl: int = 1800,
                 prefetch: bool = True, upstream_timeout: float = 2.0, upstream_connections: int = 2,
                 tcp_idle_timeout: float = 10.0, max_udp_size: int = wire.EDNS_SIZE,
                 freebind: bool = False, reuse_port: bool = False):
        """`freebind`: listen on addresses not on any interface yet (the node DNS process may
        start before the agent puts them on `lo`); `reuse_port`: a second server may bind the
        same addresses, so a new one can start before the old one stops."""
        self.index = index
        self.freebind = freebind
        self.reuse_port = reuse_port
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
        # Answers by rcode and question type, for the metrics (metrics.py reads them when
        # scraped): the fast path adds 1 at its entry's stat, rcode << 8 | type (types above
        # 255 at type 0; wire.answer_stat), for answers from the zone or from the upstream
        # cache; the slow path counts by (type, rcode).
        self.fast_zone = [0] * (16 << 8)
        self.fast_cached = [0] * (16 << 8)
        self.slow_answers: dict[tuple[int, int], int] = {}
        self.addresses: list[tuple[str, int]] = []  # bound (host, port), UDP and TCP alike
        self._socks: list[socket.socket] = []
        self._tcp_servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._ap_cache: dict[bytes, Composed] = {}  # autopath answers composed by earlier walks
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
                        server = await asyncio.start_server(self._tcp_client,
                                                            sock=self._socket(host, bound[1], socket.SOCK_STREAM))
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

    def _udp_socket(self, host: str, port: int) -> socket.socket:
        sock = self._socket(host, port, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        return sock

    def _socket(self, host: str, port: int, kind: int) -> socket.socket:
        """A bound, non-blocking socket with the server's options (TCP: not yet listening)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.freebind:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, 63, 1)  # IPV6_FREEBIND
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
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
        zone, cached = self.fast_zone, self.fast_cached  # fast answers, at their entry's stat
        stats = self.stats
        slow = stats["slow"]
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
                                if e.kind == FINAL or (e.kind == AUTOPATH and (
                                        not autopath or local_pods.get(addr[0]) != e.extra)):
                                    resp = b"".join((data[:2], e.hdrs[(data[2] & 1) | ((data[3] >> 3) & 2)],
                                                     data[12:], e.body))
                                    if len(resp) <= 512:
                                        zone[e.stat] += 1  # counted first: a client that has its answer sees it
                                        sendto(resp, addr)
                                        continue
                                elif e.kind == AUTOPATH:  # a local pod's search: a composed answer?
                                    c = autopath_ready(key, e)
                                    if c is not None:
                                        resp = b"".join((data[:2], c.hdrs[(data[2] & 1) | ((data[3] >> 3) & 2)],
                                                         data[12:], c.body))
                                        if len(resp) <= 512:
                                            zone[c.stat] += 1
                                            sendto(resp, addr)
                                            continue
                            else:
                                x = external.get(key)
                                if x is not None and (monotonic() < x.valid_until or x.retick(monotonic())):
                                    resp = b"".join((data[:2], x.hdrs[(data[2] & 1) | ((data[3] >> 3) & 2)],
                                                     data[12:], x.body))
                                    if len(resp) <= 512:
                                        cached[x.stat] += 1
                                        sendto(resp, addr)
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
                                    if e.kind == FINAL or (e.kind == AUTOPATH and (
                                            not autopath or local_pods.get(addr[0]) != e.extra)):
                                        hdrs, body, counts, stat = e.hdrs, e.body, zone, e.stat
                                    elif e.kind == AUTOPATH:
                                        c = autopath_ready(key, e)
                                        if c is not None:
                                            hdrs, body, counts, stat = c.hdrs, c.body, zone, c.stat
                                else:
                                    x = external.get(key)
                                    if x is not None and (monotonic() < x.valid_until or x.retick(monotonic())):
                                        hdrs, body, counts, stat = x.hdrs, x.body, cached, x.stat
                                if hdrs is not None:
                                    resp = b"".join((data[:2], hdrs[4 | (data[2] & 1) | ((data[3] >> 3) & 2)],
                                                     data[12:qend], body,
                                                     OPT_DO if data[qend + 7] & 0x80 else OPT_PLAIN))
                                    size = (data[qend + 3] << 8) | data[qend + 4]
                                    if len(resp) <= (512 if size < 512 else size if size < max_udp else max_udp):
                                        counts[stat] += 1
                                        sendto(resp, addr)
                                        continue
                except Exception:  # noqa: BLE001 - the slow path decides what this packet gets
                    pass
                self._udp_slow(data, addr, sendto)
        finally:
            # every packet received was answered by the fast path or went to the slow one
            stats["udp"] += received
            stats["fast"] += received - (stats["slow"] - slow)

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
            self._count_answer(out)
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
                self._count_answer(res)
                with contextlib.suppress(OSError):
                    sendto(res, addr)

        self._spawn(out).add_done_callback(done)

    def _count_answer(self, msg: bytes) -> None:
        """Count an answer of the slow path (or TCP) by question type and rcode."""
        key = (question_type(msg), msg[3] & 15 if len(msg) > 3 else 2)
        self.slow_answers[key] = self.slow_answers.get(key, 0) + 1

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
                    self._count_answer(out)
                    send(out)
                    continue
                task = self._spawn(out)
                pending.add(task)

                def done(t: asyncio.Task) -> None:
                    pending.discard(t)
                    if not t.cancelled() and t.exception() is None and t.result() is not None:
                        self._count_answer(t.result())
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
