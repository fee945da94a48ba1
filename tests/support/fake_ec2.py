"""FakeEC2: moto's EC2 server behind a thin layer that makes it behave like EC2 where podnet
depends on it. A fake: for tests, the lab and the benchmark, never the product.

moto (`ThreadedMotoServer` on loopback) implements the ENI calls, but enforces no
per-instance limits, can hand one address to two ENIs of a subnet (even the subnet's
reserved ones) and loops forever when a subnet runs out. This layer is an HTTP server of
its own in front of moto; podnet's boto3 client talks to it as to EC2. Under one lock
it checks every call that takes addresses or attachments against moto's state and
answers as EC2 does:

    AttachNetworkInterface     AttachmentLimitExceeded past the instance type's ENIs
    AssignPrivateIpAddresses   PrivateIpAddressLimitExceeded past its IPv4 per ENI;
                               InsufficientFreeAddressesInSubnet when the subnet is short
    CreateNetworkInterface,    an address no other ENI of the subnet holds, never one of
    RunInstances               the subnet's five reserved ones (network, +1..+3, broadcast)

and can add latency per call, throttle calls (RequestLimitExceeded, HTTP 503: the next N
calls of an action, or a token bucket per action), and refuse access keys (AuthFailure).
It counts every call by action (`calls`) and every limit error it gave (`limit_errors`:
a client that respects the limits makes none).

    with FakeEC2() as ec2:
        world = ec2.world(instance_type="m5.large", subnets=[("10.0.1.0/24", "us-east-1a")])
        ec2.latency["AssignPrivateIpAddresses"] = 0.5
        ... boto3.client("ec2", endpoint_url=ec2.endpoint, ...)
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.sax.saxutils import escape

REGION = "us-east-1"
ACCESS_KEY = "podnet-test"
SECRET_KEY = "podnet-test-secret"
IMAGE = "ami-12c6146b"  # one of moto's built-in images
# The calls after which the ENIs' addresses or attachments may have changed.
CHANGES = frozenset({"CreateNetworkInterface", "AttachNetworkInterface", "DetachNetworkInterface",
                     "DeleteNetworkInterface", "AssignPrivateIpAddresses", "UnassignPrivateIpAddresses",
                     "RunInstances"})


@dataclass
class World:
    """What world() made: a VPC, its subnets (by CIDR), a security group, instances."""

    vpc: str
    subnets: dict[str, str]  # cidr -> subnet ID
    zones: dict[str, str]  # subnet ID -> zone
    group: str
    instances: list[str] = field(default_factory=list)


class _Bucket:
    def __init__(self, per_second: float, burst: int):
        self.rate, self.burst, self.tokens, self.at = per_second, burst, float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _EC2Error(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        self.code, self.message, self.status = code, message, status


class FakeEC2:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, region: str = REGION):
        self.host = host
        self.port = port
        self.region = region
        self.latency: dict[str, float] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.limit_errors: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.in_flight = 0  # calls received and not answered yet (a caller killed meanwhile never hears back)
        self.refused_keys: set[str] = set()
        self._throttle_next: collections.Counter[str] = collections.Counter()
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # every call that takes addresses or attachments
        self._count_lock = threading.Lock()
        self._types: dict[str, tuple[int, int]] = {}
        self._moto: Any = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.admin: Any = None  # boto3 straight to moto: set-up and inspection, not counted
        self.on_change: Callable[[FakeEC2], None] | None = None  # after every call that changed ENIs

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeEC2:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        mhost, mport = self._moto.get_host_and_port()
        self._moto_addr = (mhost, mport)
        self.admin = boto3.client("ec2", endpoint_url=f"http://{mhost}:{mport}", region_name=self.region,
                                  aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, out = fake._handle(dict(self.headers), body)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self) -> None:  # noqa: N802 - the fake's own state, for a client in another process
                self._json(fake._admin("GET", self.path, {}))

            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._json(fake._admin("PUT", self.path, json.loads(body or b"{}")))

            def _json(self, answer: tuple[int, Any]) -> None:
                status, doc = answer
                out = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-ec2", daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    def __enter__(self) -> FakeEC2:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ knobs

    def throttle(self, action: str, calls: int) -> None:
        """The next `calls` calls of `action` answer RequestLimitExceeded."""
        with self._count_lock:
            self._throttle_next[action] += calls

    def rate_limit(self, action: str, per_second: float, burst: int) -> None:
        """EC2's own throttling: a token bucket for `action` (calls past it: RequestLimitExceeded)."""
        with self._count_lock:
            self._buckets[action] = _Bucket(per_second, burst)

    def reset_counts(self) -> None:
        with self._count_lock:
            self.calls.clear()
            self.limit_errors.clear()
            self.errors.clear()

    def client(self, access_key: str = ACCESS_KEY) -> Any:
        import boto3

        return boto3.client("ec2", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key, aws_secret_access_key=SECRET_KEY)

    # ------------------------------------------------------------ set-up helpers

    def world(self, *, instance_type: str = "m5.large", subnets: list[tuple[str, str]] | None = None,
              vpc_cidr: str = "10.0.0.0/16", instances: int = 1, node_subnet: str | None = None) -> World:
        """A VPC, subnets [(cidr, zone)], a security group and `instances` instances of the type,
        whose primary ENIs are in `node_subnet` (default: the first subnet)."""
        subnets = subnets or [("10.0.1.0/24", f"{self.region}a")]
        vpc = self.admin.create_vpc(CidrBlock=vpc_cidr)["Vpc"]["VpcId"]
        ids, zones = {}, {}
        for cidr, zone in subnets:
            sid = self.admin.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]
            ids[cidr], zones[sid] = sid, zone
        group = self.admin.create_security_group(GroupName=f"pods-{uuid.uuid4().hex[:8]}", Description="pods",
                                                 VpcId=vpc)["GroupId"]
        world = World(vpc, ids, zones, group)
        home = ids[node_subnet] if node_subnet else ids[subnets[0][0]]
        for _ in range(instances):
            world.instances.append(self.run_instance(instance_type, home))
        return world

    def run_instance(self, instance_type: str, subnet_id: str) -> str:
        with self._lock:
            (address,) = self._free_addresses(subnet_id, 1)
            out = self.admin.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType=instance_type,
                                           SubnetId=subnet_id, PrivateIpAddress=address)
        return out["Instances"][0]["InstanceId"]

    # ------------------------------------------------------------ inspection

    def enis(self, *, instance: str | None = None, subnet: str | None = None,
             tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
        f = [{"Name": "attachment.instance-id", "Values": [instance]}] if instance else []
        f += [{"Name": "subnet-id", "Values": [subnet]}] if subnet else []
        f += [{"Name": f"tag:{k}", "Values": [v]} for k, v in (tags or {}).items()]
        return self.admin.describe_network_interfaces(Filters=f)["NetworkInterfaces"]

    def instance_addresses(self, instance_id: str) -> dict[str, list[str]]:
        """ENI ID -> its secondary addresses, for every ENI attached to the instance."""
        return {n["NetworkInterfaceId"]: [p["PrivateIpAddress"] for p in n["PrivateIpAddresses"] if not p["Primary"]]
                for n in self.enis(instance=instance_id)}

    def duplicates(self) -> list[str]:
        """Addresses held by more than one ENI (EC2 never has any)."""
        seen: collections.Counter[str] = collections.Counter()
        for n in self.admin.describe_network_interfaces()["NetworkInterfaces"]:
            for p in n["PrivateIpAddresses"]:
                seen[p["PrivateIpAddress"]] += 1
        return sorted(a for a, c in seen.items() if c > 1)

    # ------------------------------------------------------------ control from another process

    def _admin(self, method: str, path: str, doc: dict[str, Any]) -> tuple[int, Any]:
        """GET /_fake/state; PUT /_fake/control {latency, throttle, reset, refuse}; PUT /_fake/world
        {instanceType, subnets: [[cidr, zone]], vpcCidr, instances, nodeSubnet}."""
        try:
            if method == "GET" and path == "/_fake/state":
                with self._count_lock:
                    return 200, {"calls": dict(self.calls), "limit_errors": dict(self.limit_errors),
                                 "errors": dict(self.errors), "in_flight": self.in_flight,
                                 "duplicates": self.duplicates()}
            if method == "PUT" and path == "/_fake/control":
                if doc.get("reset"):
                    self.reset_counts()
                if "latency" in doc:
                    self.latency = {k: float(v) for k, v in doc["latency"].items()}
                for action, n in doc.get("throttle", {}).items():
                    self.throttle(action, int(n))
                self.refused_keys.update(doc.get("refuse", ()))
                return 200, {}
            if method == "PUT" and path == "/_fake/world":
                w = self.world(instance_type=doc.get("instanceType", "m5.large"),
                               subnets=[tuple(x) for x in doc.get("subnets", [])] or None,
                               vpc_cidr=doc.get("vpcCidr", "10.0.0.0/16"), instances=int(doc.get("instances", 1)),
                               node_subnet=doc.get("nodeSubnet"))
                return 200, {"vpc": w.vpc, "subnets": w.subnets, "zones": w.zones, "group": w.group,
                             "instances": w.instances}
        except Exception as e:  # noqa: BLE001 - told to the caller
            return 500, {"error": f"{type(e).__name__}: {e}"}
        return 404, {"error": f"no {method} {path}"}

    # ------------------------------------------------------------ the layer

    def _handle(self, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        params = parse_qsl(body.decode(), keep_blank_values=True)
        p = dict(params)
        action = p.get("Action", "")
        with self._count_lock:
            self.calls[action] += 1
            self.in_flight += 1
        try:
            return self._answer(action, headers, p, params)
        finally:
            with self._count_lock:
                self.in_flight -= 1

    def _answer(self, action: str, headers: dict[str, str], p: dict[str, str],
                params: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]], bytes]:
        delay = self.latency.get(action, 0.0)
        if delay:
            time.sleep(delay)
        try:
            self._admit(action, headers)
            with self._lock:
                params = self._enforce(action, p, params)
                answer = self._forward(headers, urlencode(params).encode())
                if action in CHANGES and answer[0] == 200 and self.on_change is not None:
                    self.on_change(self)  # e.g. the lab's cloud fabric, before the caller hears back
                return answer
        except _EC2Error as e:
            with self._count_lock:
                self.errors[e.code] += 1
            return e.status, [("Content-Type", "text/xml")], _error_xml(e.code, e.message)
        except Exception as e:  # a bug here or in moto: an answer all the same, as EC2's 500
            return 500, [("Content-Type", "text/xml")], _error_xml("InternalError", f"{type(e).__name__}: {e}")

    def _admit(self, action: str, headers: dict[str, str]) -> None:
        auth = headers.get("Authorization", "")
        key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
        if key in self.refused_keys:
            raise _EC2Error("AuthFailure", "AWS was not able to validate the provided access credentials", 401)
        with self._count_lock:
            if self._throttle_next[action] > 0:
                self._throttle_next[action] -= 1
                raise _EC2Error("RequestLimitExceeded", "Request limit exceeded.", 503)
            bucket = self._buckets.get(action)
            if bucket is not None and not bucket.take():
                raise _EC2Error("RequestLimitExceeded", "Request limit exceeded.", 503)

    def _limit(self, code: str, message: str) -> _EC2Error:
        with self._count_lock:
            self.limit_errors[code] += 1
        return _EC2Error(code, message)

    def _enforce(self, action: str, p: dict[str, str], params: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if action == "AttachNetworkInterface":
            itype = self._instance_type(p["InstanceId"])
            max_enis, _ = self._type_limits(itype)
            attached = self.enis(instance=p["InstanceId"])
            if len(attached) >= max_enis:
                raise self._limit("AttachmentLimitExceeded",
                                  f"Interface count {len(attached) + 1} exceeds the limit for {itype}")
            if any(n["Attachment"]["DeviceIndex"] == int(p["DeviceIndex"]) for n in attached):
                raise _EC2Error("InvalidParameterValue",
                                f"Instance '{p['InstanceId']}' already has an interface attached at device index "
                                f"'{p['DeviceIndex']}'.")
            return params
        if action == "AssignPrivateIpAddresses":
            eni = self._eni(p["NetworkInterfaceId"])
            wanted = [v for k, v in params if k.startswith("PrivateIpAddress.")]
            count = int(p.get("SecondaryPrivateIpAddressCount") or 0) + len(wanted)
            held = len(eni["PrivateIpAddresses"])
            att = eni.get("Attachment") or {}
            if att.get("InstanceId"):
                _, per_eni = self._type_limits(self._instance_type(att["InstanceId"]))
                if held + count > per_eni:
                    raise self._limit("PrivateIpAddressLimitExceeded",
                                      f"Number of private addresses will exceed limit ({held} + {count} > {per_eni} "
                                      f"for this interface)")
            if "SecondaryPrivateIpAddressCount" in p:
                chosen = self._free_addresses(eni["SubnetId"], int(p["SecondaryPrivateIpAddressCount"]))
                params = [(k, v) for k, v in params if k != "SecondaryPrivateIpAddressCount"]
                start = len(wanted)
                params += [(f"PrivateIpAddress.{start + i + 1}", a) for i, a in enumerate(chosen)]
            return params
        if action == "CreateNetworkInterface":
            if "PrivateIpAddress" not in p:
                (address,) = self._free_addresses(p["SubnetId"], 1)
                params = [*params, ("PrivateIpAddress", address)]
            elif p["PrivateIpAddress"] in self._used(p["SubnetId"]):
                raise _EC2Error("InvalidIPAddress.InUse", f"Address {p['PrivateIpAddress']} is in use.")
            return params
        if action == "RunInstances" and "PrivateIpAddress" not in p and "SubnetId" in p:
            (address,) = self._free_addresses(p["SubnetId"], 1)
            return [*params, ("PrivateIpAddress", address)]
        return params

    def _forward(self, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = HTTPConnection(*self._moto_addr, timeout=60)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "host", "connection")}
            conn.request("POST", "/", body=body, headers=fwd)
            resp = conn.getresponse()
            out = resp.read()
            ctype = resp.getheader("Content-Type") or "text/xml"
            return resp.status, [("Content-Type", ctype)], out
        finally:
            conn.close()

    # ------------------------------------------------------------ moto's state, read through boto3

    def _eni(self, eni_id: str) -> dict[str, Any]:
        try:
            return self.admin.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
        except Exception:
            raise _EC2Error("InvalidNetworkInterfaceID.NotFound",
                            f"The networkInterface ID '{eni_id}' does not exist") from None

    def _instance_type(self, instance_id: str) -> str:
        try:
            res = self.admin.describe_instances(InstanceIds=[instance_id])["Reservations"]
        except Exception:
            raise _EC2Error("InvalidInstanceID.NotFound", f"The instance ID '{instance_id}' does not exist") from None
        return res[0]["Instances"][0]["InstanceType"]

    def _type_limits(self, itype: str) -> tuple[int, int]:
        if itype not in self._types:
            net = self.admin.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"][0]["NetworkInfo"]
            self._types[itype] = (net["MaximumNetworkInterfaces"], net["Ipv4AddressesPerInterface"])
        return self._types[itype]

    def _used(self, subnet_id: str) -> set[str]:
        used = set()
        for n in self.enis(subnet=subnet_id):
            used.update(p["PrivateIpAddress"] for p in n["PrivateIpAddresses"])
        return used

    def _free_addresses(self, subnet_id: str, count: int) -> list[str]:
        try:
            subnet = self.admin.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]
        except Exception:
            raise _EC2Error("InvalidSubnetID.NotFound", f"The subnet ID '{subnet_id}' does not exist") from None
        net = ipaddress.ip_network(subnet["CidrBlock"])
        reserved = {net.network_address + i for i in range(4)} | {net.broadcast_address}
        used = self._used(subnet_id)
        free = []
        for a in net:
            if a in reserved or str(a) in used:
                continue
            free.append(str(a))
            if len(free) == count:
                return free
        raise _EC2Error("InsufficientFreeAddressesInSubnet",
                        f"The specified subnet {subnet_id} has only {len(free)} free addresses; {count} needed.")


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID>"
            "</Response>").encode()


class FakeEC2Client:
    """A FakeEC2 in another process, driven through its /_fake/ endpoints."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def _call(self, method: str, path: str, doc: dict[str, Any] | None = None) -> Any:
        from urllib.parse import urlsplit

        parts = urlsplit(self.endpoint)
        conn = HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            body = json.dumps(doc or {}).encode() if method == "PUT" else None
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            out = json.loads(resp.read() or b"null")
            if resp.status != 200:
                raise RuntimeError(f"FakeEC2 {method} {path}: {out}")
            return out
        finally:
            conn.close()

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/_fake/state")

    def control(self, **doc: Any) -> None:
        self._call("PUT", "/_fake/control", doc)

    def world(self, **doc: Any) -> World:
        w = self._call("PUT", "/_fake/world", doc)
        return World(w["vpc"], w["subnets"], w["zones"], w["group"], w["instances"])


def main(argv: list[str] | None = None) -> int:
    """python -m tests.support.fake_ec2 [--host H] [--port P]: serve until SIGTERM; prints
    `ready <endpoint>` once it answers."""
    ap = argparse.ArgumentParser(prog="python -m tests.support.fake_ec2")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--fabric", metavar="CONFIG",
                    help="the lab's cloud fabric (podnet.lab.cloudfabric) to program after every ENI change, "
                         "from this JSON file (read again when it changes)")
    ap.add_argument("--ready-file", help="written with the endpoint once the server answers")
    ap.add_argument("--world", metavar="SPEC", help="make this world first (JSON: as PUT /_fake/world takes)")
    ap.add_argument("--world-out", metavar="FILE", help="where to write what --world made (JSON)")
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with FakeEC2(args.host, args.port) as fake:
        if args.world:
            status, made = fake._admin("PUT", "/_fake/world", json.loads(open(args.world).read()))
            if status != 200:
                print(f"cannot make the world: {made}", file=sys.stderr, flush=True)
                return 1
            with open(args.world_out + ".tmp", "w") as f:
                json.dump(made, f)
            os.replace(args.world_out + ".tmp", args.world_out)
        if args.fabric:
            fake.on_change = _fabric_hook(args.fabric)
        print(f"ready {fake.endpoint}", flush=True)
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                f.write(fake.endpoint + "\n")
            os.replace(args.ready_file + ".tmp", args.ready_file)
        stop.wait()
    return 0


def _fabric_hook(path: str) -> Callable[[FakeEC2], None]:
    from podnet.lab.cloudfabric import CloudFabric, FabricConfig

    seen: dict[str, Any] = {"mtime": None, "fabric": None}

    def hook(fake: FakeEC2) -> None:
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return  # no configuration yet: the world is still being made
        if mtime != seen["mtime"]:
            config = FabricConfig.read(path)
            if config is None:
                return
            seen["mtime"], seen["fabric"] = mtime, CloudFabric(config)
        try:
            seen["fabric"].apply(fake.admin.describe_network_interfaces()["NetworkInterfaces"])
        except Exception as e:  # noqa: BLE001 - the call still answers; the log says why the fabric lags
            print(f"cloud fabric: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    return hook


if __name__ == "__main__":
    sys.exit(main())
