"""Choosing a backend from a URL: sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...]."""

from __future__ import annotations

import os

from podnet.errors import PodnetError
from podnet.store.base import KeyValueStore

DEFAULT_STORE_URL = "sqlite:///var/lib/podnet/podnet.db"


def store_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("PODNET_STORE") or DEFAULT_STORE_URL


def open_store(url: str | None = None, *, create: bool = True) -> KeyValueStore:
    """The store at url. create=False: a SQLite store whose file does not exist is an error
    (StoreUnavailable), not a new empty store: only `podnet apply` and `lab up` make one."""
    url = store_url(url)
    if url.startswith("sqlite://"):
        from podnet.store.sqlite import SQLiteStore

        path = url[len("sqlite://"):]
        if not path or path == "/":
            raise PodnetError(f"store URL {url!r} has no path: expected sqlite:///PATH")
        return SQLiteStore(path, create=create)
    if url.startswith("etcd://"):
        from podnet.store.etcd import EtcdStore

        endpoints = [e for e in url[len("etcd://"):].rstrip("/").split(",") if e]
        if not endpoints:
            raise PodnetError(f"store URL {url!r} names no endpoint: expected etcd://HOST:PORT[,HOST:PORT...]")
        return EtcdStore(endpoints)
    raise PodnetError(f"unknown store URL {url!r}: expected sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...]")
