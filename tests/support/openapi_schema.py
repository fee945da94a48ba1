"""A CustomResourceDefinition's structural OpenAPI v3 schema applied to an object, as the API
server applies it: unknown fields pruned (or reported, for fieldValidation=Strict), then the
value validated. Used by the fake API server for custom resources and by the tests of
podnet's CRDs (deploy/crds.yaml).

Keywords: type, properties, additionalProperties, items, required, enum, pattern,
minimum/maximum (and exclusive), minLength/maxLength, minItems/maxItems, uniqueItems,
nullable, format (int32, int64, ipv4, ipv6, cidr), anyOf/oneOf/allOf/not, and the
extensions x-kubernetes-int-or-string, x-kubernetes-preserve-unknown-fields and
x-kubernetes-list-type (set, map with x-kubernetes-list-map-keys). CEL rules
(x-kubernetes-validations) are not evaluated here: a real API server does.

Errors read like the API server's: `spec.blockSize: Invalid value: 40: spec.blockSize in
body should be less than or equal to 32`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SchemaError:
    field: str
    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueNotSupported, FieldValueTypeInvalid
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool,
}


def _type_ok(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES.get(t, object))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def prune(value: Any, schema: dict | None, path: str = "") -> tuple[Any, list[str]]:
    """The value without the fields the schema does not define; the paths of those fields.
    metadata at the top is left to the caller (the API server treats it apart)."""
    if schema is None or not isinstance(schema, dict):
        return value, []
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return value, []
    unknown: list[str] = []
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema
                                    or "additionalProperties" in schema):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            if not path and k in ("apiVersion", "kind", "metadata"):
                out[k] = v
            elif k in props:
                out[k], more = prune(v, props[k], _join(path, k))
                unknown += more
            elif isinstance(extra, dict):
                out[k], more = prune(v, extra, _join(path, k))
                unknown += more
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                out[k] = v
            else:
                unknown.append(_join(path, k))
        return out, unknown
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        out_list = []
        for i, v in enumerate(value):
            pv, more = prune(v, schema["items"], f"{path}[{i}]")
            out_list.append(pv)
            unknown += more
        return out_list, unknown
    return value, []


def validate(value: Any, schema: dict | None, path: str = "") -> list[SchemaError]:
    if not isinstance(schema, dict):
        return []
    errors: list[SchemaError] = []
    shown = path or "<root>"
    if value is None:
        if schema.get("nullable"):
            return []
        if schema.get("type") or schema.get("x-kubernetes-int-or-string"):
            t = "string or integer" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
            return [SchemaError(shown, "FieldValueTypeInvalid",
                                f'Invalid value: "null": {shown} in body must be of type {t}: "null"')]
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
            return [SchemaError(shown, "FieldValueTypeInvalid",
                                f'Invalid value: "{_type_name(value)}": {shown} in body must be of type '
                                f'integer,string: "{_type_name(value)}"')]
    t = schema.get("type")
    if t and value is not None and not _type_ok(value, t):
        return [SchemaError(shown, "FieldValueTypeInvalid",
                            f'Invalid value: "{_type_name(value)}": {shown} in body must be of type {t}: '
                            f'"{_type_name(value)}"')]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{e}"' if isinstance(e, str) else str(e) for e in schema["enum"])
        errors.append(SchemaError(shown, "FieldValueNotSupported",
                                  f"Unsupported value: {_show(value)}: supported values: {allowed}"))
    if isinstance(value, str):
        errors += _string(value, schema, shown)
    if isinstance(value, int | float) and not isinstance(value, bool):
        errors += _number(value, schema, shown)
    if isinstance(value, list):
        errors += _array(value, schema, path, shown)
    if isinstance(value, dict):
        errors += _object(value, schema, path)
    for sub in schema.get("allOf") or ():
        errors += validate(value, sub, path)
    if schema.get("anyOf") and not any(not validate(value, s, path) for s in schema["anyOf"]):
        errors.append(SchemaError(shown, "FieldValueInvalid", f"Invalid value: {_show(value)}: {shown} in body "
                                  "must match at least one schema in anyOf"))
    if schema.get("oneOf") and sum(not validate(value, s, path) for s in schema["oneOf"]) != 1:
        errors.append(SchemaError(shown, "FieldValueInvalid", f"Invalid value: {_show(value)}: {shown} in body "
                                  "must match exactly one schema in oneOf"))
    if isinstance(schema.get("not"), dict) and not validate(value, schema["not"], path):
        errors.append(SchemaError(shown, "FieldValueInvalid", f"Invalid value: {_show(value)}: {shown} in body "
                                  "must not validate the schema (not)"))
    return errors


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _format_ok(value: str, fmt: str) -> bool:
    try:
        if fmt == "ipv4":
            ipaddress.IPv4Address(value)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(value)
        elif fmt == "cidr":
            ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _string(value: str, schema: dict, shown: str) -> list[SchemaError]:
    errors = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(SchemaError(shown, "FieldValueTooLong", f"Too long: may not be more than "
                                  f"{schema['maxLength']} bytes"))
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(SchemaError(shown, "FieldValueInvalid", f'Invalid value: "{value}": {shown} in body should '
                                  f"be at least {schema['minLength']} chars long"))
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(SchemaError(shown, "FieldValueInvalid", f'Invalid value: "{value}": {shown} in body should '
                                  f"match '{schema['pattern']}'"))
    fmt = schema.get("format")
    if fmt in ("ipv4", "ipv6", "cidr") and not _format_ok(value, fmt):
        errors.append(SchemaError(shown, "FieldValueInvalid", f'Invalid value: "{value}": {shown} in body must be '
                                  f"of type {fmt}: \"{value}\""))
    return errors


def _number(value: float, schema: dict, shown: str) -> list[SchemaError]:
    errors = []
    if "maximum" in schema:
        excl = schema.get("exclusiveMaximum") is True
        if value > schema["maximum"] or (excl and value == schema["maximum"]):
            rel = "less than" if excl else "less than or equal to"
            errors.append(SchemaError(shown, "FieldValueInvalid", f"Invalid value: {value}: {shown} in body should be "
                                      f"{rel} {schema['maximum']}"))
    if "minimum" in schema:
        excl = schema.get("exclusiveMinimum") is True
        if value < schema["minimum"] or (excl and value == schema["minimum"]):
            rel = "greater than" if excl else "greater than or equal to"
            errors.append(SchemaError(shown, "FieldValueInvalid", f"Invalid value: {value}: {shown} in body should be "
                                      f"{rel} {schema['minimum']}"))
    return errors


def _array(value: list, schema: dict, path: str, shown: str) -> list[SchemaError]:
    errors = []
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(SchemaError(shown, "FieldValueTooMany", f"Too many: {len(value)}: must have at most "
                                  f"{schema['maxItems']} items"))
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(SchemaError(shown, "FieldValueInvalid", f"Invalid value: {len(value)}: {shown} in body should "
                                  f"have at least {schema['minItems']} items"))
    list_type = schema.get("x-kubernetes-list-type")
    if schema.get("uniqueItems") or list_type == "set":
        seen: list = []
        for i, v in enumerate(value):
            if v in seen:
                errors.append(SchemaError(f"{path}[{i}]", "FieldValueDuplicate", f"Duplicate value: {_show(v)}"))
            seen.append(v)
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys: set = set()
        for i, v in enumerate(value):
            if isinstance(v, dict):
                k = tuple(v.get(x) for x in keys)
                if k in seen_keys:
                    errors.append(SchemaError(f"{path}[{i}]", "FieldValueDuplicate",
                                              f"Duplicate value: {dict(zip(keys, k, strict=True))}"))
                seen_keys.add(k)
    items = schema.get("items")
    if isinstance(items, dict):
        for i, v in enumerate(value):
            errors += validate(v, items, f"{path}[{i}]")
    return errors


def _object(value: dict, schema: dict, path: str) -> list[SchemaError]:
    errors = []
    for req in schema.get("required") or ():
        if req not in value:
            errors.append(SchemaError(_join(path, req), "FieldValueRequired", "Required value"))
    props = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    for k, v in value.items():
        if not path and k in ("apiVersion", "kind", "metadata"):
            continue
        if k in props:
            errors += validate(v, props[k], _join(path, k))
        elif isinstance(extra, dict):
            errors += validate(v, extra, _join(path, k))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(SchemaError(path or "<root>", "FieldValueTooMany",
                                  f"Too many: {len(value)}: must have at most {schema['maxProperties']} items"))
    return errors


def check(obj: dict, schema: dict, strict: bool = False) -> tuple[dict, list[str], list[SchemaError]]:
    """(the pruned object, the unknown fields found, the validation errors). strict: unknown
    fields are errors too (fieldValidation=Strict)."""
    pruned, unknown = prune(obj, schema)
    errors = validate(pruned, schema)
    if strict:
        errors = [SchemaError(u, "FieldValueInvalid", f'unknown field "{u}"') for u in unknown] + errors
    return pruned, unknown, errors
