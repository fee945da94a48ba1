"""The SQLite store holds every object of the cluster: only its owner may read it."""

import os
import shutil
import stat
import subprocess

import pytest

from podnet.store import open_store


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_store_is_private_to_its_owner(tmp_path):
    path = tmp_path / "state" / "podnet.db"
    kv = open_store(f"sqlite://{path}")
    try:
        kv.put("/podnet/objects/Namespace/a", {"metadata": {"name": "a"}})
        assert mode(path.parent) == 0o700
        for f in (path, path.with_name("podnet.db-wal"), path.with_name("podnet.db-shm")):
            assert mode(f) & 0o077 == 0, f"{f} is {oct(mode(f))}"
    finally:
        kv.close()


def test_an_existing_store_readable_by_others_is_narrowed(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "podnet.db"
    open_store(f"sqlite://{path}").close()
    os.chmod(path, 0o644)
    open_store(f"sqlite://{path}").close()
    assert mode(path) == 0o600
    assert mode(tmp_path) == 0o755  # a directory it did not create is left as its owner set it


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to act as another user")
def test_another_user_cannot_read_it(tmp_path):
    os.chmod(tmp_path, 0o755)  # the directory is open: the file's own mode must keep it private
    path = tmp_path / "podnet.db"
    kv = open_store(f"sqlite://{path}")
    kv.put("/podnet/objects/Namespace/secret", {"metadata": {"name": "secret"}})
    kv.close()
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
                          capture_output=True)
    assert proc.returncode != 0 and b"Permission denied" in proc.stderr


WRITER = """
import sys, time
from podnet.store import open_store
kv = open_store(sys.argv[1])
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < end:
    kv.put(f"/podnet/objects/Namespace/w{i % 50}", {"metadata": {"name": f"w{i % 50}"}})
    i += 1
"""


def test_opening_the_store_again_while_another_process_writes(tmp_path):
    """Checking permissions must not open the file: closing any descriptor of it drops the
    POSIX locks SQLite holds through the process's other connections (a lab's store, opened
    again and again by the CLI and tests while agents and the endpoint controller write)."""
    import sys

    url = f"sqlite://{tmp_path / 'podnet.db'}"
    first = open_store(url)
    first.put("/podnet/objects/Namespace/a", {"metadata": {"name": "a"}})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url, "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        while writer.poll() is None:
            kv = open_store(url)
            try:
                kv.revision()
                first.put("/podnet/objects/Namespace/a", {"metadata": {"name": "a"}})
                first.list("/podnet/")
            finally:
                kv.close()
        assert writer.returncode == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=10)
        first.close()
