"""`podnet dns serve --node NAME`: the node's DNS server as its own process (beside
`podnet agent --dns-server separate`, as a DaemonSet of its own: deploy/node-dns.yaml)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from podnet.dns.resolvconf import NODE_DNS_ADDRESS
from podnet.errors import PodnetError
from podnet.hostport import parse_host_port


def register(sub: argparse._SubParsersAction) -> None:
    dns = sub.add_parser("dns", help="node DNS")
    dsub = dns.add_subparsers(dest="dns_command", metavar="COMMAND")
    dsub.required = True
    p = dsub.add_parser("serve", help="answer node DNS in this network namespace, following the store "
                                      "(keeps answering while the agent is down)")
    p.add_argument("--node", required=True, help="this node's name (its pods get server-side search)")
    p.add_argument("--dns-address", default=NODE_DNS_ADDRESS,
                   help="node-local DNS address, as the agent's (default %(default)s)")
    p.add_argument("--cluster-dns-ip", action="append", default=[], metavar="IP",
                   help="also answer on this address, e.g. the kube-dns ClusterIP, as the agent's (repeatable)")
    p.add_argument("--dns-upstream", action="append", default=[], metavar="IP[:PORT]",
                   help="resolver for names outside the cluster domain (repeatable)")
    p.add_argument("--cluster-domain", default=None, help="default: the cluster's, from the store")
    p.add_argument("--port", type=int, default=53, help="UDP and TCP port (default %(default)s)")
    p.add_argument("--cache-size", type=int, default=10_000, help="external answers cached (default %(default)s)")
    p.add_argument("--ready-file", help="written (JSON: pid, addresses, revision) once it listens")
    p.add_argument("--synced-file", help="the store revision its answers reflect, rewritten as it follows")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (/metrics), /healthz and /readyz on this port")
    p.add_argument("--metrics-address", default=None, metavar="IP",
                   help="address of the metrics listener (default 127.0.0.1; 0.0.0.0 listens on every address, "
                        "only when given here)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)


def _upstream(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, 53)
    except ValueError as e:
        raise PodnetError(f"--dns-upstream {e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from podnet.dns import resolvconf
    from podnet.dns.server.node import NodeDns, NodeDnsConfig
    from podnet.store import credentials

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s {args.node} dns %(levelname)s %(name)s: %(message)s")
    if not args.dns_address:
        raise PodnetError("--dns-address is empty: there is nothing to serve")
    cfg = NodeDnsConfig(node=args.node, store_url=getattr(args, "store", None),
                        store_credentials=credentials.from_args(args),
                        addresses=(args.dns_address, *args.cluster_dns_ip), port=args.port,
                        upstreams=[_upstream(u) for u in args.dns_upstream], cluster_domain=args.cluster_domain,
                        host_search=resolvconf.host_search_domains(), cache_size=args.cache_size,
                        ready_file=args.ready_file, synced_file=args.synced_file,
                        metrics_port=args.metrics_port, metrics_address=args.metrics_address)
    node_dns = NodeDns(cfg)
    signal.signal(signal.SIGTERM, node_dns.stop)
    signal.signal(signal.SIGINT, node_dns.stop)
    node_dns.run()
    return 0
