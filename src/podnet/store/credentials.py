"""How podnet authenticates to etcd: TLS files and a user name and password, named as etcdctl names them.

Every program that opens the store (`podnet`, the agent, the lab's processes, the DNS
server, the CNI server) takes the same options through `add_arguments` and
`from_args`, and `podnet.store.open_store` reads the environment when a caller
passes none. Each value comes from the first of:

    a flag            --cacert  --cert  --key  --user USER[:PASSWORD]  --password
    PODNET_ETCD_*     PODNET_ETCD_CACERT ... PODNET_ETCD_PASSWORD (podnet's store only)
    ETCDCTL_*         ETCDCTL_CACERT ... ETCDCTL_PASSWORD (what etcdctl reads)

A user name and password in the store URL (`etcds://USER:PASSWORD@HOST:PORT`) come
before all of them. The password never appears in a repr, an error or a log line.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from podnet.errors import PodnetError

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

FIELDS = ("cacert", "cert", "key", "user", "password")
TLS_FIELDS = ("cacert", "cert", "key")
FLAGS = {"cacert": "--cacert", "cert": "--cert", "key": "--key", "user": "--user", "password": "--password"}
# Looked up in this order: podnet's own names first, so a host whose ETCDCTL_* point at
# another etcd (Kubernetes' own, say) can still name podnet's.
ENV = {f: (f"PODNET_ETCD_{f.upper()}", f"ETCDCTL_{f.upper()}") for f in FIELDS}
# Argument destinations (`--key` is also `podnet delete --key`: a subcommand's option of
# the same dest would overwrite the global one).
DEST = {f: f"etcd_{f}" for f in FIELDS}


@dataclass(frozen=True)
class EtcdCredentials:
    """What a client shows etcd. `origin` says where each value came from (a flag, an
    environment variable, the store URL), for errors that tell the user what to change."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    origin: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        shown = [f"{f}={getattr(self, f)!r}" for f in FIELDS[:4] if getattr(self, f) is not None]
        if self.password is not None:
            shown.append("password=<hidden>")
        return f"EtcdCredentials({', '.join(shown)})"

    @property
    def tls_files(self) -> bool:
        return any(getattr(self, f) is not None for f in TLS_FIELDS)

    def where(self, name: str) -> str:
        """Where a value came from, as the user set it: "--cacert", "ETCDCTL_CACERT", "the store URL"."""
        return self.origin.get(name, FLAGS[name])

    def named(self, name: str) -> str:
        """`--cert /etc/podnet/etcd.pem`: the option and its file, for messages."""
        return f"{self.where(name)} {getattr(self, name)}"

    def over(self, other: EtcdCredentials) -> EtcdCredentials:
        """These values, and `other`'s where these have none."""
        values = {f: getattr(self, f) if getattr(self, f) is not None else getattr(other, f) for f in FIELDS}
        origin = {f: (self if getattr(self, f) is not None else other).where(f) for f in FIELDS
                  if values[f] is not None}
        return EtcdCredentials(**values, origin=origin)

    def checked(self) -> EtcdCredentials:
        """These credentials, or a PodnetError naming what is missing."""
        if self.user == "":
            raise PodnetError(f"etcd user name is empty ({self.where('user')})")
        if self.user is None and self.password is not None:
            raise PodnetError(f"an etcd password is set ({self.where('password')}) but no user: "
                              "give --user NAME (or ETCDCTL_USER) too")
        if self.user is not None and self.password is None:
            raise PodnetError(f"etcd user {self.user!r} has no password: give --user NAME:PASSWORD, --password "
                              "or ETCDCTL_PASSWORD, or NAME:PASSWORD@ in the store URL")
        if (self.cert is None) != (self.key is None):
            have, missing = ("cert", "key") if self.key is None else ("key", "cert")
            raise PodnetError(f"{self.where(have)} is set but {FLAGS[missing]} is not: a client certificate "
                              "needs its key (--cert and --key, or ETCDCTL_CERT and ETCDCTL_KEY)")
        return self

    def environment(self) -> dict[str, str]:
        """The variables that give a child process these credentials (never its command line,
        which every user on the host can read)."""
        return {ENV[f][0]: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}


def credentials(values: Mapping[str, str | None], origin: Mapping[str, str]) -> EtcdCredentials:
    """Values given at one level (the flags, one set of variables, the URL): a user
    `NAME:PASSWORD` is split there unless that level also gives a password, as etcdctl does."""
    values = {f: v for f, v in values.items() if v is not None}
    origin = {f: origin[f] for f in values}
    user = values.get("user")
    if user is not None and "password" not in values and ":" in user:
        values["user"], _, values["password"] = user.partition(":")
        origin["password"] = origin["user"]
    return EtcdCredentials(**values, origin=origin)


def from_env(env: Mapping[str, str] | None = None) -> EtcdCredentials:
    """PODNET_ETCD_* over ETCDCTL_*."""
    env = os.environ if env is None else env
    result = EtcdCredentials()
    for level in (1, 0):
        names = {f: ENV[f][level] for f in FIELDS}
        result = credentials({f: env.get(n) or None for f, n in names.items()}, names).over(result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """etcdctl's security flags, for a program that opens the store."""
    group = parser.add_argument_group("etcd TLS and authentication (etcds:// stores; also ETCDCTL_* variables)")
    group.add_argument("--cacert", dest=DEST["cacert"], metavar="FILE",
                       help="CA bundle that signs the etcd servers' certificates (default: the system's)")
    group.add_argument("--cert", dest=DEST["cert"], metavar="FILE", help="client certificate (PEM)")
    group.add_argument("--key", dest=DEST["key"], metavar="FILE", help="client certificate's key (PEM)")
    group.add_argument("--user", dest=DEST["user"], metavar="USER[:PASSWORD]", help="etcd user name")
    group.add_argument("--password", dest=DEST["password"], metavar="PASSWORD",
                       help="etcd password (ETCDCTL_PASSWORD keeps it off the command line)")


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> EtcdCredentials:
    """The flags `add_arguments` defined, over the environment."""
    flags = credentials({f: getattr(args, DEST[f], None) for f in FIELDS}, FLAGS)
    return flags.over(from_env(env))


# ---------------------------------------------------------------- TLS


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_if_readable(path: str, what: str) -> None:
    """Warn once per file (as ssh does for a private key) when other users can read it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # loading it reports the problem
    if not mode & 0o044:
        return
    with _warned_lock:
        if path in _warned:
            return
        _warned.add(path)
    log.warning("%s %s is readable by other users (mode %04o): anyone on this host can use it; "
                "`chmod 600 %s`", what, path, mode, path)


def _no_passphrase() -> bytes:
    raise PodnetError("encrypted keys are not supported")


def tls_context(creds: EtcdCredentials) -> ssl.SSLContext:
    """A client context that verifies the server against --cacert (else the system's CAs) and
    shows --cert/--key; a PodnetError naming the option and file if one cannot be used."""
    import ssl  # only a TLS store needs it

    try:
        ctx = ssl.create_default_context(cafile=creds.cacert)
    except (OSError, ssl.SSLError) as e:
        raise PodnetError(f"cannot use {creds.named('cacert')}: {_file_error(e)}") from None
    if creds.cert is not None and creds.key is not None:
        warn_if_readable(creds.key, "etcd client key")
        try:
            ctx.load_cert_chain(creds.cert, creds.key, password=_no_passphrase)
        except PodnetError as e:
            raise PodnetError(f"cannot use {creds.named('key')}: {e}") from None
        except (OSError, ssl.SSLError) as e:
            raise PodnetError(f"cannot use {creds.named('cert')} with {creds.named('key')}: "
                              f"{_file_error(e)}") from None
    return ctx


def _file_error(e: OSError) -> str:
    import ssl

    if isinstance(e, ssl.SSLError):
        reason = getattr(e, "reason", None) or str(e)
        if reason in ("KEY_VALUES_MISMATCH",):
            return "the key does not belong to the certificate"
        return f"not a usable PEM file ({reason})"
    return e.strerror or str(e)


__all__ = ["EtcdCredentials", "add_arguments", "credentials", "from_args", "from_env", "tls_context", "warn_if_readable"]
