"""One active kube-sync: leader election on a coordination.k8s.io/v1 Lease, as client-go's
leaderelection does it.

A candidate takes the Lease when nobody holds it or when its holder has not renewed it for
leaseDurationSeconds, measured on this candidate's own clock from the moment it saw the Lease
change (no two machines' clocks are compared). The leader renews every `retry` seconds; if it
cannot renew for `renew_deadline` seconds it stops leading (and kube-sync stops writing) before
any other candidate may take over (renew_deadline < duration). Every write is a compare-and-swap
on the Lease's resourceVersion, so two candidates never both win. On a clean stop the leader
releases the Lease (holder cleared, duration 1 s) so that another takes over at once.

`term` is the Lease's leaseTransitions after this candidate took it: a number that grows with
each change of leader, used by kube-sync to fence its writes to podnet's store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from podnet.kube.client import ApiError, Conflict, KubeClient, KubeError, NotFound, Resource

log = logging.getLogger("podnet.kube")

LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, *, duration: float = 15.0,
                 renew_deadline: float = 10.0, retry: float = 2.0):
        if not retry < renew_deadline < duration:
            raise ValueError("leader election needs retry < renew deadline < lease duration")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_deadline = renew_deadline
        self.retry = retry
        self.term = 0
        self.leading = threading.Event()
        self._observed_rv = ""
        self._observed_at = 0.0
        self._last_renew = 0.0

    # ------------------------------------------------------------ one attempt

    def try_acquire_or_renew(self) -> bool:
        now = micro_time()
        try:
            lease = self.client.get(LEASE, self.name, self.namespace)
        except NotFound:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
            try:
                created = self.client.create(LEASE, body, self.namespace)
            except Conflict:
                return False
            self._observe(created)
            self.term = 0
            return True
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        held_for = float(spec.get("leaseDurationSeconds") or self.duration)
        if holder and holder != self.identity and time.monotonic() < self._observed_at + held_for:
            return False  # another holds it and has renewed it within its duration
        transitions = int(spec.get("leaseTransitions") or 0)
        new_spec = {**spec, "holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                    "renewTime": now}
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = transitions + 1
        updated = {**lease, "spec": new_spec}
        try:
            out = self.client.replace(LEASE, updated)
        except Conflict:
            return False
        self._observe(out)
        self.term = int(new_spec.get("leaseTransitions") or 0)
        return True

    def _observe(self, lease: dict) -> None:
        rv = (lease.get("metadata") or {}).get("resourceVersion") or ""
        if rv != self._observed_rv:
            self._observed_rv = rv
            self._observed_at = time.monotonic()

    def release(self) -> None:
        """Give the Lease up (if still ours), so that another candidate takes it at once."""
        try:
            lease = self.client.get(LEASE, self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": micro_time()}
            self.client.replace(LEASE, lease)
            log.info("released the Lease %s/%s", self.namespace, self.name)
        except KubeError as e:
            log.warning("could not release the Lease %s/%s: %s", self.namespace, self.name, e)

    # ------------------------------------------------------------ the loop

    def run(self, lead: Callable[[threading.Event], None], stopping: threading.Event) -> None:
        """Campaign until elected, then call lead(lost) in a thread and renew until stopping or
        until renewing fails for renew_deadline (lost is set then, and lead must return)."""
        while not stopping.is_set():
            if self._attempt():
                break
            stopping.wait(self.retry)
        else:
            return
        log.info("%s leads (Lease %s/%s, term %d)", self.identity, self.namespace, self.name, self.term)
        self.leading.set()
        self._last_renew = time.monotonic()
        lost = threading.Event()
        worker = threading.Thread(target=lead, args=(lost,), name="lead", daemon=True)
        worker.start()
        try:
            while not stopping.wait(self.retry):
                if not worker.is_alive():
                    break
                if self._attempt():
                    self._last_renew = time.monotonic()
                elif time.monotonic() - self._last_renew > self.renew_deadline:
                    log.error("%s could not renew the Lease %s/%s for %.0f s: no longer leading", self.identity,
                              self.namespace, self.name, self.renew_deadline)
                    break
        finally:
            lost.set()
            self.leading.clear()
            worker.join(30)
            if stopping.is_set():
                self.release()

    def _attempt(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except ApiError as e:
            log.warning("Lease %s/%s: %s", self.namespace, self.name, e)
        except KubeError as e:
            log.warning("Lease %s/%s: the API server is not reachable: %s", self.namespace, self.name, e)
        return False
