"""The store connections the commands use, and store faults answered as CNI code 11.

A KeyValueStore (and the IPAM over it) serves one thread: Sessions lends each concurrent
request its own pair, opening more on the agent's store URL as needed, and never onto a
store file that replaced the one the agent opened. store_call wraps one store call so that
an unavailable store, or one that changed under a request, becomes "try again later".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from podnet.cni.errors import CNIError
from podnet.cni.spec import E_TRY_AGAIN
from podnet.store.base import AlreadyExists, Conflict, KeyValueStore, NotFound, StoreError, StoreUnavailable


class Sessions:
    """A store connection and an IPAM per concurrent request.

    A KeyValueStore (and an IPAM) is for one thread: each request borrows an idle pair, or
    opens one more on the same store URL. A store without a URL is shared under a lock.
    """

    def __init__(self, kv: KeyValueStore, ipam_factory: Callable[[KeyValueStore], Any]):
        self._kv = kv
        self._factory = ipam_factory
        self._idle: list[tuple[KeyValueStore, Any]] = [(kv, ipam_factory(kv))]
        self._opened: list[KeyValueStore] = []
        self._lock = threading.Lock()
        self._shared = threading.Lock()
        self._url = getattr(kv, "url", None)

    @contextlib.contextmanager
    def session(self) -> Iterator[tuple[KeyValueStore, Any]]:
        if not self._url:
            with self._shared:
                yield self._idle[0]
            return
        with self._lock:
            pair = self._idle.pop() if self._idle else None
        if pair is None:
            kv = self._open()
            pair = (kv, self._factory(kv))
            with self._lock:
                self._opened.append(kv)
        try:
            yield pair
        finally:
            with self._lock:
                self._idle.append(pair)

    def _open(self) -> KeyValueStore:
        """One more connection to the store the agent started with, never to a new file at its
        path (the store was deleted or replaced): ADDs would then split between two stores."""
        from podnet.store import reopen

        try:
            kv = reopen(self._kv)
        except StoreError as e:
            raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None
        if getattr(kv, "file_id", None) != getattr(self._kv, "file_id", None):
            kv.close()
            raise CNIError(E_TRY_AGAIN, f"store unavailable: store {self._url} was replaced after the agent "
                           "opened it: refusing to use either copy (restart the agent to use the new one)")
        return kv

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
            self._idle = [p for p in self._idle if p[0] is self._kv]
        for kv in opened:
            with contextlib.suppress(Exception):
                kv.close()


def store_call(fn: Callable[[], Any]) -> Any:
    """A store call; an unavailable store, or one that changed under us, is a reason to try again later."""
    try:
        return fn()
    except StoreUnavailable as e:
        raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None
    except (Conflict, AlreadyExists, NotFound) as e:
        raise CNIError(E_TRY_AGAIN, f"store changed concurrently: {e}") from None
