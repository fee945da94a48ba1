"""The store: the only shared state. A revisioned key-value interface with two backends."""

from podnet.store.base import (
    AlreadyExists,
    Compacted,
    Conflict,
    Event,
    KeyValueStore,
    NotFound,
    Op,
    Record,
    StoreError,
    StoreUnavailable,
)
from podnet.store.url import DEFAULT_STORE_URL, open_store, reopen

__all__ = [
    "AlreadyExists", "Compacted", "Conflict", "DEFAULT_STORE_URL", "Event", "KeyValueStore", "NotFound",
    "Op", "Record", "StoreError", "StoreUnavailable", "open_store", "reopen",
]
