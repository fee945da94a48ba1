"""Helpers shared by CLI command modules."""

from __future__ import annotations

import argparse

from podnet.store import open_store
from podnet.store.base import KeyValueStore
from podnet.store.objects import ObjectStore


def kv_from_args(args: argparse.Namespace) -> KeyValueStore:
    return open_store(getattr(args, "store", None))


def objects_from_args(args: argparse.Namespace) -> ObjectStore:
    return ObjectStore(kv_from_args(args))
