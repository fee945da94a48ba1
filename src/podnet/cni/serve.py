"""A CNI server alone: pod interfaces and IPAM, without the agent's routing sync.

For measuring and testing the CNI path on one node by itself:

    python -m podnet.cni.serve SOCKET STORE_URL NODE [--mtu 1500] [--log-level warning]

Prints "ready" once the socket accepts requests; stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from podnet.cni.handler import CNIHandler
from podnet.cni.server import CNIServer
from podnet.dataplane.pods import PodDataplane
from podnet.store import credentials, open_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m podnet.cni.serve", description=__doc__.splitlines()[0])
    ap.add_argument("socket")
    ap.add_argument("store_url")
    ap.add_argument("node")
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--log-level", default="warning")
    credentials.add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    dataplane = PodDataplane(args.mtu)
    handler = CNIHandler(open_store(args.store_url, create=False, credentials=credentials.from_args(args)), args.node,
                         dataplane)
    server = CNIServer(args.socket, handler).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop()
    handler.close()
    dataplane.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
