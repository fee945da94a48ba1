"""The spec of CloudNetwork (podnet.io/v1, the kind is in objects.py): pod addresses from the cloud's own network (AWS ENIs).

    apiVersion: podnet.io/v1
    kind: CloudNetwork
    metadata: {name: vpc-main}
    spec:
      provider: aws
      region: us-east-1
      nodeSelector: {matchLabels: {podnet.io/cloud: aws}}   # which nodes, as IPPools select them
      mode: shared              # shared: pods get secondary IPs of the node's ENIs
                                # exclusive: each pod gets an ENI of its own
      subnets:                  # where new ENIs go: those of the node's zone
        - {id: subnet-0a1b2c3d, zone: us-east-1a}
      securityGroups: [sg-0a1b2c3d]
      warmPool: {minIdle: 5, maxIdle: 15}   # idle addresses (exclusive: idle ENIs) kept per node
      cooldownSeconds: 30       # a freed address waits this long before another pod gets it
      batchSize: 10             # addresses asked for in one AssignPrivateIpAddresses call
      batchWindowMilliseconds: 100          # how long concurrent requests are gathered into one call
      rateLimits: {assign: {perMinute: 400, burst: 10}, ...}  # per-API token buckets
      leakGraceSeconds: 300     # a podnet ENI or address nobody holds is released after this
      endpoint: http://...      # optional: the EC2 API endpoint (a VPC endpoint); default AWS's

The warm pool is Terway's model (min/max idle); docs/eni.md maps AWS's WARM_IP_TARGET,
MINIMUM_IP_TARGET and WARM_ENI_TARGET onto it. What only the cloud can tell (does the
subnet exist, is the instance type known) is checked when the agent starts, naming the
object, the field and the API call.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from podnet.model.base import Schema
from podnet.model.selectors import LabelSelector

SUBNET_ID = re.compile(r"\Asubnet-[0-9a-f]{8,17}\Z")
SECURITY_GROUP_ID = re.compile(r"\Asg-[0-9a-f]{8,17}\Z")
REGION = re.compile(r"\A[a-z]{2}(-[a-z]+)+-\d{1,2}\Z")
ZONE_SUFFIX = re.compile(r"\A[a-z]\Z")
# The APIs a pool calls, each with its own token bucket (Terway's ratelimit.go keeps one per API).
APIS = ("describe", "create", "attach", "detach", "delete", "assign", "unassign")
# Terway's defaults, in calls per minute; the burst lets a cold node start at once.
DEFAULT_RATES = {"describe": 800, "create": 500, "attach": 500, "detach": 500, "delete": 500,
                 "assign": 400, "unassign": 400}
DEFAULT_BURST = 10
MAX_BATCH = 50  # AWS takes at most 50 addresses per AssignPrivateIpAddresses (more than any ENI holds)


class CloudSubnet(Schema):
    id: str
    zone: str

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not SUBNET_ID.match(v):
            raise ValueError(f"{v!r} is not a subnet ID: expected subnet- and 8 to 17 hex digits")
        return v


class WarmPool(Schema):
    """Idle addresses (exclusive mode: idle ENIs) a node keeps: below min_idle the pool asks
    the cloud for more, above max_idle it gives the surplus back."""

    min_idle: int = 2
    max_idle: int = 10

    @model_validator(mode="after")
    def _order(self) -> WarmPool:
        if self.min_idle < 0:
            raise ValueError(f"minIdle {self.min_idle} must be 0 or more")
        if self.max_idle < self.min_idle:
            raise ValueError(f"maxIdle {self.max_idle} is below minIdle {self.min_idle}: expected minIdle <= maxIdle")
        return self


class RateLimit(Schema):
    per_minute: int
    burst: int = DEFAULT_BURST

    @model_validator(mode="after")
    def _positive(self) -> RateLimit:
        if self.per_minute < 1:
            raise ValueError(f"perMinute {self.per_minute} must be 1 or more")
        if self.burst < 1:
            raise ValueError(f"burst {self.burst} must be 1 or more")
        return self


def default_rate_limits() -> dict[str, RateLimit]:
    return {api: RateLimit(per_minute=rate) for api, rate in DEFAULT_RATES.items()}


class CloudNetworkSpec(Schema):
    provider: Literal["aws"]
    region: str
    node_selector: LabelSelector | None = None
    mode: Literal["shared", "exclusive"] = "shared"
    subnets: list[CloudSubnet]
    security_groups: list[str] = Field(default_factory=list)
    warm_pool: WarmPool = Field(default_factory=WarmPool)
    cooldown_seconds: float = 30.0
    batch_size: int = 10
    batch_window_milliseconds: int = 100
    rate_limits: dict[str, RateLimit] = Field(default_factory=default_rate_limits)
    leak_grace_seconds: float = 300.0
    endpoint: str | None = None

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not REGION.match(v):
            raise ValueError(f"{v!r} is not a region name: expected e.g. us-east-1")
        return v

    @field_validator("security_groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for i, g in enumerate(v):
            if not SECURITY_GROUP_ID.match(g):
                raise ValueError(f"[{i}] {g!r} is not a security group ID: expected sg- and 8 to 17 hex digits")
        if len(set(v)) != len(v):
            raise ValueError("a security group is listed twice")
        if len(v) > 5:
            raise ValueError(f"{len(v)} security groups: an ENI takes at most 5")
        return v

    @field_validator("rate_limits")
    @classmethod
    def _apis(cls, v: dict[str, RateLimit]) -> dict[str, RateLimit]:
        unknown = sorted(set(v) - set(APIS))
        if unknown:
            raise ValueError(f"unknown API {unknown[0]!r}: expected one of {', '.join(APIS)}")
        return {**default_rate_limits(), **v}

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CloudNetworkSpec:
        if not self.subnets:
            raise ValueError("subnets: list at least one subnet")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.subnets):
            if s.id in seen:
                raise ValueError(f"subnets[{i}]: {s.id} is already subnets[{seen[s.id]}]")
            seen[s.id] = i
            if not (s.zone.startswith(self.region) and ZONE_SUFFIX.match(s.zone[len(self.region):])):
                raise ValueError(f"subnets[{i}].zone: {s.zone!r} is not a zone of region {self.region} "
                                 f"(expected e.g. {self.region}a)")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batchSize {self.batch_size} is out of range: expected 1-{MAX_BATCH}")
        if not 0 <= self.batch_window_milliseconds <= 10_000:
            raise ValueError(f"batchWindowMilliseconds {self.batch_window_milliseconds} is out of range: "
                             "expected 0-10000")
        if self.cooldown_seconds < 0:
            raise ValueError(f"cooldownSeconds {self.cooldown_seconds} must be 0 or more")
        if self.leak_grace_seconds < 0:
            raise ValueError(f"leakGraceSeconds {self.leak_grace_seconds} must be 0 or more")
        return self

    def zones(self) -> list[str]:
        return sorted({s.zone for s in self.subnets})


def parse_provider_id(provider_id: str) -> tuple[str | None, str]:
    """(zone, instance ID) of an AWS providerID (`aws:///us-east-1a/i-0abc`, or `aws://i-0abc`)."""
    if not provider_id.startswith("aws://"):
        raise ValueError(f"providerID {provider_id!r} is not an AWS one: expected aws:///<zone>/<instance ID>")
    parts = [p for p in provider_id[len("aws://"):].split("/") if p]
    if not parts or not parts[-1].startswith("i-"):
        raise ValueError(f"providerID {provider_id!r} names no instance: expected aws:///<zone>/i-...")
    return (parts[-2] if len(parts) >= 2 else None), parts[-1]
