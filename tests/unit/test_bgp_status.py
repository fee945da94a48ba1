"""BIRD's control protocol and `show protocols all`, against a fake BIRD on a unix socket
speaking the bytes BIRD 2.0.12 sent (recorded from a real session)."""

import socket
import threading

import pytest

from podnet.bgp.control import BirdControl, BirdError, answers
from podnet.bgp.status import parse_protocols, sessions, unhealthy

SHOW_PROTOCOLS_ALL = """\
2002-Name       Proto      Table      State  Since         Info
1002-device1    Device     ---        up     2026-12-05 23:17:15
1006-
1002-podnet_kernel Kernel     master4    up     2026-12-05 23:17:15
1006-  Channel ipv4
     State:          UP
     Routes:         0 imported, 1 exported, 0 preferred
1002-Mesh_10_55_0_2 BGP        ---        up     2026-12-05 23:17:16  Established
1006-  BGP state:          Established
     Neighbor address: 10.55.0.2
     Neighbor AS:      64512
     Local AS:         64512
     Session:          internal multihop AS4
   Channel ipv4
     State:          UP
     Routes:         3 imported, 1 exported, 2 preferred
1002-Global_10_0_0_1 BGP        ---        start  2026-12-05 23:17:22  Active        Socket: Connection refused
1006-  BGP state:          Active
     Neighbor address: 10.0.0.1
     Neighbor AS:      65001
     Local AS:         64512
     Last error:       Socket: Connection refused
0000\x20
"""


class FakeBird:
    def __init__(self, path, replies):
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.replies = replies
        self.seen = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"0001 BIRD 2.0.12 ready.\n")
                buf = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        cmd = line.decode()
                        self.seen.append(cmd)
                        conn.sendall(self.replies.get(cmd, "9001 syntax error\n").encode())

    def close(self):
        self.srv.close()


@pytest.fixture
def fake(tmp_path):
    replies = {"show protocols all": SHOW_PROTOCOLS_ALL, "show status": "1000-BIRD 2.0.12\n0013 Daemon is up and running\n",
               "configure": "0002-Reading configuration from /x/bird.conf\n0003 Reconfigured\n"}
    f = FakeBird(tmp_path / "bird.ctl", replies)
    yield f, str(tmp_path / "bird.ctl")
    f.close()


def test_sessions_parsed(fake):
    _, path = fake
    found = sessions(path)
    assert [s.name for s in found] == ["Mesh_10_55_0_2", "Global_10_0_0_1"]
    mesh, tor = found
    assert mesh.established and mesh.neighbor == "10.55.0.2" and mesh.neighbor_as == 64512
    assert (mesh.imported, mesh.exported, mesh.preferred) == (3, 1, 2)
    assert mesh.since == "2026-12-05 23:17:16" and mesh.kind == "Mesh"
    assert not tor.established and tor.state == "Active" and tor.last_error == "Socket: Connection refused"
    assert tor.as_dict()["established"] is False
    assert unhealthy(found) == ("BIRD is not ready: BGP not established with 10.0.0.1 (Active: Socket: "
                                "Connection refused)")
    assert unhealthy([mesh]) is None


def test_control_commands_and_errors(fake):
    f, path = fake
    with BirdControl(path) as c:
        assert c.greeting == [(1, "BIRD 2.0.12 ready.")]
        assert c.command("configure")[-1] == (3, "Reconfigured")
        with pytest.raises(BirdError, match="refused `nonsense`: syntax error"):
            c.command("nonsense")
    assert answers(path)
    assert f.seen[-1] == "show status"


def test_no_bird_there(tmp_path):
    assert not answers(str(tmp_path / "none.ctl"))
    with pytest.raises(BirdError, match="does not answer"):
        BirdControl(str(tmp_path / "none.ctl"))


def test_parse_multiline_without_codes():
    reply = [(1002, "Node_10_0_0_1 BGP        ---        up     2026-01-01 00:00:00  Established"),
             (1006, "  BGP state:          Established"), (1006, "Neighbor address: 10.0.0.1"),
             (1006, "Routes:         10 imported, 2 filtered, 1 exported, 10 preferred")]
    (s,) = parse_protocols(reply)
    assert s.imported == 10 and s.exported == 1 and s.neighbor == "10.0.0.1"
