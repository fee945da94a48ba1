"""BIRD's control socket: the protocol `birdc` speaks, without starting birdc.

BIRD greets with `0001 BIRD <version> ready.`; each command's reply is lines of a
four-digit code and text: `CODE-text` (more follows), ` text` (more of the same code)
and `CODE text` (the last line). Codes from 8000 are errors (8xxx run-time, 9xxx
parse). A reply is returned as [(code, text), ...].
"""

from __future__ import annotations

import socket
import time

from podnet.errors import PodnetError

DEFAULT_TIMEOUT = 10.0


class BirdError(PodnetError):
    """BIRD refused a command, or its control socket does not answer."""


class BirdControl:
    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise BirdError(f"BIRD's control socket {path} does not answer: {e.strerror or e}") from None
        self._buf = b""
        try:
            self.greeting = self._reply()
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BirdControl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _line(self) -> str:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except OSError as e:
                raise BirdError(f"reading from BIRD's control socket {self.path}: {e.strerror or e}") from None
            if not chunk:
                raise BirdError(f"BIRD closed its control socket {self.path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")

    def _reply(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        code = 0
        while True:
            line = self._line()
            if line[:4].isdigit() and len(line) >= 5 and line[4] in "- ":
                code = int(line[:4])
                out.append((code, line[5:]))
                if line[4] == " ":
                    return out
            else:  # a continuation of the same code: " text"
                out.append((code, line[1:] if line.startswith(" ") else line))

    def command(self, text: str) -> list[tuple[int, str]]:
        """One command and its whole reply; BirdError if BIRD answers with an error code."""
        if "\n" in text:
            raise ValueError("one line per command")
        try:
            self.sock.sendall(text.encode() + b"\n")
        except OSError as e:
            raise BirdError(f"writing to BIRD's control socket {self.path}: {e.strerror or e}") from None
        reply = self._reply()
        errors = [t for c, t in reply if c >= 8000]
        if errors:
            raise BirdError(f"BIRD refused `{text}`: {'; '.join(errors)}")
        return reply


def command(path: str, text: str, timeout: float = DEFAULT_TIMEOUT) -> list[tuple[int, str]]:
    with BirdControl(path, timeout) as c:
        return c.command(text)


def answers(path: str, timeout: float = 2.0) -> bool:
    """Whether a BIRD answers on this control socket."""
    try:
        with BirdControl(path, timeout) as c:
            c.command("show status")
        return True
    except BirdError:
        return False


def wait_answers(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if answers(path, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
