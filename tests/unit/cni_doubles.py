"""A stand-in for the pod dataplane in CNI tests that need no kernel."""

from __future__ import annotations

import threading

from podnet.dataplane.pods import PodInterfaces


class RecordingDataplane:
    """Test double for podnet.dataplane.pods.PodDataplane: records every call and keeps the
    interfaces it "made". Container IDs in fail_add / fail_delete make those calls raise."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.live: dict[tuple[str, str], tuple[str, str]] = {}  # (cid, ifname) -> (netns, address)
        self.fail_add: set[str] = set()
        self.fail_delete: set[str] = set()
        self._lock = threading.Lock()

    def add(self, container_id: str, ifname: str, netns: str, address: str) -> PodInterfaces:
        with self._lock:
            self.calls.append(("add", container_id, ifname, netns, address))
            if container_id in self.fail_add:
                raise RuntimeError("cannot create veth: device or resource busy")
            self.live[(container_id, ifname)] = (netns, address)
        return PodInterfaces(f"pn{container_id[:11]}", "ee:ee:ee:ee:ee:ee", ifname, "0a:58:0a:f4:00:05",
                              netns, 1450, address)

    def delete(self, container_id: str, ifname: str, netns: str | None) -> None:
        with self._lock:
            self.calls.append(("delete", container_id, ifname, netns))
            if container_id in self.fail_delete:
                raise RuntimeError("netlink: operation not permitted")
            self.live.pop((container_id, ifname), None)

    def check(self, container_id: str, ifname: str, netns: str, address: str) -> list[str]:
        got = self.live.get((container_id, ifname))
        if got is None:
            return [f"host interface for {container_id} is missing"]
        if got[1] != address:
            return [f"pod interface lacks {address}/32"]
        return []

    def attachments(self) -> list[tuple[str, str]]:
        return list(self.live)
