"""Reading multi-document YAML manifests into validated objects.

Every problem is reported with the file, the document index (0-based, as
`kubectl` counts), the object it belongs to and the field path, and loading is
all-or-nothing: one bad document fails the whole set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from podnet.errors import ValidationError
from podnet.model.objects import KINDS, KubeObject

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# The API server's (etcd's) limit on one object; larger ones never reach the store.
MAX_OBJECT_BYTES = 3 * 512 * 1024  # 1.5 MiB


@dataclass(frozen=True)
class Source:
    file: str
    index: int

    def describe(self, obj: dict | None = None) -> str:
        text = f"{self.file}: document {self.index}"
        if isinstance(obj, dict):
            kind = obj.get("kind") or "?"
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            name = meta.get("name") or "?"
            ns = meta.get("namespace")
            text += f" ({kind}/{ns}/{name})" if ns else f" ({kind}/{name})"
        return text


def locate(err: ValidationError, sources: dict[str, Source]) -> ValidationError:
    """The same error, naming the file and document of the object it is about."""
    src = sources.get(err.where)
    if src is None:
        return err
    return ValidationError(err.detail, where=f"{src.file}: document {src.index} ({err.where})", field=err.field)


class ManifestErrors(ValidationError):
    """Several validation errors at once; str() gives one line per error."""

    def __init__(self, errors: list[ValidationError]):
        self.errors = errors
        Exception.__init__(self, "\n".join(str(e) for e in errors))


def manifest_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in MANIFEST_SUFFIXES and f.is_file())
        if not files:
            raise ValidationError(f"no manifest files (*.yaml, *.yml, *.json) in directory {p}")
        return files
    if not p.exists():
        raise ValidationError(f"{p}: no such file or directory")
    return [p]


def read_text(path: Path) -> str:
    """A manifest file's text; ValidationError naming the file (and where) if it cannot be
    read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValidationError(f"cannot read: {e.strerror}", where=str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValidationError(f"not valid UTF-8 (byte 0x{data[e.start]:02x}): manifests must be UTF-8 text",
                              where=f"{path}:{line}:{column}") from None


def load_paths(paths: list[str | Path], sources: dict[str, Source] | None = None) -> list[KubeObject]:
    """Load every document of every file; raise ManifestErrors listing all problems.

    sources: if given, filled with object ref -> Source (file and document index),
    so that later checks can name the file of the object they reject."""
    objects: list[KubeObject] = []
    errors: list[ValidationError] = []
    for path in paths:
        for f in manifest_files(path):
            try:
                text = read_text(f)
            except ValidationError as e:
                errors.append(e)
                continue
            objs, errs = parse_documents(text, str(f), sources)
            objects.extend(objs)
            errors.extend(errs)
    if not errors:
        errors.extend(_duplicates(objects))
    if errors:
        raise ManifestErrors(errors)
    return objects


def parse_documents(text: str, file: str = "<stdin>", sources: dict[str, Source] | None = None,
                    ) -> tuple[list[KubeObject], list[ValidationError]]:
    objects: list[KubeObject] = []
    errors: list[ValidationError] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        return [], [ValidationError(f"not valid YAML: {problem}", where=where)]
    index = -1
    for doc in docs:
        index += 1
        if doc is None:  # empty document between '---' separators
            continue
        src = Source(file, index)
        for item in _expand_lists(doc):
            try:
                obj = parse_object(item, src)
                objects.append(obj)
                if sources is not None:
                    sources.setdefault(obj.ref, src)
            except ValidationError as e:
                errors.append(e)
    return objects, errors


def _expand_lists(doc: Any) -> list[Any]:
    # `kind: List` documents, as `kubectl get -o yaml` writes them.
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        return doc["items"]
    return [doc]


def parse_object(doc: Any, src: Source) -> KubeObject:
    if not isinstance(doc, dict):
        raise ValidationError(f"expected a mapping with apiVersion, kind and metadata, got {type(doc).__name__}",
                              where=src.describe())
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValidationError("missing kind", where=src.describe(doc), field="kind")
    cls = KINDS.get(kind)
    if cls is None:
        raise ValidationError(f"unknown kind {kind!r}: expected one of {', '.join(sorted(KINDS))}",
                              where=src.describe(doc), field="kind")
    if "apiVersion" not in doc:
        raise ValidationError(f"missing apiVersion: expected {' or '.join(cls.API_VERSIONS)}",
                              where=src.describe(doc), field="apiVersion")
    if not isinstance(doc.get("metadata"), dict):
        raise ValidationError("missing metadata (a mapping with at least a name)",
                              where=src.describe(doc), field="metadata")
    size = len(json.dumps(doc, separators=(",", ":"), default=str).encode())
    if size > MAX_OBJECT_BYTES:
        raise ValidationError(f"the object is {size} bytes as JSON: the limit is {MAX_OBJECT_BYTES} (1.5 MiB), "
                              "as the API server's", where=src.describe(doc))
    try:
        return cls.model_validate(doc)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise ValidationError(explain(err), where=src.describe(doc), field=field_path(err["loc"])) from None
    except ValueError as e:
        raise ValidationError(str(e), where=src.describe(doc)) from None


def field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "union[", "int", "str", "list[", "literal[")):
            continue  # pydantic's internal step names, not fields
        else:
            out += f".{part}" if out else str(part)
    return out


def explain(err: dict[str, Any]) -> str:
    """Turn a pydantic error into what a user needs: what was expected, what was given."""
    kind = err["type"]
    msg = err["msg"]
    given = err.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if msg.startswith(("Value error, ", "Assertion failed, ")):
        return msg.split(", ", 1)[1]
    shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
    return f"{msg[0].lower()}{msg[1:]} (got {shown})"


def _duplicates(objects: list[KubeObject]) -> list[ValidationError]:
    seen: set[str] = set()
    errors = []
    for o in objects:
        if o.ref in seen:
            errors.append(ValidationError("the same object appears twice in this manifest set", where=o.ref))
        seen.add(o.ref)
    return errors
