"""The three PATCH bodies the Kubernetes API takes, as the fake API server applies them.

    json_patch(doc, ops)                RFC 6902 (application/json-patch+json)
    merge_patch(doc, patch)             RFC 7386 (application/merge-patch+json)
    strategic_merge_patch(doc, patch)   application/strategic-merge-patch+json, built-in kinds

The strategic merge patch covers what kubectl's client-side apply and `kubectl patch`
send for the kinds podnet reads: maps merge, null deletes, lists of objects with a merge
key merge by it (containers by name, container ports by containerPort, Service ports by
port, conditions and node addresses by type, ...), other lists are replaced, and the
directives $patch (replace, delete, merge), $retainKeys, $setElementOrder/<list> and
$deleteFromPrimitiveList/<list>.
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    pass


# ---------------------------------------------------------------- RFC 6902


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    cur = doc
    for p in parts[:-1]:
        cur = _child(cur, p)
    return cur, parts[-1]


def _child(cur: Any, p: str) -> Any:
    if isinstance(cur, dict):
        if p not in cur:
            raise PatchError(f"path element {p!r} does not exist")
        return cur[p]
    if isinstance(cur, list):
        try:
            return cur[int(p)]
        except (ValueError, IndexError):
            raise PatchError(f"list index {p!r} out of range") from None
    raise PatchError(f"cannot descend into a {type(cur).__name__} at {p!r}")


def _get(doc: Any, path: str) -> Any:
    cur = doc
    for p in _pointer(path):
        cur = _child(cur, p)
    return cur


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent, last = _parent(doc, parts)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            i = int(last)
            if not 0 <= i <= len(parent):
                raise PatchError(f"list index {i} out of range")
            parent.insert(i, value)
    else:
        raise PatchError(f"cannot add to a {type(parent).__name__}")
    return doc


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent, last = _parent(doc, parts)
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"cannot remove {path}: it does not exist")
        del parent[last]
    elif isinstance(parent, list):
        try:
            del parent[int(last)]
        except (ValueError, IndexError):
            raise PatchError(f"cannot remove {path}: out of range") from None
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = _add(_remove(doc, path), path, copy.deepcopy(op.get("value"))) if _pointer(path) else op.get("value")
        elif kind == "move":
            value = _get(doc, op["from"])
            doc = _add(_remove(doc, op["from"]), path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"test operation failed at {path}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


# ---------------------------------------------------------------- RFC 7386


def merge_patch(doc: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ---------------------------------------------------------------- strategic merge patch

# The merge key of lists of objects, by the last two fields of their path ("" for the
# parent when the list hangs off the top of a spec/status/metadata).
MERGE_KEYS: dict[tuple[str, str], str] = {
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "ephemeralContainers"): "name",
    ("spec", "volumes"): "name",
    ("spec", "imagePullSecrets"): "name",
    ("spec", "hostAliases"): "ip",
    ("containers", "ports"): "containerPort",
    ("initContainers", "ports"): "containerPort",
    ("containers", "env"): "name",
    ("initContainers", "env"): "name",
    ("containers", "volumeMounts"): "mountPath",
    ("initContainers", "volumeMounts"): "mountPath",
    ("spec", "ports"): "port",  # Service ports
    ("status", "conditions"): "type",
    ("status", "addresses"): "type",
    ("metadata", "ownerReferences"): "uid",
}
# Lists of scalars merged as sets rather than replaced.
MERGED_SCALAR_LISTS = {("metadata", "finalizers")}

_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"


def strategic_merge_patch(doc: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        raise PatchError("a strategic merge patch is a JSON object")
    return _smp_map(copy.deepcopy(doc) if isinstance(doc, dict) else {}, patch, ())


def _smp_map(doc: dict, patch: dict, path: tuple[str, ...]) -> dict:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    retain = patch.get("$retainKeys")
    orders: dict[str, list] = {}
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys"):
            continue
        if k.startswith(_ORDER):
            orders[k[len(_ORDER):]] = v
            continue
        if k.startswith(_DELETE_PRIMITIVE):
            field = k[len(_DELETE_PRIMITIVE):]
            if isinstance(doc.get(field), list):
                doc[field] = [x for x in doc[field] if x not in v]
            continue
        if v is None:
            doc.pop(k, None)
            continue
        here = (*path, k)
        if isinstance(v, dict):
            doc[k] = _smp_map(doc[k] if isinstance(doc.get(k), dict) else {}, v, here)
        elif isinstance(v, list):
            doc[k] = _smp_list(doc.get(k) if isinstance(doc.get(k), list) else [], v, here)
        else:
            doc[k] = v
    for field, order in orders.items():
        if isinstance(doc.get(field), list):
            doc[field] = _reorder(doc[field], order, _merge_key((*path, field)))
    if isinstance(retain, list):
        doc = {k: v for k, v in doc.items() if k in retain}
    return doc


def _merge_key(path: tuple[str, ...]) -> str | None:
    if len(path) < 2:
        return None
    return MERGE_KEYS.get((path[-2], path[-1]))


def _smp_list(doc: list, patch: list, path: tuple[str, ...]) -> list:
    key = _merge_key(path)
    if key is None:
        if len(path) >= 2 and (path[-2], path[-1]) in MERGED_SCALAR_LISTS:
            return doc + [x for x in patch if x not in doc]
        return [x for x in patch if not (isinstance(x, dict) and x.get("$patch"))]
    out = list(doc)
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"{'.'.join(path)}: expected objects with the merge key {key!r}")
        if item.get("$patch") == "replace":
            return [x for x in patch if x.get("$patch") != "replace"]
        if key not in item:
            raise PatchError(f"{'.'.join(path)}: an element lacks the merge key {key!r}")
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
            continue
        if idx is None:
            out.append(_smp_map({}, item, path))
        else:
            out[idx] = _smp_map(out[idx], item, path)
    return out


def _reorder(items: list, order: list, key: str | None) -> list:
    def ident(x: Any) -> Any:
        return x.get(key) if key and isinstance(x, dict) else x

    if not all(isinstance(o, dict | str | int | float) for o in order):
        return items
    wanted = [o.get(key) if key and isinstance(o, dict) else o for o in order]
    rank = {w: i for i, w in enumerate(wanted) if not isinstance(w, dict)}
    return sorted(items, key=lambda x: rank.get(ident(x), len(rank)))
