"""Forwarding to upstream resolvers over TCP, with connection reuse.

Each upstream gets a small pool of TCP connections; queries are pipelined on
them (several in flight per connection, answers matched by message ID, in any
order). A connection that closes or stalls fails only its own queries, which
are retried once on another connection or the next upstream. TCP avoids the
UDP conntrack races of the node's DNS path and any truncation round trip.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct

from podnet.dns import wire

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One TCP connection: length-prefixed messages, answers matched to queries by ID."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = random.randrange(0x10000)
        self.closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            n = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + n:
                break
            msg = bytes(buf[2:2 + n])
            del buf[:2 + n]
            if n >= 12:
                fut = self.pending.pop((msg[0] << 8) | msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def new_id(self) -> int:
        for _ in range(0x10000):
            self.next_id = (self.next_id + 1) & 0xFFFF
            if self.next_id not in self.pending:
                return self.next_id
        raise UpstreamError("no free message ID")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(UpstreamError("upstream connection closed"))
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future, conn: _Conn, qid: int) -> None:
    if conn.pending.get(qid) is fut:
        del conn.pending[qid]
    if not fut.done():
        fut.set_exception(UpstreamError("no answer in time"))


class Upstream:
    """One resolver address with a pool of pipelined TCP connections."""

    def __init__(self, host: str, port: int = 53, connections: int = 2, max_inflight: int = 100):
        self.host = host
        self.port = port
        self.size = connections
        self.max_inflight = max_inflight
        self.conns: list[_Conn] = []
        self._connecting: asyncio.Future | None = None
        self.failures = 0

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"

    async def _connect(self, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(_Conn, self.host, self.port), timeout)
        return conn

    async def _conn(self, timeout: float) -> _Conn:
        conns = self.conns
        if any(c.closed for c in conns):
            conns = self.conns = [c for c in conns if not c.closed]
        best = None
        for c in conns:
            if len(c.pending) < self.max_inflight and (best is None or len(c.pending) < len(best.pending)):
                best = c
        if best is not None and (len(conns) >= self.size or not best.pending):
            return best
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        fut = asyncio.get_running_loop().create_future()
        self._connecting = fut
        try:
            conn = await self._connect(timeout)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._connecting = None
        self.conns.append(conn)
        if not fut.done():
            fut.set_result(conn)
        return conn

    async def query(self, qname: bytes, qtype: int, qclass: int, timeout: float) -> bytes:
        conn = await self._conn(timeout)
        qid = conn.new_id()
        msg = wire.header(qid, wire.RD, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, qclass)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        conn.pending[qid] = fut
        assert conn.transport is not None
        conn.transport.write(struct.pack("!H", len(msg)) + msg)
        timer = loop.call_later(timeout, _expire, fut, conn, qid)
        try:
            resp = await fut
        finally:
            timer.cancel()
        if not _matches(resp, qname, qtype, qclass):
            raise UpstreamError(f"{self}: answer does not match the question")
        return resp

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()


def _matches(resp: bytes, qname: bytes, qtype: int, qclass: int) -> bool:
    if len(resp) < 12 or not resp[2] & 0x80 or struct.unpack_from("!H", resp, 4)[0] != 1:
        return False
    try:
        name, off = wire.read_name(resp, 12)
    except wire.WireError:
        return False
    if off + 4 > len(resp):
        return False
    return name.lower() == qname.lower() and struct.unpack_from("!HH", resp, off) == (qtype, qclass)


class UpstreamPool:
    """Try upstreams in order (the last one that answered first); one retry per query."""

    def __init__(self, servers: list[tuple[str, int]], connections: int = 2, timeout: float = 2.0):
        self.upstreams = [Upstream(h, p, connections) for h, p in servers]
        self.timeout = timeout
        self.queries = 0
        self.errors = 0

    def __bool__(self) -> bool:
        return bool(self.upstreams)

    async def query(self, qname: bytes, qtype: int, qclass: int = wire.IN) -> bytes:
        if not self.upstreams:
            raise UpstreamError("no upstream resolvers configured")
        self.queries += 1
        last: Exception | None = None
        order = sorted(self.upstreams, key=lambda u: u.failures)
        attempts = order + order[:1] if len(order) == 1 else order
        for up in attempts:
            try:
                resp = await up.query(qname, qtype, qclass, self.timeout)
                up.failures = 0
                return resp
            except (TimeoutError, UpstreamError, OSError) as e:
                up.failures += 1
                last = e
                log.debug("upstream %s failed: %s", up, e)
        self.errors += 1
        raise UpstreamError(str(last))

    async def close(self) -> None:
        for u in self.upstreams:
            await u.close()
