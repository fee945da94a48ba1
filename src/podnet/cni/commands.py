"""What podnet does for each CNI command: ADD, DEL, CHECK, STATUS, GC and VERSION.

Commands holds them as methods of the handler (CNIHandler in handler.py derives from it and
adds the entry point, the parsing and the locking around each call). Each command gets a
checked Request (spec.py), borrows a store connection and an IPAM (sessions.py), and drives
the pod dataplane; every failure is a CNIError with the code the runtime should see.

ADD writes the attachment record before it allocates and undoes what it made when a later
step fails; DEL and GC tear down interfaces, then the address, then the record, so a
failure part way leaves the rest findable (attachments.py).

A pod's additional networks (annotation k8s.v1.cni.cncf.io/networks, podnet.multinet) are
planned before anything is made, recorded in the same attachment record, set up after eth0
(all or nothing) and removed before it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any, Protocol

from podnet.cni.attachments import attachment_handle, attachment_key, node_attachments_prefix
from podnet.cni.errors import CNIError
from podnet.cni.podwait import ABSENT, deleted_since, pod_uid, wait_for_pod
from podnet.cni.sessions import Sessions, store_call
from podnet.cni.spec import (
    E_CHECK_FAILED,
    E_DATAPLANE,
    E_INVALID_CONFIG,
    E_INVALID_NETNS,
    E_IPAM,
    E_IPAM_EXHAUSTED,
    E_NETWORK,
    E_NOT_READY,
    E_NOT_READY_LIMITED,
    E_POD_GONE,
    E_TRY_AGAIN,
    SUPPORTED_VERSIONS,
    VALID_ATTACHMENTS,
    VALID_ATTACHMENTS_OLD,
    Request,
    add_result,
    prev_result_address,
)
from podnet.multinet.attachments import Multinet, MultinetConfig
from podnet.store.base import KeyValueStore, StoreUnavailable

if TYPE_CHECKING:  # the agent hands in the real one; tests may hand in a stand-in
    from podnet.dataplane.pods import PodInterfaces

log = logging.getLogger("podnet.cni.handler")  # one logger for every CNI request, as before the split


class Dataplane(Protocol):
    def add(self, container_id: str, ifname: str, netns: str, address: str) -> PodInterfaces: ...
    def delete(self, container_id: str, ifname: str, netns: str | None) -> None: ...
    def check(self, container_id: str, ifname: str, netns: str, address: str) -> list[str]: ...
    def attachments(self) -> list[tuple[str, str]]: ...


class Commands:
    """The commands, for one node. The handler sets these attributes (see CNIHandler)."""

    node: str
    dataplane: Dataplane
    ready: Callable[[], tuple[int, str] | None]
    verify_netns: Callable[[str], str | None]
    multinet: Multinet
    _sessions: Sessions
    pod_wait: float = 0.0  # seconds an ADD waits for a Pod the store does not know yet (podwait.py)

    # ------------------------------------------------------------ VERSION

    def _version(self, req: Request) -> tuple[int, str]:
        return 0, json.dumps({"cniVersion": req.version, "supportedVersions": list(SUPPORTED_VERSIONS)})

    # ------------------------------------------------------------ ADD

    def _add(self, req: Request) -> tuple[int, str]:
        problem = self.verify_netns(req.netns)
        if problem:
            raise CNIError(E_INVALID_NETNS, problem)
        namespace = req.namespace or "default"
        if self.pod_wait and req.pod:
            with self._sessions.session() as (kv, _):
                wait_for_pod(kv, namespace, req.pod, self.pod_wait)
        key = attachment_key(self.node, req.handle)
        config = MultinetConfig.from_netconf(req.config)
        with self._sessions.session() as (kv, ipam):
            uid = store_call(lambda: pod_uid(kv, namespace, req.pod)) if req.pod else ABSENT
            if self.pod_wait and req.pod and uid is ABSENT:  # it came (wait_for_pod) and went again
                log.warning("CNI ADD %s: pod %s/%s was deleted before its ADD began", req.handle, namespace, req.pod)
                raise CNIError(E_POD_GONE, f"pod {namespace}/{req.pod} was deleted before its ADD began: nothing "
                                           "was made")
            existing = store_call(lambda: kv.get(key))
            if existing is not None:
                # An earlier ADD of this attachment never finished, or its DEL never came: start clean.
                log.warning("CNI ADD %s: an earlier attachment record exists; removing what it left", req.handle)
                old_netns = existing.value.get("netns") or None
                if old_netns is not None and self.verify_netns(old_netns) is not None:
                    old_netns = None
                self._teardown(kv, ipam, req.container_id, req.ifname, old_netns, req.handle, key,
                               existing.value, req.cni_path, config)
            # The pod's additional networks, decided (and refused) before anything is made.
            ref, networks = self.multinet.plan(
                kv, namespace=req.namespace, pod=req.pod, uid=(req.args or {}).get("K8S_POD_UID"),
                primary_ifname=req.ifname, network=req.network, container_id=req.container_id,
                version=req.version, config=config)
            record = {
                "network": req.network,
                "containerID": req.container_id,
                "ifname": req.ifname,
                "netns": req.netns,
                "namespace": req.namespace,
                "pod": req.pod,
                "podUID": (req.args or {}).get("K8S_POD_UID"),
                "handle": req.handle,
                "created": time.time(),
            }
            if networks:
                record["cniArgs"] = dict(req.args or {})
                record["cniPath"] = list(req.cni_path)
                record["networks"] = [n.to_record() for n in networks]
            store_call(lambda: kv.put(key, record))
            try:
                alloc = self._allocate(ipam, req)
                ifs = self.dataplane.add(req.container_id, req.ifname, req.netns, alloc.address)
                result = add_result(req.version, ifs, alloc.address, alloc.prefix_len, req.netns)
                if networks:
                    assert ref is not None

                    def save(done: list[Any]) -> None:
                        store_call(lambda: kv.put(key, {**record, "networks": [n.to_record() for n in done]}))

                    result = self.multinet.add(
                        kv, ipam, ref=ref, networks=networks, container_id=req.container_id, netns=req.netns,
                        args=req.args, cni_path=req.cni_path, config=config, primary_name=req.network,
                        primary_ifname=req.ifname, primary_result=result, version=req.version, save=save)
            except BaseException as e:
                undo_errors = self._undo(kv, ipam, req, key, keep_record=bool(getattr(e, "leftover", False)))
                if isinstance(e, CNIError):
                    if undo_errors:
                        e.details = "; ".join(filter(None, [e.details, *undo_errors]))
                    raise
                if not isinstance(e, Exception):
                    raise
                log.exception("CNI ADD %s: pod dataplane failed", req.handle)
                raise CNIError(E_DATAPLANE, f"setting up the pod interface {req.ifname} in {req.netns} failed: {e}",
                               "; ".join(undo_errors)) from None
            if req.pod and store_call(lambda: deleted_since(kv, namespace, req.pod, uid)):
                self._pod_deleted(kv, ipam, req, key, config)
        return 0, json.dumps(result)

    def _pod_deleted(self, kv: KeyValueStore, ipam: Any, req: Request, key: str, config: MultinetConfig) -> None:
        """The Pod went while its ADD ran: remove everything the ADD made (its additional
        networks too: the record lists them) and fail. The kubelet will not start this sandbox,
        and its DEL may never come."""
        ref = f"{req.namespace or 'default'}/{req.pod}"
        log.warning("CNI ADD %s: pod %s was deleted while its ADD ran; removing its interfaces and addresses",
                    req.handle, ref)
        record = store_call(lambda: kv.get(key))
        self._teardown(kv, ipam, req.container_id, req.ifname, req.netns, req.handle, key,
                       record.value if record is not None else None, req.cni_path, config)
        raise CNIError(E_POD_GONE, f"pod {ref} was deleted while its ADD ran: its interfaces and addresses are "
                                   "removed")

    def _allocate(self, ipam: Any, req: Request) -> Any:
        from podnet.ipam import IPAMError, IPAMExhausted, TooManyConflicts, TryLater

        try:
            return ipam.allocate(req.handle, self.node, namespace=req.namespace, pod=req.pod)
        except IPAMExhausted as e:
            raise CNIError(E_IPAM_EXHAUSTED, str(e)) from None
        except TooManyConflicts as e:
            raise CNIError(E_TRY_AGAIN, f"IPAM: {e}") from None
        except TryLater as e:
            raise CNIError(E_TRY_AGAIN, str(e)) from None
        except StoreUnavailable as e:
            raise CNIError(E_TRY_AGAIN, f"store unavailable: {e}") from None
        except IPAMError as e:
            raise CNIError(E_IPAM, f"IPAM: {e}") from None

    def _undo(self, kv: KeyValueStore, ipam: Any, req: Request, key: str, keep_record: bool = False) -> list[str]:
        """Remove everything a failed ADD made; the problems met doing so (normally none).
        keep_record: an additional network could not be rolled back: DEL or GC finishes it."""
        problems = []
        try:
            self.dataplane.delete(req.container_id, req.ifname, req.netns)
        except Exception as e:
            problems.append(f"cleanup: removing the pod interface failed: {e}")
            return problems  # keep the address and the record: a DEL or GC finishes the job
        try:
            ipam.release(req.handle)
        except Exception as e:
            problems.append(f"cleanup: releasing the address failed: {e}")
            return problems
        if keep_record:
            problems.append("cleanup: the attachment record is kept: a DEL or GC removes what is left")
            return problems
        try:
            kv.delete(key)
        except Exception as e:
            problems.append(f"cleanup: deleting the attachment record failed: {e}")
        for p in problems:
            log.error("CNI ADD %s: %s", req.handle, p)
        return problems

    # ------------------------------------------------------------ DEL

    def _del(self, req: Request) -> tuple[int, str]:
        key = attachment_key(self.node, req.handle)
        netns: str | None = req.netns or None
        if netns is not None and self.verify_netns(netns) is not None:
            # Gone, never a namespace, or the node's own: leave it alone. The host side of the
            # pair (named after the attachment, never a node interface) is all there is to remove.
            netns = None
        with self._sessions.session() as (kv, ipam):
            record = store_call(lambda: kv.get(key))
            if netns is None and record is not None:
                netns = self._recorded_netns(record.value)
            self._teardown(kv, ipam, req.container_id, req.ifname, netns, req.handle, key,
                           record.value if record is not None else None, req.cni_path,
                           MultinetConfig.from_netconf(req.config))
        return 0, ""

    def _recorded_netns(self, record: dict[str, Any]) -> str | None:
        """The pod's namespace as its record names it, if it still is one: a DEL or GC without
        a usable CNI_NETNS still removes the additional networks' interfaces inside it (their
        addresses are released, so an interface left behind would hold an address another pod
        may get)."""
        recorded = record.get("netns")
        return recorded if recorded and self.verify_netns(recorded) is None else None

    def _teardown(self, kv: KeyValueStore, ipam: Any, container_id: str, ifname: str, netns: str | None,
                  handle: str, key: str, record: dict[str, Any] | None = None, cni_path: tuple[str, ...] = (),
                  config: MultinetConfig | None = None) -> None:
        """The additional networks (reverse), then the interfaces, then the address, then the
        record: a failure leaves the rest findable."""
        from podnet.ipam import TooManyConflicts

        left: list[dict[str, Any]] = []
        problems: list[str] = []
        if record and record.get("networks"):
            problems, left = self.multinet.teardown(ipam, record, container_id, netns,
                                                    cni_path or tuple(record.get("cniPath") or ()),
                                                    config or MultinetConfig())
            for p in problems:
                log.warning("CNI teardown %s: %s", handle, p)
        try:
            self.dataplane.delete(container_id, ifname, netns)
        except Exception as e:
            log.exception("CNI teardown %s: pod dataplane failed", handle)
            raise CNIError(E_DATAPLANE, f"removing the pod interface {ifname} of {container_id} failed: {e}") from None
        try:
            ipam.release(handle)
        except (TooManyConflicts, StoreUnavailable) as e:
            raise CNIError(E_TRY_AGAIN, f"releasing the address of {handle}: {e}") from None
        if left:  # the pod's namespace is still there and some networks would not go: the next DEL retries
            assert record is not None
            store_call(lambda: kv.put(key, {**record, "networks": left}))
            raise CNIError(E_NETWORK, f"removing the additional networks of {handle} failed: {'; '.join(problems)}",
                           "everything else is removed; a repeated DEL retries these")
        store_call(lambda: kv.delete(key))

    # ------------------------------------------------------------ CHECK

    def _check(self, req: Request) -> tuple[int, str]:
        address = prev_result_address(req.config.get("prevResult"), req.ifname)
        problem = self.verify_netns(req.netns)
        if problem:
            raise CNIError(E_INVALID_NETNS, problem)
        problems = []
        with self._sessions.session() as (kv, ipam):
            record = store_call(lambda: kv.get(attachment_key(self.node, req.handle)))
            if record is None:
                problems.append(f"no attachment record for {req.handle} on node {self.node}")
            elif record.value.get("networks"):
                problems += self.multinet.check(ipam, record.value, req.container_id, req.netns, req.cni_path,
                                                MultinetConfig.from_netconf(req.config))
            held = store_call(lambda: ipam.lookup(req.handle))
            if held is None:
                problems.append(f"IPAM holds no address for {req.handle}")
            elif held.address != address:
                problems.append(f"IPAM holds {held.address} for {req.handle}, not {address} as prevResult says")
        try:
            problems += self.dataplane.check(req.container_id, req.ifname, req.netns, address)
        except Exception as e:
            problems.append(f"cannot inspect the pod interfaces: {e}")
        if problems:
            raise CNIError(E_CHECK_FAILED, f"CHECK of {req.handle} found problems: {'; '.join(problems)}")
        return 0, ""

    # ------------------------------------------------------------ STATUS

    def _status(self) -> tuple[int, str]:
        try:
            verdict = self.ready()
        except Exception as e:
            raise CNIError(E_NOT_READY, f"podnet agent readiness check failed: {e}") from None
        if verdict is not None:
            code, message = verdict
            raise CNIError(code if code in (E_NOT_READY, E_NOT_READY_LIMITED) else E_NOT_READY, message)
        try:
            with self._sessions.session() as (kv, ipam):
                kv.revision()
                # Every ADD would fail: the pools that serve this node have no address left.
                capacity = getattr(ipam, "capacity_problem", None)
                exhausted = capacity(self.node) if capacity is not None else None
        except Exception as e:
            raise CNIError(E_NOT_READY, f"the podnet store is not reachable: {e}") from None
        if exhausted:
            raise CNIError(E_NOT_READY, f"node {self.node} cannot take new pods: {exhausted}")
        # Every ADD would fail in the pod dataplane: say why now (e.g. an MTU a veth refuses).
        check = getattr(self.dataplane, "setup_problem", None)
        problem = check() if check is not None else None
        if problem:
            raise CNIError(E_NOT_READY, f"node {self.node} cannot set up pods: {problem}")
        return 0, ""

    # ------------------------------------------------------------ GC

    def _gc(self, req: Request) -> tuple[int, str]:
        valid = self._valid_attachments(req.config)
        valid_handles = {attachment_handle(req.network, cid, ifname) for cid, ifname in valid}
        failures: list[str] = []
        removed = 0
        config = MultinetConfig.from_netconf(req.config)
        with self._sessions.session() as (kv, ipam):
            records, _ = store_call(lambda: kv.list(node_attachments_prefix(self.node)))
            other_networks: set[tuple[str, str]] = set()
            for rec in records:
                value = rec.value
                cid, ifname = value.get("containerID", ""), value.get("ifname", "")
                if value.get("network") != req.network:
                    other_networks.add((cid, ifname))
                    continue
                if (cid, ifname) in valid:
                    valid_handles |= self.multinet.handles(value)  # its additional networks' addresses
                    continue
                try:
                    self._teardown(kv, ipam, cid, ifname, self._recorded_netns(value),
                                   value.get("handle") or rec.key.rpartition("/")[2], rec.key, value, req.cni_path,
                                   config)
                    removed += 1
                except CNIError as e:
                    failures.append(e.msg)
            # Interfaces without a record (the record was lost, or another agent made them).
            try:
                live = self.dataplane.attachments()
            except Exception as e:
                live = []
                failures.append(f"listing pod interfaces failed: {e}")
            for cid, ifname in live:
                if (cid, ifname) in valid or (cid, ifname) in other_networks:
                    continue
                try:
                    self.dataplane.delete(cid, ifname, None)
                    removed += 1
                except Exception as e:
                    failures.append(f"removing the pod interface {ifname} of {cid} failed: {e}")
            # Addresses without a record.
            removed += self._release_unkept(kv, ipam, f"{req.network}.", valid_handles, failures)
        log.info("CNI GC %s on %s: %d attachments kept, %d resources removed", req.network, self.node,
                 len(valid), removed)
        if failures:
            raise CNIError(E_DATAPLANE, f"GC removed what it could but {len(failures)} failed: {'; '.join(failures)}")
        return 0, ""

    @staticmethod
    def _valid_attachments(conf: dict[str, Any]) -> set[tuple[str, str]]:
        lists = [conf[k] for k in (VALID_ATTACHMENTS, VALID_ATTACHMENTS_OLD) if k in conf]
        if not lists:
            raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: GC needs {VALID_ATTACHMENTS}, the "
                           "attachments to keep")
        out: set[tuple[str, str]] = set()
        for items in lists:
            if not isinstance(items, list):
                raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: {VALID_ATTACHMENTS} must be a list")
            for item in items:
                if (not isinstance(item, dict) or not isinstance(item.get("containerID"), str)
                        or not isinstance(item.get("ifname"), str)):
                    raise CNIError(E_INVALID_CONFIG, f"invalid network configuration: every {VALID_ATTACHMENTS} "
                                   "entry needs containerID and ifname strings")
                out.add((item["containerID"], item["ifname"]))
        return out

    def _release_unkept(self, kv: KeyValueStore, ipam: Any, handle_prefix: str, keep: Container[str],
                        failures: list[str]) -> int:
        """GC: release this node's addresses whose handles start with handle_prefix and are not
        in keep; how many. A failure is noted in failures and the rest still go."""
        released = 0
        for handle in self._node_handles_under(kv, handle_prefix):
            if handle in keep:
                continue
            try:
                ipam.release(handle)
                released += 1
            except Exception as e:
                failures.append(f"releasing {handle} failed: {e}")
        return released

    def _node_handles_under(self, kv: KeyValueStore, handle_prefix: str) -> list[str]:
        """IPAM handles that start with handle_prefix and hold an address allocated for this node."""
        from urllib.parse import quote

        from podnet.ipam import block as blk
        from podnet.ipam import keys

        prefix = keys.HANDLES + quote(handle_prefix, safe="")
        records, _ = store_call(lambda: kv.list(prefix))
        out = []
        for rec in records:
            handle = keys.handle_of_key(rec.key)
            for cidr in rec.value.get("blocks", {}):
                block = store_call(lambda c=cidr: kv.get(keys.block_key(c)))
                if block is None:
                    continue
                if any(attrs.get("handle_id") == handle and (attrs.get("secondary") or {}).get("node") == self.node
                       for _, attrs in blk.allocations(block.value)):
                    out.append(handle)
                    break
        return out
