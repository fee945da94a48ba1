"""The CNI requests' metrics (process-wide; the agent registers COLLECTORS):

    podnet_cni_request_duration_seconds{plugin,command,result}   the agent's time to answer one request

plugin: podnet-cni (the pod's interface) or podnet-ipam (the IPAM plugin of another
network's delegate); command: ADD, DEL, CHECK, STATUS, GC, VERSION (anything else: "other"); result: "ok" or
the name of the CNI error code the runtime got (spec.py), e.g. ipam_exhausted, try_again,
not_ready, invalid_netns, internal.
"""

from __future__ import annotations

from prometheus_client import Histogram

from podnet.cni import spec

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

RESULTS = {
    0: "ok",
    spec.E_INCOMPATIBLE_VERSION: "incompatible_version",
    spec.E_INVALID_ENV: "invalid_env",
    spec.E_IO: "io",
    spec.E_DECODING: "decoding",
    spec.E_INVALID_CONFIG: "invalid_config",
    spec.E_INVALID_NETNS: "invalid_netns",
    spec.E_TRY_AGAIN: "try_again",
    spec.E_NOT_READY: "not_ready",
    spec.E_NOT_READY_LIMITED: "not_ready_limited",
    spec.E_IPAM_EXHAUSTED: "ipam_exhausted",
    spec.E_IPAM: "ipam",
    spec.E_DATAPLANE: "dataplane",
    spec.E_CHECK_FAILED: "check_failed",
    spec.E_INTERNAL: "internal",
}

REQUEST_DURATION = Histogram(
    "podnet_cni_request_duration_seconds",
    "Time the agent took to answer one CNI request, by plugin, command and result (ok or the error code's name).",
    ["plugin", "command", "result"], buckets=BUCKETS, registry=None)


COLLECTORS = (REQUEST_DURATION,)


def observe(plugin: str, command: str, code: int, seconds: float) -> None:
    REQUEST_DURATION.labels(plugin, command if command in spec.COMMANDS else "other",
                            RESULTS.get(code, "error")).observe(seconds)
