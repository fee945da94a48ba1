"""The EC2 calls an ENI pool makes, through plain boto3, each behind its API's token bucket.

Every call is counted (by API name, for metrics and the benchmark) and every failure
becomes a CloudError naming the call and the cloud's error code: a throttled call
(RequestLimitExceeded, or the local bucket empty) is `.throttled`. boto3's own retries
are off: the pool decides when to try again (it backs off, and tells a waiting pod why).

Tags podnet puts on the ENIs it creates (how reconcile knows its own, and AWS VPC CNI's
`node.k8s.amazonaws.com/instance_id` and `createdAt` in podnet's names):

    podnet.io/managed-by     podnet
    podnet.io/node           the node's name
    podnet.io/instance-id    the instance the ENI was made for
    podnet.io/created-at     creation time, seconds since the epoch (leak grace period)
    podnet.io/cloud-network  the CloudNetwork it serves
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from podnet.eni.errors import CloudError
from podnet.eni.limits import InstanceLimits
from podnet.eni.ratelimit import RateLimiter

TAG_MANAGED = "podnet.io/managed-by"
TAG_NODE = "podnet.io/node"
TAG_INSTANCE = "podnet.io/instance-id"
TAG_CREATED = "podnet.io/created-at"
TAG_NETWORK = "podnet.io/cloud-network"
MANAGED_BY = "podnet"

# Which token bucket each EC2 call takes from.
BUCKET = {
    "DescribeInstances": "describe", "DescribeInstanceTypes": "describe", "DescribeSubnets": "describe",
    "DescribeSecurityGroups": "describe", "DescribeNetworkInterfaces": "describe",
    "CreateNetworkInterface": "create", "AttachNetworkInterface": "attach", "DetachNetworkInterface": "detach",
    "DeleteNetworkInterface": "delete", "AssignPrivateIpAddresses": "assign",
    "UnassignPrivateIpAddresses": "unassign", "CreateTags": "create",
}


@dataclass(frozen=True)
class Instance:
    id: str
    instance_type: str
    zone: str
    subnet_id: str | None
    private_ip: str | None


@dataclass(frozen=True)
class Subnet:
    id: str
    zone: str
    cidr: str
    free: int  # AvailableIpAddressCount
    vpc_id: str = ""


@dataclass(frozen=True)
class Eni:
    id: str
    subnet_id: str
    primary_ip: str
    secondary: tuple[str, ...]
    mac: str = ""
    status: str = ""
    device_index: int | None = None  # None: not attached
    attachment_id: str | None = None
    instance_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def podnet(self) -> bool:
        return self.tags.get(TAG_MANAGED) == MANAGED_BY


def _eni(raw: dict[str, Any]) -> Eni:
    primary = raw.get("PrivateIpAddress", "")
    secondary = tuple(p["PrivateIpAddress"] for p in raw.get("PrivateIpAddresses", ())
                      if not p.get("Primary") and p["PrivateIpAddress"] != primary)
    att = raw.get("Attachment") or {}
    attached = att.get("Status", "attached") in ("attached", "attaching") and "DeviceIndex" in att
    return Eni(
        id=raw["NetworkInterfaceId"], subnet_id=raw.get("SubnetId", ""), primary_ip=primary, secondary=secondary,
        mac=raw.get("MacAddress", ""), status=raw.get("Status", ""),
        device_index=att.get("DeviceIndex") if attached else None,
        attachment_id=att.get("AttachmentId") if attached else None,
        instance_id=att.get("InstanceId") if attached else None,
        tags={t["Key"]: t["Value"] for t in raw.get("TagSet", ())},
    )


class CloudClient:
    """EC2 for one region. Thread-safe (boto3 clients are); the counters are locked."""

    def __init__(self, region: str, *, endpoint: str | None = None, limiter: RateLimiter | None = None,
                 connect_timeout: float = 3.0, read_timeout: float = 30.0, client: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=connect_timeout,
                            read_timeout=read_timeout, max_pool_connections=32)
            client = boto3.session.Session().client("ec2", region_name=region, endpoint_url=endpoint, config=config)
        self.region = region
        self.endpoint = endpoint or f"https://ec2.{region}.amazonaws.com"
        self.ec2 = client
        self.limiter = limiter
        self.clock = clock
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    # -- the one way out

    def call(self, api: str, **kwargs: Any) -> dict[str, Any]:
        if self.limiter is not None:
            wait = self.limiter.try_take(BUCKET[api])
            if wait > 0:
                with self._lock:
                    self.failures[f"{api}:LocallyThrottled"] += 1
                raise CloudError(api, "LocallyThrottled",
                                 f"podnet's {BUCKET[api]} token bucket ({self.limiter.describe(BUCKET[api])}) is "
                                 f"empty; next call in {wait:.1f} s")
        from botocore.exceptions import BotoCoreError, ClientError

        with self._lock:
            self.calls[api] += 1
        method = getattr(self.ec2, _snake(api))
        try:
            return method(**kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = err.get("Code") or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
            with self._lock:
                self.failures[f"{api}:{code}"] += 1
            raise CloudError(api, code, err.get("Message") or str(e)) from None
        except BotoCoreError as e:
            code = type(e).__name__  # EndpointConnectionError, ConnectTimeoutError, NoCredentialsError, ...
            with self._lock:
                self.failures[f"{api}:{code}"] += 1
            raise CloudError(api, code, str(e)) from None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.calls)

    # -- reads

    def describe_instance(self, instance_id: str) -> Instance:
        out = self.call("DescribeInstances", InstanceIds=[instance_id])
        for res in out.get("Reservations", ()):
            for inst in res.get("Instances", ()):
                if inst["InstanceId"] == instance_id:
                    return Instance(inst["InstanceId"], inst["InstanceType"],
                                    inst.get("Placement", {}).get("AvailabilityZone", ""), inst.get("SubnetId"),
                                    inst.get("PrivateIpAddress"))
        raise CloudError("DescribeInstances", "InvalidInstanceID.NotFound", f"instance {instance_id} does not exist")

    def instance_limits(self, instance_type: str) -> InstanceLimits:
        out = self.call("DescribeInstanceTypes", InstanceTypes=[instance_type])
        for t in out.get("InstanceTypes", ()):
            net = t.get("NetworkInfo", {})
            return InstanceLimits(instance_type, int(net["MaximumNetworkInterfaces"]),
                                  int(net["Ipv4AddressesPerInterface"]))
        raise CloudError("DescribeInstanceTypes", "InvalidInstanceType", f"unknown instance type {instance_type}")

    def describe_subnets(self, ids: list[str]) -> list[Subnet]:
        out = self.call("DescribeSubnets", SubnetIds=list(ids))
        return [Subnet(s["SubnetId"], s.get("AvailabilityZone", ""), s.get("CidrBlock", ""),
                       int(s.get("AvailableIpAddressCount", 0)), s.get("VpcId", ""))
                for s in out.get("Subnets", ())]

    def describe_security_groups(self, ids: list[str]) -> list[str]:
        out = self.call("DescribeSecurityGroups", GroupIds=list(ids))
        return [g["GroupId"] for g in out.get("SecurityGroups", ())]

    def instance_enis(self, instance_id: str) -> list[Eni]:
        """Every ENI attached to the instance (podnet's and the primary one)."""
        out = self.call("DescribeNetworkInterfaces",
                        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])
        return [_eni(n) for n in out.get("NetworkInterfaces", ())]

    def node_enis(self, node: str) -> list[Eni]:
        """Every ENI podnet made for the node, attached or not (leaked ones among them)."""
        out = self.call("DescribeNetworkInterfaces",
                        Filters=[{"Name": f"tag:{TAG_NODE}", "Values": [node]},
                                 {"Name": f"tag:{TAG_MANAGED}", "Values": [MANAGED_BY]}])
        return [_eni(n) for n in out.get("NetworkInterfaces", ())]

    # -- writes

    def create_eni(self, subnet_id: str, groups: list[str], tags: dict[str, str], description: str = "") -> Eni:
        kwargs: dict[str, Any] = {
            "SubnetId": subnet_id,
            "Description": description or "podnet pod addresses",
            "TagSpecifications": [{"ResourceType": "network-interface",
                                   "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        }
        if groups:
            kwargs["Groups"] = list(groups)
        out = self.call("CreateNetworkInterface", **kwargs)
        return _eni(out["NetworkInterface"])

    def attach_eni(self, eni_id: str, instance_id: str, device_index: int) -> str:
        out = self.call("AttachNetworkInterface", NetworkInterfaceId=eni_id, InstanceId=instance_id,
                        DeviceIndex=device_index)
        return out["AttachmentId"]

    def detach_eni(self, attachment_id: str) -> None:
        self.call("DetachNetworkInterface", AttachmentId=attachment_id, Force=True)

    def delete_eni(self, eni_id: str) -> None:
        self.call("DeleteNetworkInterface", NetworkInterfaceId=eni_id)

    def assign(self, eni_id: str, count: int) -> list[str]:
        """Ask for `count` more secondary addresses; the addresses the answer lists (EC2 lists
        the new ones; some servers list all: the caller keeps what it did not know)."""
        out = self.call("AssignPrivateIpAddresses", NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=count)
        return [p["PrivateIpAddress"] for p in out.get("AssignedPrivateIpAddresses", ())]

    def unassign(self, eni_id: str, addresses: list[str]) -> None:
        self.call("UnassignPrivateIpAddresses", NetworkInterfaceId=eni_id, PrivateIpAddresses=list(addresses))


def _snake(api: str) -> str:
    out = []
    for i, ch in enumerate(api):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
