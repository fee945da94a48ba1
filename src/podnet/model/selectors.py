"""Kubernetes label selectors (matchLabels + matchExpressions) and label syntax."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import field_validator, model_validator

from podnet.model.base import Schema

# Label keys: optional DNS-subdomain prefix (253 chars) + '/' + name (63 chars); values: 63 chars.
# Anchored with \A and \Z: `$` would also match before a final newline.
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)"
LABEL_KEY_RE = re.compile(rf"\A({_PREFIX}/)?{_NAME}\Z")
LABEL_VALUE_RE = re.compile(rf"\A({_NAME})?\Z")


def check_label_key(key: str) -> str:
    prefix = key.split("/", 1)[0] if "/" in key else ""
    if not LABEL_KEY_RE.fullmatch(key) or len(prefix) > 253:
        raise ValueError(
            f"invalid label key {key!r}: expected an optional DNS prefix and '/', then a name of "
            "at most 63 characters of letters, digits, '-', '_' or '.', starting and ending alphanumeric"
        )
    return key


def check_label_value(value: str) -> str:
    if not isinstance(value, str) or not LABEL_VALUE_RE.fullmatch(value):
        raise ValueError(
            f"invalid label value {value!r}: expected at most 63 characters of letters, digits, "
            "'-', '_' or '.', starting and ending alphanumeric (or empty)"
        )
    return value


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for k, v in labels.items():
        check_label_key(k)
        check_label_value(v)
    return dict(labels)


class LabelSelectorRequirement(Schema):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_label_key(v)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn"):
            if not self.values:
                raise ValueError(f"operator {self.operator} needs a non-empty values list")
            for v in self.values:
                check_label_value(v)
        elif self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        has = self.key in labels and labels[self.key] in (self.values or ())
        return has if self.operator == "In" else not has


class LabelSelector(Schema):
    """An empty selector selects everything; requirements are AND'ed."""

    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else check_labels(v)

    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        for k, v in (self.match_labels or {}).items():
            if labels.get(k) != v:
                return False
        return all(r.matches(labels) for r in self.match_expressions or ())

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse kubectl's selector syntax: `a=b,c!=d,e in (x,y),f notin (z),g,!h`."""
        match_labels: dict[str, str] = {}
        exprs: list[LabelSelectorRequirement] = []
        for term in _split_terms(text):
            if m := re.fullmatch(r"\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*", term):
                values = [v.strip() for v in m.group(3).split(",") if v.strip()]
                op = "In" if m.group(2) == "in" else "NotIn"
                exprs.append(LabelSelectorRequirement(key=m.group(1), operator=op, values=values))
            elif m := re.fullmatch(r"\s*([^\s!=]+)\s*!=\s*(\S*)\s*", term):
                exprs.append(LabelSelectorRequirement(key=m.group(1), operator="NotIn", values=[m.group(2)]))
            elif m := re.fullmatch(r"\s*([^\s!=]+)\s*==?\s*(\S*)\s*", term):
                match_labels[check_label_key(m.group(1))] = check_label_value(m.group(2))
            elif m := re.fullmatch(r"\s*!\s*([^\s!=]+)\s*", term):
                exprs.append(LabelSelectorRequirement(key=m.group(1), operator="DoesNotExist"))
            elif m := re.fullmatch(r"\s*([^\s!=(),]+)\s*", term):
                exprs.append(LabelSelectorRequirement(key=m.group(1), operator="Exists"))
            else:
                raise ValueError(f"cannot parse selector term {term.strip()!r} in {text!r}")
        return cls(match_labels=match_labels or None, match_expressions=exprs or None)


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return [t for t in terms if t.strip()]
