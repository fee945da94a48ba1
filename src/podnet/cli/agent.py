"""`podnet agent --node NAME`: the node daemon."""

from __future__ import annotations

import argparse
import logging
import sys

from podnet.cni import DEFAULT_SOCKET
from podnet.dns.resolvconf import NODE_DNS_ADDRESS
from podnet.errors import PodnetError
from podnet.hostport import parse_host_port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node agent (in the node's network namespace)")
    p.add_argument("--node", required=True, help="this node's name (a Node object in the store)")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="CNI socket path (default %(default)s)")
    p.add_argument("--node-ip", help="underlay address (default: the Node's InternalIP)")
    p.add_argument("--resync", type=float, default=60.0, help="seconds between full reconciles (default %(default)s)")
    p.add_argument("--service-cidr", action="append", metavar="CIDR",
                   help="Service CIDR; unused addresses in it are dropped (repeatable; default: the cluster's, "
                        "from the store, else 10.96.0.0/12; a different one is a warning)")
    p.add_argument("--service-proxy", choices=("nftables", "iptables", "ebpf"), default="nftables",
                   help="Service dataplane: podnet's nftables maps, kube-proxy's iptables layout for hosts "
                        "without nftables, or eBPF programs on tc at the pods' interfaces (nftables while "
                        "they do not load; docs/ebpf.md) (default %(default)s)")
    p.add_argument("--cgroup-root", metavar="DIR",
                   help="--service-proxy ebpf: the cgroup2 directory whose processes' sockets to Services are "
                        "balanced (the node's own traffic; only sockets of the agent's network namespace) "
                        "(default: the cgroup2 mount found in /proc/self/mountinfo)")
    p.add_argument("--policy-dataplane", choices=("nftables", "ebpf"), default="nftables",
                   help="NetworkPolicy dataplane: podnet's nftables table on the forward hook, or eBPF programs "
                        "on tc at the pods' interfaces with maps from the same compiled state (needs --service-proxy "
                        "ebpf; docs/ebpf.md) (default %(default)s)")
    p.add_argument("--conntrack-max-per-core", type=int, default=0, metavar="N",
                   help="raise nf_conntrack_max to max(N x cores, --conntrack-min) at start, as kube-proxy "
                        "(0: leave it alone; default %(default)s)")
    p.add_argument("--conntrack-min", type=int, default=131072, metavar="N", help="(default %(default)s)")
    p.add_argument("--dns-address", default=NODE_DNS_ADDRESS,
                   help="node-local DNS address (default %(default)s; empty to run no DNS server)")
    p.add_argument("--cluster-dns-ip", action="append", default=[], metavar="IP",
                   help="also answer DNS on this address, e.g. the kube-dns ClusterIP (repeatable)")
    p.add_argument("--dns-server", choices=("inprocess", "separate"), default="inprocess",
                   help="inprocess: the agent answers node DNS itself; separate: it keeps the DNS addresses on lo "
                        "and their NOTRACK rules, and a `podnet dns serve` process answers, also while the agent "
                        "is down (default %(default)s)")
    p.add_argument("--dns-upstream", action="append", default=[], metavar="IP[:PORT]",
                   help="resolver for names outside the cluster domain (repeatable)")
    p.add_argument("--cluster-domain", default=None,
                   help="default: the cluster's, from the store, else cluster.local")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (/metrics), /healthz and /readyz on this port")
    p.add_argument("--metrics-address", default=None, metavar="IP",
                   help="address of the metrics listener (default: the node's address; 0.0.0.0 listens on every "
                        "address, only when given here)")
    p.add_argument("--metrics-kube-proxy-names", action="store_true",
                   help="expose the Service proxy's sync metrics under kube-proxy's names "
                        "(kubeproxy_sync_proxy_rules_duration_seconds, ...) for dashboards built for kube-proxy")
    p.add_argument("--instance-id", default=None,
                   help="ENI pools: this node's cloud instance (default: from the Node's spec.providerID)")
    p.add_argument("--cloud-endpoint", default=None, metavar="URL",
                   help="ENI pools: the EC2 API endpoint (default: the CloudNetwork's, else AWS's)")
    p.add_argument("--pod-wait", type=float, default=0.0, metavar="SECONDS",
                   help="a CNI ADD for a Pod not yet in the store waits for it this long, then answers 'try again' "
                        "(with the Kubernetes API as the source: kube-sync may be an event behind; default 0: no wait)")
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="neither write the restart snapshot (<socket>.snapshot) at a clean stop nor start from one: "
                        "every start lists the store")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_agent)


def _dns_upstream(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, 53)
    except ValueError as e:
        raise PodnetError(f"--dns-upstream {e}") from None


def cmd_agent(args: argparse.Namespace) -> int:
    from podnet.agent.daemon import AgentConfig, run_agent
    from podnet.cli.common import store_credentials
    from podnet.cluster import agent_settings
    from podnet.policy.ebpf import combination_error
    from podnet.services.conntrack import ConntrackSizing
    from podnet.store import open_store

    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(),
        format=f"%(asctime)s {args.node} %(levelname)s %(name)s: %(message)s",
    )
    if args.policy_dataplane == "ebpf" and (error := combination_error(args.service_proxy, "--policy-dataplane",
                                                                       "--service-proxy")):
        raise PodnetError(error)
    # The cluster's settings, as `podnet apply` used them; the flags override them on this node.
    creds = store_credentials(args)
    with open_store(args.store, create=False, credentials=creds) as kv:
        service_cidrs, cluster_domain = agent_settings(kv, args.service_cidr, args.cluster_domain,
                                                       logging.getLogger("podnet.agent").warning)
    cfg = AgentConfig(node=args.node, store_url=args.store, store_credentials=creds, socket=args.socket,
                      pod_wait=args.pod_wait,
                      node_ip=args.node_ip,
                      resync_interval=args.resync,
                      service_cidrs=service_cidrs, service_proxy=args.service_proxy, cgroup_root=args.cgroup_root,
                      policy_dataplane=args.policy_dataplane,
                      conntrack=ConntrackSizing(args.conntrack_max_per_core, args.conntrack_min),
                      dns_address=args.dns_address or None, cluster_dns_ips=tuple(args.cluster_dns_ip),
                      dns_server=args.dns_server,
                      dns_upstreams=[_dns_upstream(u) for u in args.dns_upstream],
                      cluster_domain=cluster_domain, metrics_port=args.metrics_port,
                      metrics_address=args.metrics_address, metrics_kube_proxy_names=args.metrics_kube_proxy_names,
                      cloud_instance_id=args.instance_id, cloud_endpoint=args.cloud_endpoint,
                      snapshot=args.snapshot)
    return run_agent(cfg)
