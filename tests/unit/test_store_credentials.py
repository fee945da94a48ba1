"""etcd's TLS files, user and password: where each comes from, how URLs carry them, and
that the password shows nowhere. No etcd needed (tests/store/test_etcd_security.py has
the real ones)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from podnet.cli.main import build_parser
from podnet.errors import PodnetError
from podnet.store import credentials as cr
from podnet.store.credentials import EtcdCredentials
from podnet.store.etcd import EtcdStore
from podnet.store.url import etcd_target, open_store, redact

SECRET = "s3cr:et@pw,%"


def resolve(argv: list[str], env: dict[str, str]) -> EtcdCredentials:
    return cr.from_args(build_parser().parse_args([*argv, "get", "nodes"]), env)


def test_flags_over_podnet_variables_over_etcdctl_variables():
    env = {"ETCDCTL_CACERT": "/etcdctl/ca.pem", "ETCDCTL_USER": "bob:bobpw", "PODNET_ETCD_CACERT": "/podnet/ca.pem",
           "ETCDCTL_CERT": "/etcdctl/c.pem", "ETCDCTL_KEY": "/etcdctl/c.key"}
    creds = resolve([], env)
    assert (creds.cacert, creds.cert, creds.user, creds.password) == ("/podnet/ca.pem", "/etcdctl/c.pem", "bob", "bobpw")
    assert creds.where("cacert") == "PODNET_ETCD_CACERT" and creds.where("password") == "ETCDCTL_USER"
    creds = resolve(["--cacert", "/flag/ca.pem", "--user", "alice:alicepw"], env)
    assert (creds.cacert, creds.user, creds.password) == ("/flag/ca.pem", "alice", "alicepw")
    assert creds.where("cacert") == "--cacert" and creds.where("password") == "--user"


def test_user_and_password_split_as_etcdctl_does():
    # --password given: the user name is taken whole (it may then hold a colon).
    creds = resolve(["--user", "a:b", "--password", SECRET], {})
    assert (creds.user, creds.password) == ("a:b", SECRET)
    # USER:PASSWORD in a variable, the password of a flag over it.
    creds = resolve(["--password", "flagpw"], {"ETCDCTL_USER": "carol:envpw"})
    assert (creds.user, creds.password) == ("carol", "flagpw")
    creds = resolve([], {"ETCDCTL_USER": "dave", "ETCDCTL_PASSWORD": SECRET})
    assert (creds.user, creds.password) == ("dave", SECRET)


def test_global_key_flag_and_delete_key_do_not_collide():
    args = build_parser().parse_args(["--key", "/etc/podnet/etcd.key", "delete", "--key", "/podnet/objects/x"])
    assert args.etcd_key == "/etc/podnet/etcd.key"
    assert args.key == "/podnet/objects/x"


@pytest.mark.parametrize("values, expected", [
    ({"user": "u"}, "has no password"),
    ({"password": "p"}, "but no user"),
    ({"user": "", "password": "p"}, "user name is empty"),
    ({"cert": "/c.pem"}, "--cert is set but --key is not"),
    ({"key": "/c.key"}, "--key is set but --cert is not"),
])
def test_incomplete_credentials_say_what_is_missing(values, expected):
    with pytest.raises(PodnetError, match=expected):
        EtcdCredentials(**values).checked()


def test_the_url_carries_a_percent_encoded_user_and_password_and_loses_them():
    clean, endpoints, tls, creds = etcd_target("etcds://podnet:s3cr%3Aet%40pw%2C%25@10.0.0.1:2379,10.0.0.2:2379",
                                               EtcdCredentials())
    assert clean == "etcds://10.0.0.1:2379,10.0.0.2:2379"
    assert endpoints == ["10.0.0.1:2379", "10.0.0.2:2379"] and tls
    assert (creds.user, creds.password) == ("podnet", SECRET)
    assert creds.where("password") == "the store URL"
    # An unencoded @ in the password is taken too (a host never holds one).
    assert etcd_target("etcd://u:p@ss@h:1", EtcdCredentials())[3].password == "p@ss"
    # The URL's user over a flag's; a user without a password in the URL takes the given one.
    given = EtcdCredentials(user="other", password="given")
    assert etcd_target("etcd://alice@h:1", given)[3].user == "alice"
    assert etcd_target("etcd://alice@h:1", given)[3].password == "given"


def test_etcdctl_endpoints_and_schemes():
    assert etcd_target("etcd://https://h1:2379,https://h2:2379", EtcdCredentials())[:3] == (
        "etcds://h1:2379,h2:2379", ["https://h1:2379", "https://h2:2379"], True)
    assert etcd_target("etcd://http://h1:2379", EtcdCredentials())[2] is False
    with pytest.raises(PodnetError, match="etcds:// is TLS"):
        etcd_target("etcds://http://h1:2379", EtcdCredentials())
    with pytest.raises(PodnetError, match="mix http:// and https://"):
        EtcdStore(["https://h1:2379", "http://h2:2379"])


def test_the_password_is_in_no_repr_url_or_error(tmp_path):
    creds = EtcdCredentials(user="podnet", password=SECRET)
    assert SECRET not in repr(creds) and "password=<hidden>" in repr(creds)
    store = open_store("etcd://podnet:s3cr%3Aet%40pw%2C%25@127.0.0.1:1", credentials=EtcdCredentials())
    try:
        assert SECRET not in repr(store) and "s3cr" not in store.url
        assert store.credentials.password == SECRET
    finally:
        store.close()
    assert redact("etc://podnet:s3cr%3Aet@h:1") == "etc://podnet:***@h:1"
    with pytest.raises(PodnetError) as err:
        open_store("etc://podnet:s3cr%3Aet@h:1")
    assert "s3cr" not in str(err.value)


def test_tls_files_for_a_plain_store():
    # Given for podnet: a mistake. ETCDCTL_* may name another etcd's: etcdctl ignores them for http://.
    with pytest.raises(PodnetError, match="--cacert is for TLS, but the store etcd://h:1 is plain HTTP"):
        open_store("etcd://h:1", credentials=EtcdCredentials(cacert="/ca.pem"))
    with pytest.raises(PodnetError, match="PODNET_ETCD_CACERT is for TLS"):
        open_store("etcd://h:1", credentials=cr.from_env({"PODNET_ETCD_CACERT": "/ca.pem"}))
    open_store("etcd://h:1", credentials=cr.from_env({"ETCDCTL_CACERT": "/ca.pem"})).close()


def test_unusable_tls_files_name_the_option(tmp_path):
    with pytest.raises(PodnetError, match=f"cannot use ETCDCTL_CACERT {tmp_path}/none.pem: No such file"):
        open_store("etcds://h:1", credentials=cr.from_env({"ETCDCTL_CACERT": f"{tmp_path}/none.pem"}))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(PodnetError, match="cannot use --cacert .*junk.pem: not a usable PEM file"):
        open_store("etcds://h:1", credentials=EtcdCredentials(cacert=str(tmp_path / "junk.pem")))


def test_child_environment_gives_the_same_credentials():
    creds = EtcdCredentials(cacert="/ca", cert="/c", key="/k", user="u", password=SECRET)
    env = creds.environment()
    assert set(env) == {"PODNET_ETCD_CACERT", "PODNET_ETCD_CERT", "PODNET_ETCD_KEY", "PODNET_ETCD_USER",
                        "PODNET_ETCD_PASSWORD"}
    assert cr.from_env(env) == creds


def _make_key(path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{path}.key", "-out",
                    f"{path}.pem", "-days", "1", "-subj", "/O=podnet"], check=True, capture_output=True)


def test_a_key_other_users_can_read_is_warned_about_once(tmp_path, caplog):
    base = tmp_path / "client"
    _make_key(base)
    key = f"{base}.key"
    creds = EtcdCredentials(cert=f"{base}.pem", key=key)
    os.chmod(key, 0o600)
    with caplog.at_level(logging.WARNING, logger="podnet.store.credentials"):
        cr.tls_context(creds)
        assert not caplog.records
        os.chmod(key, 0o640)
        cr.tls_context(creds)
        cr.tls_context(creds)
    assert len(caplog.records) == 1
    assert f"{key} is readable by other users (mode 0640)" in caplog.records[0].getMessage()


def test_every_program_that_opens_the_store_takes_the_same_flags():
    for module in ("podnet.cli.main", "podnet.dns.server", "podnet.cni.serve", "podnet.lab.endpointcontroller"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for flag in ("--cacert", "--cert", "--key", "--user", "--password"):
            assert flag in out.stdout, (module, flag)
