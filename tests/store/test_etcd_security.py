"""EtcdStore against a real etcd over TLS with client-certificate auth and user auth on
(certificates made with openssl, users with etcdctl: tests.support.etcd): what works, and
the one-line error each misconfiguration gives, through the store and through `podnet`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from tests.store.conftest import WatchReader
from tests.support.etcd import PODNET_PASSWORD, EtcdCluster, free_ports

from podnet.store import StoreError, StoreUnavailable, open_store
from podnet.store.credentials import EtcdCredentials
from podnet.store.etcd import EtcdStore

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]

FAST = 5.0  # seconds: a misconfiguration is reported at once, not after the retry window


@pytest.fixture
def cluster(etcd1_tls_cluster: EtcdCluster) -> EtcdCluster:
    return etcd1_tls_cluster


@pytest.fixture
def key() -> str:
    return f"/podnet/test-security/{uuid.uuid4().hex[:12]}"


def tls_only(cluster: EtcdCluster, client: str = "client", **changes: str | None) -> EtcdCredentials:
    creds = cluster.credentials_for(None, client=client)
    return EtcdCredentials(**{"cacert": creds.cacert, "cert": creds.cert, "key": creds.key, **changes})


def with_user(cluster: EtcdCluster, user: str, password: str, client: str = "client", **changes: str | None,
              ) -> EtcdCredentials:
    return EtcdCredentials(**{**vars_of(tls_only(cluster, client)), "user": user, "password": password, **changes})


def vars_of(c: EtcdCredentials) -> dict[str, str | None]:
    return {f: getattr(c, f) for f in ("cacert", "cert", "key", "user", "password")}


def failing(fn, *args) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises((StoreError, StoreUnavailable)) as err:
        fn(*args)
    return err.value, time.monotonic() - started


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.fixture
def user(cluster: EtcdCluster) -> Iterator[tuple[str, str]]:
    """A user of this test's own (its role may use every key), removed afterwards."""
    name, password = f"u-{uuid.uuid4().hex[:8]}", f"pw:{uuid.uuid4().hex[:8]}@x"
    cluster.add_user(name, password, "/")
    yield name, password
    cluster.etcdctl("user", "delete", name)
    cluster.etcdctl("role", "delete", name)


# ---------------------------------------------------------------- what works


def test_tls_store_with_user_in_the_url(cluster, key):
    url = f"etcds://podnet:{quote(PODNET_PASSWORD, safe='')}@{cluster.endpoints[0]}"
    store = open_store(url, credentials=tls_only(cluster))
    try:
        assert store.url == f"etcds://{cluster.endpoints[0]}" and PODNET_PASSWORD not in repr(store)
        rev = store.create(key, {"over": "tls"})
        reader = WatchReader(store, key, rev)
        try:
            store.put(key, {"over": "tls", "n": 2})
            assert [e.value for e in reader.wait_for(2)] == [{"over": "tls"}, {"over": "tls", "n": 2}]
        finally:
            reader.stop(store)
    finally:
        store.close()


def test_etcdctl_endpoints_and_variables(cluster, key):
    """etcd://https://... as etcdctl's --endpoints, and every option from ETCDCTL_* variables."""
    creds = cluster.credentials
    env = {"ETCDCTL_CACERT": creds.cacert, "ETCDCTL_CERT": creds.cert, "ETCDCTL_KEY": creds.key,
           "ETCDCTL_USER": f"podnet:{PODNET_PASSWORD}"}
    from podnet.store.credentials import from_env

    store = open_store(f"etcd://https://{cluster.endpoints[0]}", credentials=from_env(env))
    try:
        assert store.tls and store.url.startswith("etcds://")
        assert store.put(key, {"n": 1}) == store.get(key).revision
    finally:
        store.close()


def test_one_unreachable_member_is_passed_over(cluster, key):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    store = EtcdStore([dead, *cluster.endpoints], tls=True, credentials=cluster.credentials)
    try:
        assert store.put(key, {"n": 1}) > 0
    finally:
        store.close()


# ---------------------------------------------------------------- TLS misconfigurations


def test_server_certificate_from_an_unknown_ca(cluster, key):
    creds = tls_only(cluster, cacert=cluster.pki.path("other-ca.pem"))
    store = EtcdStore(cluster.endpoints, tls=True, credentials=creds)
    try:
        err, took = failing(store.get, key)
    finally:
        store.close()
    text = one_line(err)
    assert text.startswith(f"etcd {cluster.endpoints[0]}: TLS: the server's certificate is not signed by a CA in "
                           f"--cacert {creds.cacert}")
    assert took < FAST


@pytest.mark.parametrize("client", ["untrusted", None])
def test_client_certificate_refused_is_a_refusal_not_an_unknown_outcome(cluster, key, client):
    """In TLS 1.3 the server refuses the client's certificate after the handshake: a write must
    still be reported as not done (and not retried for the whole retry window)."""
    creds = tls_only(cluster, client or "client", **({} if client else {"cert": None, "key": None}))
    store = EtcdStore(cluster.endpoints, tls=True, credentials=creds)
    try:
        err, took = failing(store.create, key, {"n": 1})
    finally:
        store.close()
    text = one_line(err)
    assert isinstance(err, StoreUnavailable) and "unknown" not in text
    assert text.startswith(f"etcd {cluster.endpoints[0]}: TLS: the server ended the connection after the handshake")
    if client:
        assert f"it does not accept the client certificate --cert {creds.cert}" in text
    else:
        assert "it requires a client certificate" in text
    assert took < FAST


def test_client_certificate_with_a_common_name_on_the_gateway(cluster, key):
    store = EtcdStore(cluster.endpoints, tls=True, credentials=cluster.credentials_for("podnet", PODNET_PASSWORD,
                                                                                          client="client-cn"))
    try:
        err, took = failing(store.get, key)
    finally:
        store.close()
    assert "refuses a client certificate whose subject has a Common Name" in one_line(err) and took < FAST


def test_unreachable_member(cluster):
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    store = EtcdStore([dead], tls=True, credentials=cluster.credentials)
    try:
        err, took = failing(store.revision)
    finally:
        store.close()
    assert one_line(err).startswith(f"etcd {dead}: cannot connect") and took < FAST


def test_plain_http_to_a_tls_member_and_tls_to_a_plain_one(cluster, etcd1_cluster):
    store = EtcdStore(cluster.endpoints)
    try:
        err, took = failing(store.revision)
    finally:
        store.close()
    assert one_line(err) == f"etcd {cluster.endpoints[0]}: closed a new connection without answering: if the " \
                            "endpoint serves TLS, write etcds://"
    assert took < FAST
    store = EtcdStore(etcd1_cluster.endpoints, tls=True, credentials=tls_only(cluster))
    try:
        err, took = failing(store.revision)
    finally:
        store.close()
    assert "TLS handshake failed" in one_line(err) and etcd1_cluster.endpoints[0] in str(err) and took < FAST


# ---------------------------------------------------------------- user auth


def test_wrong_password(cluster, key):
    wrong = "Wr0ng-" + uuid.uuid4().hex[:8]
    store = EtcdStore(cluster.endpoints, tls=True, credentials=with_user(cluster, "podnet", wrong))
    try:
        err, took = failing(store.get, key)
        assert wrong not in repr(store)
    finally:
        store.close()
    text = one_line(err)
    assert text == (f"etcd {cluster.endpoints[0]}: authentication as user 'podnet' failed: wrong user name or "
                    "password (from --password and --user)")
    assert wrong not in text and took < FAST


def test_no_user_for_a_server_with_auth_on(cluster, key):
    store = EtcdStore(cluster.endpoints, tls=True, credentials=tls_only(cluster))
    try:
        err, took = failing(store.get, key)
    finally:
        store.close()
    assert one_line(err).startswith(f"etcd {cluster.endpoints[0]} requires authentication (etcdserver: user name "
                                    "is empty): give --user NAME[:PASSWORD]")
    assert took < FAST


def test_a_refused_token_is_replaced_for_reads_writes_and_watches(cluster, user, key):
    """Changing a user's password invalidates its tokens ("invalid auth token"): the store
    authenticates again and repeats the call, and a watch that reconnects does too."""
    name, password = user
    store = EtcdStore(cluster.endpoints, tls=True, credentials=with_user(cluster, name, password))
    issued: list[str] = []
    authenticate = store._authenticate

    def counting() -> str:
        issued.append(authenticate())
        return issued[-1]

    store._authenticate = counting  # type: ignore[method-assign]
    reader = None
    try:
        rev = store.create(key, {"n": 0})
        reader = WatchReader(store, key, rev + 1)
        assert len(issued) == 1
        cluster.etcdctl("user", "passwd", name, "--interactive=false", input=password + "\n")
        assert store.get(key).value == {"n": 0}  # a read
        assert len(issued) == 2 and issued[0] != issued[1]
        cluster.etcdctl("user", "passwd", name, "--interactive=false", input=password + "\n")
        rev = store.put(key, {"n": 1})  # a write (a Txn)
        assert len(issued) == 3
        assert reader.wait_for(1)[0].revision == rev
        # The watch reconnects (its connection cut) with a token etcd no longer takes.
        cluster.etcdctl("user", "passwd", name, "--interactive=false", input=password + "\n")
        for conn in list(store._watch_conns):
            conn.sock.shutdown(socket.SHUT_RDWR)
        other = EtcdStore(cluster.endpoints, tls=True, credentials=with_user(cluster, name, password))
        try:
            rev2 = other.put(key, {"n": 2})
        finally:
            other.close()
        assert [e.revision for e in reader.wait_for(2)] == [rev, rev2]  # nothing lost, nothing twice
        assert len(issued) == 4
    finally:
        if reader is not None:
            reader.stop(store)
        store.close()


def test_a_user_limited_to_podnets_prefix(cluster, key):
    """A role granting readwrite on /podnet (all podnet writes: /podnet/ and /podnet-alloc/) is enough."""
    name, password = f"limited-{uuid.uuid4().hex[:8]}", "limited-pw"
    cluster.add_user(name, password, "/podnet")
    store = EtcdStore(cluster.endpoints, tls=True, credentials=with_user(cluster, name, password))
    try:
        rev = store.put(key, {"n": 1})
        assert store.revision() >= rev
        assert store.list(key)[0][0].value == {"n": 1}
        assert store.put("/podnet-alloc/test-security/" + key, {"n": 1}) > rev
        err, took = failing(store.put, "/elsewhere/" + key, {"n": 1})
        assert one_line(err) == (f"etcd {cluster.endpoints[0]}: etcdserver: permission denied for user {name!r} "
                                 "(its roles need readwrite on the prefix /podnet, which holds /podnet/ and "
                                 "/podnet-alloc/)")
        watch = store.watch("/elsewhere/", rev)
        started = time.monotonic()
        with pytest.raises(StoreError, match="permission denied"):
            next(watch)
        assert time.monotonic() - started < FAST
    finally:
        store.close()
        cluster.etcdctl("user", "delete", name)
        cluster.etcdctl("role", "delete", name)


def test_credentials_for_a_server_with_auth_off(etcd1_cluster, key):
    store = EtcdStore(etcd1_cluster.endpoints, credentials=EtcdCredentials(user="podnet", password="unused"))
    try:
        rev = store.put(key, {"n": 1})
        assert store.get(key).revision == rev
    finally:
        store.close()


# ---------------------------------------------------------------- through `podnet`


def podnet(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDCTL_", "PODNET_ETCD_", "PODNET_STORE"))}
    return subprocess.run([sys.executable, "-m", "podnet.cli.main", *argv], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)


def tls_flags(cluster: EtcdCluster, client: str = "client", cacert: str = "ca.pem") -> list[str]:
    cert, key = cluster.pki.pair(client)
    return ["--cacert", cluster.pki.path(cacert), "--cert", cert, "--key", key]


def test_cli_with_flags_and_with_variables(cluster):
    ep = cluster.endpoints[0]
    run = podnet("--store", f"etcds://{ep}", *tls_flags(cluster), "--user", f"podnet:{PODNET_PASSWORD}",
                 "get", "nodes")
    assert run.returncode == 0, run.stderr
    creds = cluster.credentials
    env = {"ETCDCTL_CACERT": creds.cacert, "ETCDCTL_CERT": creds.cert, "ETCDCTL_KEY": creds.key,
           "ETCDCTL_USER": "podnet", "ETCDCTL_PASSWORD": PODNET_PASSWORD, "PODNET_STORE": f"etcd://https://{ep}"}
    run = podnet("get", "nodes", env=env)
    assert run.returncode == 0, run.stderr
    assert "readable by other users" not in run.stderr


@pytest.mark.parametrize("case", ["unknown CA", "untrusted client certificate", "wrong password",
                                  "unreachable member"])
def test_cli_errors_are_one_line_naming_the_endpoint(cluster, case):
    ep = cluster.endpoints[0]
    password = quote(PODNET_PASSWORD, safe="")
    flags = tls_flags(cluster)
    if case == "unknown CA":
        flags = tls_flags(cluster, cacert="other-ca.pem")
    elif case == "untrusted client certificate":
        flags = tls_flags(cluster, client="untrusted")
    elif case == "wrong password":
        password = "Sekr3t-" + uuid.uuid4().hex[:8]
    elif case == "unreachable member":
        ep = f"127.0.0.1:{free_ports(1)[0]}"
    started = time.monotonic()
    run = podnet("--store", f"etcds://podnet:{password}@{ep}", *flags, "get", "nodes")
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: etcd {ep}")
    assert "Traceback" not in run.stderr and password not in run.stderr and PODNET_PASSWORD not in run.stderr
    assert time.monotonic() - started < 30  # a process start, then at once


def test_cli_warns_about_a_key_other_users_can_read(cluster, tmp_path):
    cert, key = cluster.pki.pair("client")
    readable = tmp_path / "client.key"
    readable.write_bytes(open(key, "rb").read())
    os.chmod(readable, 0o644)
    run = podnet("--store", f"etcds://{cluster.endpoints[0]}", "--cacert", cluster.pki.path("ca.pem"),
                 "--cert", cert, "--key", str(readable), "--user", f"podnet:{PODNET_PASSWORD}", "get", "nodes")
    assert run.returncode == 0, run.stderr
    assert f"etcd client key {readable} is readable by other users (mode 0644)" in run.stderr


def test_a_reopened_store_shares_the_token(cluster, user, key):
    """The agent's CNI sessions open more stores under a burst of ADDs: no Authenticate each."""
    from podnet.store import reopen

    name, password = user
    store = EtcdStore(cluster.endpoints, tls=True, credentials=with_user(cluster, name, password))
    try:
        store.put(key, {"n": 1})
        other = reopen(store)
        try:
            assert isinstance(other, EtcdStore) and other.credentials == store.credentials
            other._authenticate = lambda: pytest.fail("authenticated again")  # type: ignore[method-assign]
            assert other.get(key).value == {"n": 1}
        finally:
            other.close()
        assert store.get(key).value == {"n": 1}  # closing the other closed nothing of this one
    finally:
        store.close()
