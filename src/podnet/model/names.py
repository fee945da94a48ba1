"""Kubernetes name syntax: DNS-1123 subdomains and labels, DNS-1035 labels, IANA
service names (port names), with the API server's length limits.

Every pattern is anchored with \\A and \\Z (Python's `$` also matches before a
final newline, so "web\\n" would pass) and every check uses fullmatch.
"""

from __future__ import annotations

import re

DNS1123_SUBDOMAIN_MAX = 253
DNS1123_LABEL_MAX = 63
DNS1035_LABEL_MAX = 63
IANA_SVC_NAME_MAX = 15

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"\A{_LABEL}(\.{_LABEL})*\Z")
DNS1123_LABEL = re.compile(rf"\A{_LABEL}\Z")
DNS1035_LABEL = re.compile(r"\A[a-z]([-a-z0-9]*[a-z0-9])?\Z")
IANA_SVC_NAME = re.compile(r"\A(?=[a-z0-9-]*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= DNS1123_SUBDOMAIN_MAX and DNS1123_SUBDOMAIN.fullmatch(value) is not None


def is_dns1123_label(value: str, limit: int = DNS1123_LABEL_MAX) -> bool:
    return len(value) <= limit and DNS1123_LABEL.fullmatch(value) is not None


def is_dns1035_label(value: str) -> bool:
    return len(value) <= DNS1035_LABEL_MAX and DNS1035_LABEL.fullmatch(value) is not None


def is_iana_svc_name(value: str) -> bool:
    """A port name: at most 15 lowercase letters, digits and single '-', at least one letter."""
    return len(value) <= IANA_SVC_NAME_MAX and IANA_SVC_NAME.fullmatch(value) is not None and "--" not in value
