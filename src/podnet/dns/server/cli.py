"""``python -m podnet.dns.server``: the node DNS server as a process of its own,
fed from manifests or by listing and watching the store."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading

from podnet.dns.index import ClusterIndex
from podnet.dns.server.fastpath import DNSServer
from podnet.hostport import parse_host_port
from podnet.store import credentials


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
    credentials.add_arguments(p)
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
            watcher = threading.Thread(target=_watch_store, args=(args.store, server, credentials.from_args(args)),
                                       daemon=True)
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


def _watch_store(url: str, server: DNSServer, creds: credentials.EtcdCredentials | None = None) -> None:
    """List then watch the store with the agent's follower: a compacted history reloads
    the index (what was deleted meanwhile goes), a failed watch is retried."""
    from podnet.agent.cache import ObjectCache
    from podnet.agent.dataplanes import DnsDataplane
    from podnet.agent.follow import StoreFollower
    from podnet.store.url import open_store

    dns = DnsDataplane(server.index)
    follower = StoreFollower(ObjectCache(unkept=dns.kinds, records=True), [dns], prefix="/podnet/objects/")
    kv = open_store(url, create=False, credentials=creds)
    try:
        rev = follower.relist(kv)
    finally:
        kv.close()
    follower.watch(lambda: open_store(url, create=False, credentials=creds), rev + 1)
