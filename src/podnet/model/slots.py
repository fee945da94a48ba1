"""How the agent's slotted records pickle (its restart snapshot, agent/snapshot.py).

Python pickles an object with __slots__ as copyreg.__newobj__((cls,)) plus a state of
(None, {slot: value}): three more objects per record, which the unpickler keeps (in its
memo) until the whole load is done and then frees at once. At 5 000 nodes (~400 000
records) that left ~130 MiB of free holes in a restarted agent's heap (bench_cluster:
RSS 432 MiB after a restart against 290 after a list). A record here pickles as one
call with its slot values as the arguments: one tuple per record.
"""

from __future__ import annotations

from typing import Any


class _Unset:
    """A slot that was never set (pickled by name: one object in every process)."""

    def __reduce__(self) -> str:
        return "UNSET"


UNSET = _Unset()
_SETTERS: dict[type, tuple[tuple[str, Any], ...]] = {}  # class -> (slot name, its descriptor's __set__)


def _setters(cls: type) -> tuple[tuple[str, Any], ...]:
    found = _SETTERS.get(cls)
    if found is None:
        names = [name for klass in reversed(cls.__mro__) for name in klass.__dict__.get("__slots__", ())]
        found = _SETTERS[cls] = tuple((name, getattr(cls, name).__set__) for name in names)
    return found


def rebuild(cls: type, *values: object) -> object:
    obj = cls.__new__(cls)
    for (_, setter), value in zip(_setters(cls), values):  # noqa: B905 - as many as __reduce__ gave
        if value is not UNSET:
            setter(obj, value)
    return obj


class PickledBySlots:
    """A base for slotted records: pickles as rebuild(cls, *slot values)."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return rebuild, (type(self), *[getattr(self, name, UNSET) for name, _ in _setters(type(self))])
