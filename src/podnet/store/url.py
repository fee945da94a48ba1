"""Choosing a backend from a URL: sqlite:///PATH, etcd://HOST:PORT[,HOST:PORT...] (plain
HTTP) or etcds://HOST:PORT[,HOST:PORT...] (TLS).

An etcd URL may start with USER[:PASSWORD]@ (percent-encoded, as in any URL), and its
endpoints may be written as etcdctl's --endpoints has them: etcd://https://h1:2379,https://h2:2379
is the same store as etcds://h1:2379,h2:2379. TLS files and credentials not in the URL
come from the caller or the environment (podnet.store.credentials).
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from podnet.errors import PodnetError
from podnet.store.base import KeyValueStore
from podnet.store.credentials import EtcdCredentials, credentials, from_env

DEFAULT_STORE_URL = "sqlite:///var/lib/podnet/podnet.db"
# etcd:// is plain HTTP unless its endpoints say https:// (etcdctl's form); etcds:// is TLS.
ETCD_SCHEMES: dict[str, bool | None] = {"etcd://": None, "etcds://": True}
URL_ORIGIN = "the store URL"
EXPECTED = "expected sqlite:///PATH, etcd://HOST:PORT[,HOST:PORT...] or etcds://HOST:PORT[,HOST:PORT...] (TLS)"

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^@]*)@")


def store_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("PODNET_STORE") or DEFAULT_STORE_URL


def redact(url: str) -> str:
    """The URL as errors may show it: a password in it replaced by ***."""
    m = _USERINFO.match(url)
    if m is None or ":" not in m.group(2):
        return url
    return f"{m.group(1)}{m.group(2).partition(':')[0]}:***@{url[m.end():]}"


def split_etcd_url(url: str) -> tuple[list[str], bool | None, EtcdCredentials]:
    """(endpoints, tls (None: as the endpoints say), the user and password the URL names) of an
    etcd:// or etcds:// URL."""
    scheme = next(s for s in ETCD_SCHEMES if url.startswith(s))
    rest = url[len(scheme):]
    userinfo = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")  # a password may hold an @; a host never does
    endpoints = [e.strip() for e in rest.rstrip("/").split(",") if e.strip()]
    if not endpoints:
        raise PodnetError(f"store URL {redact(url)!r} names no endpoint: {EXPECTED}")
    creds = EtcdCredentials()
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        values = {"user": unquote(user), "password": unquote(password) if colon else None}
        creds = credentials(values, dict.fromkeys(values, URL_ORIGIN))
    return endpoints, ETCD_SCHEMES[scheme], creds


def etcd_target(url: str, given: EtcdCredentials | None = None) -> tuple[str, list[str], bool, EtcdCredentials]:
    """(the URL without its user and password, endpoints, tls, credentials) of an etcd store URL:
    the URL's user and password over `given` (default: the environment's)."""
    from podnet.store.etcd import split_scheme

    endpoints, tls, from_url = split_etcd_url(url)
    schemes = {split_scheme(e)[0] for e in endpoints} - {None}
    if tls is None:
        tls = schemes == {"https"}
    elif schemes and schemes != {"https"}:
        raise PodnetError(f"store URL {redact(url)!r}: etcds:// is TLS, but its endpoints say {schemes.pop()}://")
    creds = from_url.over(given if given is not None else from_env()).checked()
    clean = ("etcds://" if tls else "etcd://") + ",".join(split_scheme(e)[1] for e in endpoints)
    return clean, endpoints, tls, creds


def is_etcd(url: str) -> bool:
    return url.startswith(tuple(ETCD_SCHEMES))


def open_store(url: str | None = None, *, create: bool = True,
               credentials: EtcdCredentials | None = None) -> KeyValueStore:
    """The store at url. create=False: a SQLite store whose file does not exist is an error
    (StoreUnavailable), not a new empty store: only `podnet apply` and `lab up` make one.
    credentials: TLS files, user and password for etcd (default: from the environment)."""
    url = store_url(url)
    if url.startswith("sqlite://"):
        from podnet.store.sqlite import SQLiteStore

        path = url[len("sqlite://"):]
        if not path or path == "/":
            raise PodnetError(f"store URL {url!r} has no path: expected sqlite:///PATH")
        return SQLiteStore(path, create=create)
    if is_etcd(url):
        from podnet.store.etcd import EtcdStore

        _, endpoints, tls, creds = etcd_target(url, credentials)
        return EtcdStore(endpoints, tls=tls, credentials=creds)
    hint = ": for etcd over TLS write etcds://HOST:PORT[,HOST:PORT...]" if url.startswith("https://") else ""
    raise PodnetError(f"unknown store URL {redact(url)!r}: {EXPECTED}{hint}")


def reopen(kv: KeyValueStore, *, create: bool = False) -> KeyValueStore:
    """Another client of the store `kv` is a client of, with the same credentials."""
    from podnet.store.etcd import EtcdStore

    if isinstance(kv, EtcdStore):
        return kv.clone()
    return open_store(kv.url, create=create, credentials=getattr(kv, "credentials", None))
