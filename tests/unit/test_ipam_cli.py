"""`podnet ipam ...` as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from podnet.cli.ipam import parse_duration
from podnet.cli.main import main
from podnet.errors import PodnetError
from podnet.model.objects import IPPool, Node, Pod
from podnet.store.objects import ObjectStore
from podnet.store.sqlite import SQLiteStore


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    path = tmp_path / "cli.db"
    with SQLiteStore(str(path)) as kv:
        ObjectStore(kv).apply([
            IPPool.model_validate({"metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/27", "blockSize": 28}}),
            Node.model_validate({"metadata": {"name": "n1"}}),
        ])
    url = f"sqlite://{path}"
    monkeypatch.setenv("PODNET_STORE", url)
    return url


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_allocate_free_and_show(store_url, capsys):
    code, out, err = run(capsys, "ipam", "allocate", "--node", "n1", "--handle", "h1")
    first = out.strip()
    assert code == 0 and err == "" and first.startswith("10.0.0.") and "\n" not in first
    code, out, _ = run(capsys, "--store", store_url, "ipam", "allocate", "--node", "n1", "--handle", "h1")
    assert out.strip() == first  # idempotent
    run(capsys, "ipam", "allocate", "--node", "n2", "--handle", "h2", "--ip", "10.0.0.20")

    code, out, _ = run(capsys, "ipam", "show")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["POOL", "CIDR", "BLOCK", "BLOCKS", "USED", "TOTAL", "UTIL"]
    assert lines[1].split() == ["p", "10.0.0.0/27", "/28", "2/2", "2", "32", "6.2%"]
    assert any(line.split()[:2] == ["n2", "10.0.0.16/28"] and line.split()[-1] == "1/16" for line in lines)

    code, out, _ = run(capsys, "ipam", "show", "-o", "json")
    data = json.loads(out)
    assert data["pools"][0]["used"] == 2 and data["pools"][0]["utilisation"] == 6.25
    assert {b["node"] for b in data["blocks"]} == {"n1", "n2"}

    code, out, _ = run(capsys, "ipam", "free", "--handle", "h1")
    assert code == 0 and out.strip() == first
    code, out, _ = run(capsys, "ipam", "free", "--handle", "h1")
    assert code == 0 and "holds no address" in out


def test_allocate_errors_are_one_line(store_url, capsys):
    code, out, err = run(capsys, "ipam", "allocate", "--node", "n1", "--handle", "h", "--ip", "192.168.0.1")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: address 192.168.0.1") and "not in any IPPool" in err
    code, _, err = run(capsys, "ipam", "allocate", "--node", "n1", "--handle", "h", "--pool", "nope")
    assert code == 1 and err.count("\n") == 1 and "IPPool nope" in err
    for i in range(32):
        run(capsys, "ipam", "allocate", "--node", f"n{i % 2}", "--handle", f"x{i}")
    code, _, err = run(capsys, "ipam", "allocate", "--node", "n9", "--handle", "last")
    assert code == 1 and err.count("\n") == 1
    assert "node n9" in err and "IPPool p" in err


def test_check_exit_codes_and_release_leaked(store_url, capsys, tmp_path):
    code, out, _ = run(capsys, "ipam", "check")
    assert code == 0 and out.strip() == "no problems found"

    with SQLiteStore(store_url[len("sqlite://"):]) as kv:
        ObjectStore(kv).apply([Pod.model_validate({"metadata": {"name": "web", "namespace": "ns"},
                                                   "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}})])
    run(capsys, "ipam", "allocate", "--node", "n1", "--handle", "h", "--namespace", "ns", "--pod", "web")
    assert run(capsys, "ipam", "check")[0] == 0
    with SQLiteStore(store_url[len("sqlite://"):]) as kv:
        ObjectStore(kv).delete(Pod, "web", "ns")

    # Problems found: the command ran fine, exit 3 (1 is an error, 2 a usage mistake).
    code, out, _ = run(capsys, "ipam", "check")
    lines = out.splitlines()
    assert code == 3 and lines[0].split() == ["KIND", "MESSAGE"]
    assert lines[1].startswith("leaked-allocation   10.0.0.") and "pod ns/web no longer exists" in out
    code, out, _ = run(capsys, "ipam", "check", "-o", "json")
    assert code == 3 and json.loads(out)[0]["kind"] == "leaked-allocation"
    code, out, err = run(capsys, "ipam", "check", "--json")  # the old spelling still works
    assert code == 3 and json.loads(out)[0]["kind"] == "leaked-allocation" and "deprecated" in err

    code, out, _ = run(capsys, "ipam", "release", "--leaked", "--grace", "0s")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["RESULT", "ADDRESS", "HANDLE", "REASON"]
    assert lines[1].startswith("waiting   10.0.0.") and "released once seen leaked for 0s" in out
    code, out, _ = run(capsys, "ipam", "release", "--leaked", "--grace", "0")
    assert code == 0 and out.splitlines()[1].startswith("released   10.0.0.")
    code, out, _ = run(capsys, "ipam", "release", "--leaked", "--grace", "1h")
    assert code == 0 and out.strip() == "no leaked addresses"
    assert run(capsys, "ipam", "check")[0] == 0


def test_release_bad_input_is_a_one_line_error(store_url, capsys):
    code, out, err = run(capsys, "ipam", "release", "--leaked", "--grace", "15 minutes")
    assert code == 1 and err == "error: invalid duration '15 minutes': expected e.g. 90s, 15m, 1h or 1h30m\n"
    code, out, err = run(capsys, "ipam", "release")
    assert code == 1 and err.count("\n") == 1 and "--leaked" in err


def test_bad_store_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("PODNET_STORE", "nosuch://x")
    code, _, err = run(capsys, "ipam", "show")
    assert code == 1 and err.count("\n") == 1 and "unknown store URL" in err


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("0", 0), ("1.5m", 90), ("45", 45),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "15x", "-5m", "1h 30m", "15m3"])
def test_parse_duration_rejects(text):
    with pytest.raises(PodnetError, match="invalid duration"):
        parse_duration(text)
