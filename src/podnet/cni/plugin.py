"""podnet-cni: the CNI plugin executable (CNI spec 1.1).

A thin client. It answers VERSION itself, and sends every other request to the
node agent over a unix socket: one JSON document
    {"env": {every CNI_* variable}, "stdin": <the network configuration, as text>}
then half-closes and reads the agent's one-document answer
    {"code": <int>, "output": <text for stdout>}.
The output goes to stdout unchanged; the exit status is 0 when code is 0, else 1.

The runtime runs this file for every pod, so it starts as `python -IS` and imports
only the C cores of json, socket and os (_json, _socket, posix): they load in well
under a millisecond, where json and socket themselves pull in re, enum, selectors
and collections (about 30 ms on a small node). No podnet package, no site-packages.
It never prints a traceback: whatever happens, stdout holds a CNI error document:
    {"cniVersion": ..., "code": N, "msg": ..., "details": ...}

Errors produced here (the agent produces the rest):
    4   CNI_COMMAND missing or unknown
    5   stdin could not be read
    6   stdin is not UTF-8 JSON, or not a JSON object
    7   agentSocket / agentTimeout in the network configuration are invalid
    11  the agent is not reachable: no socket, connection refused, or no answer in time
    999 anything unexpected (a malformed answer from the agent, a bug here)
"""

try:
    import _json
    import _socket as socket
    import posix as os
except ImportError:  # not CPython: the full modules do the same, only slower to import
    import json as _json
    import os
    import socket

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LATEST = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")
DEFAULT_SOCKET = "/run/podnet/cni.sock"  # the agent's default too (podnet agent --socket)
CONNECT_TIMEOUT = 5.0  # seconds to get a connection: the agent accepts at once when it runs
DEFAULT_REPLY_TIMEOUT = 120.0  # seconds for the agent's answer (an ADD may wait on the store)
MAX_REPLY = 16 << 20
SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, without the terminating NUL


# ---------------------------------------------------------------- JSON on the C scanner


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class _Context:
    """What _json.make_scanner reads from a JSONDecoder (standard JSON: NaN and Infinity refused)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_reject_constant)


_WHITESPACE = " \t\n\r"


def _position(text, index):
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)
    return f"line {line} column {column} (char {index})"


def loads(text):
    """json.loads, for text: raises ValueError (or RecursionError) on anything that is not one JSON value."""
    if hasattr(_json, "loads"):  # the json module itself (the fallback import)
        return _json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _json.make_scanner(_Context)(text, start)
    except StopIteration as e:
        raise ValueError(f"Expecting value: {_position(text, e.value)}") from None
    except SystemError:
        # The C scanner builds its error from json.decoder, but only finds it if it is imported
        # already: import it now (errors only) and let it say what is wrong.
        import json

        json.loads(text, parse_constant=_reject_constant)
        raise ValueError("invalid JSON") from None
    rest = len(text) - len(text[end:].lstrip(_WHITESPACE))
    if rest < len(text):
        raise ValueError(f"Extra data: {_position(text, rest)}")
    return value


def dumps(value):
    """json.dumps for what this plugin writes: dicts with str keys, lists, str, int, bool, None."""
    if hasattr(_json, "dumps"):  # the json module itself (the fallback import)
        return _json.dumps(value)
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# ---------------------------------------------------------------- the plugin


def error_document(code, msg, details="", version=LATEST):
    return dumps({"cniVersion": version, "code": code, "msg": msg, "details": details})


class _Fail(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def _read_all(fd):
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        except OSError as e:
            raise _Fail(5, f"error reading the network configuration from stdin: {e.strerror or e}") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _requested_version(raw):
    """The cniVersion a VERSION request names, if it is one this plugin speaks."""
    try:
        conf = loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return LATEST
    version = conf.get("cniVersion") if isinstance(conf, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST


def _decode_config(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Fail(6, f"error decoding the network configuration: stdin is not UTF-8 text ({e.reason} "
                       f"at byte {e.start})") from None
    try:
        conf = loads(text)
    except ValueError as e:
        raise _Fail(6, f"error decoding the network configuration: {e}") from None
    except RecursionError:
        raise _Fail(6, "error decoding the network configuration: JSON nested too deeply") from None
    if not isinstance(conf, dict):
        raise _Fail(6, "error decoding the network configuration: expected a JSON object, got "
                       f"{type(conf).__name__ if conf is not None else 'null'}")
    return text, conf


def _agent_settings(conf):
    path = conf.get("agentSocket", DEFAULT_SOCKET)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise _Fail(7, "invalid network configuration field agentSocket: expected a non-empty socket path")
    if len(path.encode("utf-8", "surrogateescape")) > SUN_PATH_MAX:
        raise _Fail(7, f"invalid network configuration field agentSocket: {path!r} is longer than "
                       f"{SUN_PATH_MAX} bytes, the limit for a unix socket path")
    timeout = conf.get("agentTimeout", DEFAULT_REPLY_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise _Fail(7, "invalid network configuration field agentTimeout: expected seconds, "
                       "a number above 0 and at most 3600")
    return path, float(timeout)


def _unreachable(path, reason):
    return _Fail(11, f"podnet agent not reachable at {path}: {reason}",
                 "is the podnet agent running on this node? The runtime may retry.")


def _ask_agent(path, timeout, request):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except TimeoutError:
            raise _unreachable(path, f"no connection within {CONNECT_TIMEOUT:g} s") from None
        except OSError as e:
            raise _unreachable(path, e.strerror or str(e)) from None
        sock.settimeout(timeout)
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise _unreachable(path, f"request not taken within {timeout:g} s") from None
        except OSError:
            pass  # the agent may have answered early (a refused request) and closed: read its answer
        chunks = []
        size = 0
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise _unreachable(path, f"no answer within {timeout:g} s") from None
            except OSError as e:
                raise _unreachable(path, f"connection lost: {e.strerror or e}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_REPLY:
                raise _Fail(999, f"podnet agent at {path} sent an answer larger than {MAX_REPLY} bytes")
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks)


def _parse_reply(path, data):
    if not data:
        raise _unreachable(path, "the agent closed the connection without answering")
    try:
        reply = loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        reply = None
    if (not isinstance(reply, dict) or not isinstance(reply.get("code"), int)
            or isinstance(reply.get("code"), bool) or not isinstance(reply.get("output"), str)):
        raise _Fail(999, f"podnet agent at {path} sent a malformed answer")
    code, output = reply["code"], reply["output"]
    if code != 0 and not _is_error_document(output):
        # Whatever the agent said, stdout on failure must be a CNI error document.
        raise _Fail(code, output.strip() or f"podnet agent failed with code {code}")
    return code, output


def _is_error_document(text):
    try:
        doc = loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("code"), int) and not isinstance(doc.get("code"), bool)


def run(env, stdin_fd=0):
    """(exit status, text for stdout) for one invocation."""
    version = LATEST
    try:
        command = env.get("CNI_COMMAND", "")
        if not command:
            raise _Fail(4, "required environment variable CNI_COMMAND is missing",
                        f"expected one of {', '.join(COMMANDS)}")
        if command not in COMMANDS:
            raise _Fail(4, f"unknown CNI_COMMAND {command!r}", f"expected one of {', '.join(COMMANDS)}")
        raw = _read_all(stdin_fd)
        if command == "VERSION":
            answer = {"cniVersion": _requested_version(raw), "supportedVersions": SUPPORTED_VERSIONS}
            return 0, dumps(answer)
        text, conf = _decode_config(raw)
        if conf.get("cniVersion") in SUPPORTED_VERSIONS:
            version = conf["cniVersion"]
        path, timeout = _agent_settings(conf)
        cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
        request = dumps({"env": cni_env, "stdin": text}).encode("utf-8", "surrogateescape")
        code, output = _parse_reply(path, _ask_agent(path, timeout, request))
        return (0 if code == 0 else 1), output
    except _Fail as e:
        return 1, error_document(e.code, e.msg, e.details, version)


def _write(fd, data):
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        except OSError:
            return  # nobody reads our stdout any more: the exit status still tells
        data = data[n:]


def _environment():
    env = os.environ
    if env and isinstance(next(iter(env)), bytes):  # posix.environ: decode as os.environ does
        return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape") for k, v in env.items()}
    return dict(env)


def main():
    try:
        status, output = run(_environment())
    except BaseException as e:  # a plugin must answer in JSON, whatever happened
        status, output = 1, error_document(999, f"podnet-cni failed unexpectedly: {type(e).__name__}: {e}")
    if output:
        _write(1, output.encode("utf-8", "replace") + (b"" if output.endswith("\n") else b"\n"))
    os._exit(status)


if __name__ == "__main__":
    main()
