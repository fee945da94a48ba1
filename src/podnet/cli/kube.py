"""`podnet kube-sync`: reflect the Kubernetes API into podnet's store (one active replica,
elected with a Lease); see podnet.kube.sync."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kube-sync", help="reflect the Kubernetes API into podnet's store (the store stays the "
                                         "fan-out to every node's agent)")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, else the Pod's service account, else ~/.kube/config")
    p.add_argument("--context", help="the kubeconfig context (default: its current one)")
    p.add_argument("--identity", default=None,
                   help="this replica's name in the Lease (default: $POD_NAME, else host name and pid)")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "kube-system"),
                   help="namespace of the Lease (default: $POD_NAMESPACE, else %(default)s)")
    p.add_argument("--lease-name", default="podnet-kube-sync")
    p.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default %(default)s)")
    p.add_argument("--renew-deadline", type=float, default=10.0, help="seconds (default %(default)s)")
    p.add_argument("--retry-period", type=float, default=2.0, help="seconds (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="writes per store transaction (etcd takes 128 by default; default %(default)s)")
    p.add_argument("--no-write-back", action="store_true",
                   help="write nothing to the API server (no Events, status conditions or Node conditions)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_kube_sync)


def cmd_kube_sync(args: argparse.Namespace) -> int:
    from podnet.cli.common import kv_from_args
    from podnet.kube.client import KubeClient, KubeConfig
    from podnet.kube.sync import KubeSync, KubeSyncConfig

    identity = args.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s kube-sync {identity} %(levelname)s: %(message)s")
    client = KubeClient(KubeConfig.load(args.kubeconfig, args.context), user_agent=f"podnet-kube-sync/{identity}")
    kv_from_args(args).close()  # the store must exist: an error here is one line, before any campaign
    cfg = KubeSyncConfig(identity=identity, lease_namespace=args.lease_namespace, lease_name=args.lease_name,
                         lease_duration=args.lease_duration, renew_deadline=args.renew_deadline,
                         retry=args.retry_period, batch_size=args.batch_size, write_back=not args.no_write_back)
    sync = KubeSync(client, lambda: kv_from_args(args), cfg)
    signal.signal(signal.SIGTERM, sync.stop)
    signal.signal(signal.SIGINT, sync.stop)
    sync.run()
    if sync.stopping.is_set():
        return 0
    logging.getLogger("podnet.kube").error("no longer leading: exiting so that this replica starts over")
    return 1
