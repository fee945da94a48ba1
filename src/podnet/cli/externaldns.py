"""`podnet external-dns`: publish Services to a DNS server through RFC 2136 (ExternalDNS's
flags, for the service source, the TXT registry and the rfc2136 provider)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from podnet.errors import PodnetError

SECRET_ENV = "EXTERNAL_DNS_RFC2136_TSIG_SECRET"  # ExternalDNS reads every flag from EXTERNAL_DNS_<FLAG>


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("external-dns", help="publish Services to an external DNS server (RFC 2136, ExternalDNS-style)",
                       description="Keep records for the store's Services in zones of a DNS server, through "
                                   "TSIG-signed RFC 2136 updates, with ExternalDNS's TXT ownership records; "
                                   "every change is conditional on this owner holding the name.")
    p.add_argument("--source", action="append", choices=("service",), help="(only service; default service)")
    p.add_argument("--provider", default="rfc2136", choices=("rfc2136",), help="(default %(default)s)")
    p.add_argument("--registry", default="txt", choices=("txt",), help="(default %(default)s)")
    p.add_argument("--domain-filter", action="append", default=[], metavar="DOMAIN",
                   help="only names under this domain (repeatable or comma-separated; default: every name in the zones)")
    p.add_argument("--exclude-domains", action="append", default=[], metavar="DOMAIN",
                   help="never names under this domain (repeatable)")
    p.add_argument("--policy", default="sync", choices=("sync", "upsert-only", "create-only"),
                   help="sync: create, update, delete; upsert-only: never delete; create-only: never update or "
                        "delete (default %(default)s)")
    p.add_argument("--txt-owner-id", default="default", metavar="ID",
                   help="this controller's owner id in the TXT records (default %(default)s)")
    p.add_argument("--txt-prefix", default="", help="before the first label of the ownership TXT record's name "
                   "(%%{record_type} places the type)")
    p.add_argument("--txt-suffix", default="", help="after it (exclusive with --txt-prefix)")
    p.add_argument("--txt-wildcard-replacement", default="", metavar="LABEL",
                   help="the ownership record of *.name is named with this label in place of '*'")
    p.add_argument("--managed-record-types", action="append", default=[], metavar="TYPE",
                   help="record types managed (repeatable; default A, AAAA, CNAME; SRV adds NodePort SRV records)")
    p.add_argument("--publish-internal-services", action="store_true",
                   help="publish ClusterIP Services (their ClusterIP) too")
    p.add_argument("--service-type-filter", action="append", default=[], metavar="TYPE",
                   choices=("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"),
                   help="only Services of this type (repeatable; default all)")
    p.add_argument("--always-publish-not-ready-addresses", action="store_true",
                   help="headless Services: publish endpoints that are not ready too")
    p.add_argument("--exclude-unschedulable", action=argparse.BooleanOptionalAction, default=True,
                   help="NodePort Services: leave out unschedulable nodes (default yes)")
    p.add_argument("--rfc2136-host", required=True, metavar="HOST", help="the DNS server (primary of the zones)")
    p.add_argument("--rfc2136-port", type=int, default=53, help="(default %(default)s)")
    p.add_argument("--rfc2136-zone", action="append", default=[], metavar="ZONE", required=True,
                   help="a zone to publish into (repeatable)")
    p.add_argument("--rfc2136-insecure", action="store_true", help="send unsigned requests (no TSIG)")
    p.add_argument("--rfc2136-tsig-keyname", metavar="NAME", help="TSIG key name")
    p.add_argument("--rfc2136-tsig-secret", metavar="BASE64",
                   help=f"TSIG secret (or ${SECRET_ENV}, which keeps it off the process list)")
    p.add_argument("--rfc2136-tsig-secret-alg", default="hmac-sha256", metavar="ALG",
                   help="hmac-sha256 (default), hmac-sha512, hmac-sha384, hmac-sha224, hmac-sha1, hmac-md5")
    p.add_argument("--rfc2136-tsig-axfr", action="store_true",
                   help="accepted as ExternalDNS's flag: the zones are always read by AXFR")
    p.add_argument("--rfc2136-min-ttl", default="0s", metavar="DURATION",
                   help="lowest TTL written (default 0s; a record without a ttl annotation gets 300s)")
    p.add_argument("--rfc2136-batch-change-size", type=int, default=50, metavar="N",
                   help="changes per UPDATE message (default %(default)s)")
    p.add_argument("--rfc2136-timeout", default="10s", metavar="DURATION", help="per request (default 10s)")
    p.add_argument("--interval", default="1m", metavar="DURATION",
                   help="between full resyncs, each zone read afresh (default 1m)")
    p.add_argument("--min-event-sync-interval", default="5s", metavar="DURATION",
                   help="least time between syncs a store change starts (default 5s)")
    p.add_argument("--once", action="store_true", help="one full sync, then exit (status 1 if it failed)")
    p.add_argument("--dry-run", action="store_true", help="plan and log the changes, send none")
    p.add_argument("--status-file", type=Path, metavar="PATH",
                   help="write the outcome of every sync here as JSON (revision, changes, conflicts, problems)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_external_dns)


def _duration(text: str, flag: str) -> float:
    from podnet.externaldns.endpoint import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise PodnetError(f"{flag} {e}") from None


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def settings_from_args(args: argparse.Namespace):  # noqa: ANN201 - (Settings, ServerConfig, SourceOptions)
    from podnet.externaldns.controller import Settings
    from podnet.externaldns.plan import DomainFilter
    from podnet.externaldns.registry import NameMapper, check_owner_id
    from podnet.externaldns.rfc2136 import ServerConfig
    from podnet.externaldns.source import SourceOptions

    try:
        owner = check_owner_id(args.txt_owner_id)
    except ValueError as e:
        raise PodnetError(f"--txt-owner-id: {e}") from None
    try:
        mapper = NameMapper(args.txt_prefix, args.txt_suffix, args.txt_wildcard_replacement)
    except ValueError as e:
        raise PodnetError(str(e)) from None
    types = tuple(t.upper() for t in _split(args.managed_record_types)) or ("A", "AAAA", "CNAME")
    for t in types:
        if t not in ("A", "AAAA", "CNAME", "SRV"):
            raise PodnetError(f"--managed-record-types {t}: expected A, AAAA, CNAME or SRV")
    settings = Settings(
        owner_id=owner, policy=args.policy,
        domain_filter=DomainFilter(tuple(d.lower() for d in _split(args.domain_filter)),
                                   tuple(d.lower() for d in _split(args.exclude_domains))),
        managed_types=types, mapper=mapper,
        min_ttl=int(_duration(args.rfc2136_min_ttl, "--rfc2136-min-ttl")),
        interval=_duration(args.interval, "--interval"),
        min_event_sync_interval=_duration(args.min_event_sync_interval, "--min-event-sync-interval"),
        dry_run=args.dry_run)
    server = ServerConfig(host=args.rfc2136_host, port=args.rfc2136_port,
                          zones=tuple(_split(args.rfc2136_zone)), keyname=args.rfc2136_tsig_keyname,
                          secret=args.rfc2136_tsig_secret or os.environ.get(SECRET_ENV),
                          algorithm=args.rfc2136_tsig_secret_alg, insecure=args.rfc2136_insecure,
                          timeout=_duration(args.rfc2136_timeout, "--rfc2136-timeout") or 10.0,
                          batch_size=args.rfc2136_batch_change_size)
    options = SourceOptions(publish_internal=args.publish_internal_services,
                            service_types=frozenset(args.service_type_filter),
                            always_publish_not_ready=args.always_publish_not_ready_addresses,
                            exclude_unschedulable=args.exclude_unschedulable)
    return settings, server, options


def cmd_external_dns(args: argparse.Namespace) -> int:
    from podnet.externaldns.controller import run
    from podnet.externaldns.rfc2136 import RFC2136Provider
    from podnet.externaldns.source import ServiceSource

    settings, server, options = settings_from_args(args)
    provider = RFC2136Provider(server)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s external-dns %(levelname)s: %(message)s")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    return run(args.store, settings, provider, ServiceSource(options), once=args.once,
               status_file=args.status_file, stopping=stopping)
