"""BGP sessions as BIRD reports them (`show protocols all`), parsed.

    1002-Mesh_10_0_0_12 BGP  ---  up  2026-12-05 23:17:16  Established
    1006-  BGP state:          Established
        Neighbor address: 10.0.0.12
        Neighbor AS:      64512
        Last error:       Connection closed
      Channel ipv4
        Routes:         1 imported, 1 exported, 1 preferred

`since` is in the time format the rendered configuration sets (`iso long`). A node is
healthy for BGP when every session is Established (what Calico's readiness checks);
the message names the peers that are not, as Calico's does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from podnet.bgp.control import command

_ROUTES = re.compile(r"(\d+) (imported|filtered|exported|preferred)")
_SINCE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)\s*(.*)")


@dataclass(frozen=True)
class Session:
    name: str  # BIRD's protocol name (Mesh_<ip>, Node_<ip>, Global_<ip>)
    state: str  # BGP state: Established, Active, Connect, OpenSent, Idle, ...
    since: str
    neighbor: str | None
    neighbor_as: int | None
    imported: int = 0
    exported: int = 0
    preferred: int = 0
    info: str = ""
    last_error: str | None = None

    @property
    def established(self) -> bool:
        return self.state == "Established"

    @property
    def kind(self) -> str:
        return self.name.split("_", 1)[0]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "established": self.established}


def parse_protocols(reply: list[tuple[int, str]]) -> list[Session]:
    """The BGP sessions of a `show protocols all` reply."""
    sessions: list[Session] = []
    current: dict[str, Any] | None = None

    def finish() -> None:
        if current is not None and current["proto"] == "BGP":
            sessions.append(Session(
                name=current["name"], state=current.get("bgp_state") or current["info"].split(" ")[0] or
                current["state"], since=current["since"], neighbor=current.get("neighbor"),
                neighbor_as=current.get("neighbor_as"), imported=current.get("imported", 0),
                exported=current.get("exported", 0), preferred=current.get("preferred", 0),
                info=current["info"], last_error=current.get("last_error")))

    for code, text in reply:
        if code == 1002:
            finish()
            parts = text.split(None, 4)
            if len(parts) < 4:
                current = None
                continue
            rest = parts[4] if len(parts) > 4 else ""
            m = _SINCE.match(rest)
            since, info = (m.group(1), m.group(2).strip()) if m else ("", rest.strip())
            current = {"name": parts[0], "proto": parts[1], "state": parts[3], "since": since,
                       "info": re.sub(r"\s+", " ", info)}
        elif code == 1006 and current is not None:
            line = text.strip()
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "BGP state":
                current["bgp_state"] = value
            elif key == "Neighbor address":
                current["neighbor"] = value
            elif key == "Neighbor AS" and value.isdigit():
                current["neighbor_as"] = int(value)
            elif key == "Last error":
                current["last_error"] = value
            elif key == "Routes":
                for n, what in _ROUTES.findall(value):
                    current[what] = current.get(what, 0) + int(n)
    finish()
    return sessions


def sessions(control_socket: str, timeout: float = 5.0) -> list[Session]:
    return parse_protocols(command(control_socket, "show protocols all", timeout))


def unhealthy(found: list[Session]) -> str | None:
    """None when every session is Established; else what a user sees (Calico's words)."""
    down = [s for s in found if not s.established]
    if not down:
        return None
    return "BIRD is not ready: BGP not established with " + ", ".join(
        f"{s.neighbor or s.name} ({s.state}{f': {s.last_error}' if s.last_error else ''})" for s in down)
