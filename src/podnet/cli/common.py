"""Helpers shared by CLI command modules."""

from __future__ import annotations

import argparse

from podnet.store import credentials, open_store
from podnet.store.base import KeyValueStore
from podnet.store.credentials import EtcdCredentials
from podnet.store.objects import ObjectStore


def kv_from_args(args: argparse.Namespace, *, create: bool = False) -> KeyValueStore:
    """The store the command names. Only `apply` creates a missing SQLite file (create=True):
    any other command refuses it, so a mistyped or deleted path never becomes a new empty
    store beside the one running agents use."""
    return open_store(getattr(args, "store", None), create=create, credentials=store_credentials(args))


def store_credentials(args: argparse.Namespace) -> EtcdCredentials:
    """etcd's TLS files, user and password: the global flags over the environment."""
    return credentials.from_args(args)


def objects_from_args(args: argparse.Namespace, *, create: bool = False) -> ObjectStore:
    return ObjectStore(kv_from_args(args, create=create))
