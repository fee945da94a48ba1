"""`podnet node cleanup`: remove everything podnet programmed in this network namespace
(a node leaving podnet, or an uninstall), and nothing else.

What podnet writes on a node, and how each is recognised as podnet's:

- nftables tables named `podnet-*` (any family): Services, NetworkPolicy, natOutgoing,
  the DNS NOTRACK table (and a lab's `podnet-lab`);
- routes of protocol 88 (cross-node: `dataplane/routing.py` RTPROT_PODNET) and 89 (local
  pods' /32s, RTPROT_PODNET_POD) in the main table;
- the VXLAN device `pn-vxlan`, with its neighbour and FDB entries;
- pods' host-side veths: named `pn<hash>` with the alias `podnet:<container>/<ifname>`
  (their pod ends go with them: the node should be drained first);
- the node DNS addresses on `lo`: the /32s the NOTRACK table names, and 169.254.20.10
  (plus any given with --dns-address/--cluster-dns-ip);
- kube-proxy-style iptables chains (`--service-proxy iptables`), when podnet's own jumps
  to them are in the built-in chains (kube-proxy's carry a comment: never touched);
- BIRD (a node with BGP): the daemon the agent started from `<socket>.bird/` (it outlives
  the agent by design: stopped here), the routes it installed (protocol 12, `persist`
  keeps them after BIRD stops; only when that directory shows BIRD was podnet's), and
  the directory;
- the eBPF dataplanes (`--service-proxy ebpf`, `--policy-dataplane ebpf`): tc filters
  named `podnet_*` on any interface, and the pins of this namespace's agents
  (`<bpffs>/podnet/<node>-<netns inode>/`, ebpf/bpffs.py; with them the pinned links of
  the Service socket programs on the cgroup2 root, which unpinning detaches);
- the agent's files next to its CNI socket: the socket, `.synced`, `.lock`;
- on an ENI node (eni/routing.py): the `ip rule`s of protocol 0xe1 (each pod's two), the
  routes of that protocol in the per-ENI tables (100 + device index), and the ENI links
  those tables name left ready to detach: down, without the addresses podnet put on them.

Left alone: sysctls (ip_forward stays on), conntrack entries, the CNI plugin binary and
network configuration files, and everything in the store (IPAM blocks and addresses of
the node: `podnet ipam release --leaked`).

It refuses to run while an agent runs on the node (it holds `<socket>.lock`, or answers
on the socket) or a DNS server listens on a node DNS address, unless forced: the agent
would program it all again. Every step reads the kernel first, so a second run finds
nothing to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podnet.dataplane.localdns import DNS_TABLE
from podnet.dataplane.nft import list_tables, nft_apply, nft_json
from podnet.dataplane.nftables import Table, Transaction
from podnet.dataplane.pods import ALIAS_PREFIX, HOST_PREFIX
from podnet.dataplane.routing import RTPROT_PODNET, RTPROT_PODNET_POD, VXLAN_IFNAME
from podnet.dataplane.rtnl import RTN_BLACKHOLE, Rtnl, route_request
from podnet.dns.resolvconf import NODE_DNS_ADDRESS
from podnet.errors import PodnetError

TABLE_PREFIX = "podnet-"
AGENT_FILES = ("", ".synced", ".synced.tmp", ".lock", ".snapshot")  # suffixes of the CNI socket's path
BIRD_DIR = ".bird"  # the agent's BIRD files: `<socket>.bird/` (bird.pid, bird.ctl, bird.conf, ...)
RTPROT_BIRD = 12  # what BIRD's kernel protocol marks its routes with


class StillRunning(PodnetError):
    """podnet still runs on this node: cleaning up now would be undone, or cut it off."""


@dataclass
class Step:
    what: str  # "nft table ip podnet-svc", "route 10.244.0.64/26 (protocol 88)", ...
    run: Callable[[], None]


@dataclass
class Report:
    done: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # found, not podnet's to remove


@dataclass
class NodeCleanup:
    """What to look for; `plan()` lists the steps, `run()` takes them."""

    socket: str
    dns_addresses: tuple[str, ...] = ()  # besides those the NOTRACK table names and 169.254.20.10
    iptables: str = "iptables"

    # -- is podnet still running here?

    def running(self) -> list[str]:
        """Why cleaning up now would be wrong: an agent or a node DNS server still runs."""
        why = []
        holder = _lock_holder(self.socket + ".lock")
        if holder is not None:
            why.append(f"a podnet agent{f' (pid {holder})' if holder else ''} runs on this node "
                       f"(it holds {self.socket}.lock)")
        elif _answers(self.socket):
            why.append(f"a process serves the CNI socket {self.socket} (a podnet agent?)")
        listening = [f"{a}:53" for a in self._dns_candidates(list_tables(TABLE_PREFIX)) if _udp_listening(a, 53)]
        if listening:
            why.append(f"a DNS server listens on {', '.join(listening)} (the node's `podnet dns serve`?)")
        return why

    # -- what is there

    def plan(self) -> list[Step]:
        """Every step, read from the kernel now (the later steps are read again as they run)."""
        return [*self._bird_steps(), *self._table_steps(), *self._ebpf_steps(), *self._link_steps(),
                *self._route_steps(),
                *self._eni_steps(), *self._address_steps(), *self._iptables_steps(), *self._file_steps()]

    def run(self, say: Callable[[str], None] = lambda _: None) -> Report:
        """Take every step; each group is read from the kernel when its turn comes (links go
        before routes: a pod's /32 goes with its veth)."""
        report = Report()
        tables = list_tables(TABLE_PREFIX)
        dns = self._dns_candidates(tables)  # before the NOTRACK table naming them goes
        for group in (self._bird_steps, self._table_steps, self._ebpf_steps, self._link_steps, self._route_steps,
                      self._eni_steps,
                      lambda: self._address_steps(dns), self._iptables_steps, self._file_steps):
            for step in group():
                try:
                    step.run()
                except (OSError, NetlinkError, PodnetError, subprocess.SubprocessError) as e:
                    report.errors.append(f"{step.what}: {e}")
                    continue
                report.done.append(step.what)
                say(f"removed {step.what}")
        report.left = self.left_alone()
        return report

    def left_alone(self) -> list[str]:
        """What looks like Service chains but is not podnet's (kube-proxy's, with its comments)."""
        if self._iptables_ours() or shutil.which(self.iptables + "-save") is None:
            return []
        chains = _iptables_chains(self.iptables, "nat")
        kube = sorted(c for c in chains if c.startswith("KUBE-"))
        return [f"iptables nat chains {', '.join(kube[:3])}{' ...' if len(kube) > 3 else ''} "
                "(no podnet jumps to them: kube-proxy's?)"] if kube else []

    # -- BIRD

    @property
    def bird_dir(self) -> str:
        return self.socket + BIRD_DIR

    def _bird_steps(self) -> list[Step]:
        pid = _bird_pid(self.bird_dir)
        return [Step(f"BIRD (pid {pid}, {self.bird_dir})", lambda: _stop_bird(self.bird_dir))] if pid else []

    # -- nftables

    def _table_steps(self) -> list[Step]:
        return [Step(f"nft table {family} {name}", lambda f=family, n=name: _delete_table(f, n))
                for family, name in list_tables(TABLE_PREFIX)]

    def _dns_candidates(self, tables: list[tuple[str, str]]) -> list[str]:
        named = _notrack_addresses() if ("ip", DNS_TABLE) in tables else []
        out = []
        for a in (NODE_DNS_ADDRESS, *named, *self.dns_addresses):
            if a not in out:
                out.append(a)
        return out

    # -- eBPF programs and pins

    def _ebpf_steps(self) -> list[Step]:
        from podnet.ebpf import attach
        from podnet.ebpf.bpffs import mounted_pin_roots

        with IPRoute() as ipr:
            steps = [Step(f"tc filter {f.name} on {f.ifname} {f.direction}",
                          lambda f=f: _del_filter(f.ifindex, f.direction, f.prio)) for f in attach.podnet_filters(ipr)]
        inode = os.stat("/proc/self/ns/net").st_ino
        for root in mounted_pin_roots():
            for d in sorted(root.glob(f"*-{inode}")):
                steps.append(Step(f"eBPF pins {d}", lambda p=d: shutil.rmtree(p)))
        return steps

    # -- links, routes, addresses

    def _link_steps(self) -> list[Step]:
        steps = []
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME") or ""
                alias = link.get_attr("IFLA_IFALIAS") or ""
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if name == VXLAN_IFNAME and kind == "vxlan":
                    what = f"link {name} (VXLAN)"
                elif name.startswith(HOST_PREFIX) and alias.startswith(ALIAS_PREFIX) and kind == "veth":
                    what = f"link {name} (pod {alias[len(ALIAS_PREFIX):]})"
                else:
                    continue
                steps.append(Step(what, lambda i=link["index"]: _del_link(i)))
        return steps

    def _route_steps(self) -> list[Step]:
        protocols = (RTPROT_PODNET, RTPROT_PODNET_POD) + ((RTPROT_BIRD,) if os.path.isdir(self.bird_dir) else ())
        rtnl = Rtnl()
        try:
            routes = [(proto, r) for proto in protocols for r in rtnl.routes(proto)]
        finally:
            rtnl.close()
        return [Step(f"route {'blackhole ' if r.type == RTN_BLACKHOLE else ''}{r.dst}"
                     f"{f' via {r.gateway}' if r.gateway else ''} (protocol {proto})",
                     lambda d=r.dst, p=proto: _del_route(d, p))
                for proto, r in routes]

    def _eni_steps(self) -> list[Step]:
        """The ENI dataplane's rules and tables, then its links (named by those tables' routes,
        so read before the routes go): down and without addresses, ready to detach."""
        from podnet.eni.routing import ROUTE_PROTOCOL, RULE_PROTOCOL

        with IPRoute() as ipr:
            rules = [r for r in ipr.get_rules(family=socket.AF_INET) if r.get_attr("FRA_PROTOCOL") == RULE_PROTOCOL]
            routes = [r for r in ipr.get_routes(family=socket.AF_INET) if r["proto"] == ROUTE_PROTOCOL]
            links = {}
            for r in routes:
                oif = r.get_attr("RTA_OIF")
                if oif is not None and oif not in links:
                    found = ipr.get_links(oif)
                    links[oif] = found[0].get_attr("IFLA_IFNAME") if found else str(oif)
        steps = []
        for r in rules:
            src, dst = r.get_attr("FRA_SRC"), r.get_attr("FRA_DST")
            table = r.get_attr("FRA_TABLE") or r["table"]
            what = f"rule {'from ' + src if src else 'to ' + str(dst)} lookup {table} (protocol {RULE_PROTOCOL})"
            steps.append(Step(what, lambda r=r, t=table: _del_rule(r, t)))
        for r in routes:
            table = r.get_attr("RTA_TABLE") or r["table"]
            dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}" if r.get_attr("RTA_DST") else "default"
            steps.append(Step(f"route {dst} table {table} (protocol {ROUTE_PROTOCOL})",
                              lambda r=r, t=table: _del_table_route(r, t)))
        for index, name in links.items():
            steps.append(Step(f"addresses of ENI link {name} (down, ready to detach)",
                              lambda i=index: _park_link(i)))
        return steps

    def _address_steps(self, candidates: list[str] | None = None) -> list[Step]:
        if candidates is None:
            candidates = self._dns_candidates(list_tables(TABLE_PREFIX))
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=socket.AF_INET)
                    if a["prefixlen"] == 32}
        return [Step(f"address {a}/32 on lo", lambda a=a, i=lo: _del_addr(i, a)) for a in candidates if a in have]

    # -- iptables

    def _iptables_ours(self) -> list[tuple[str, str, list[str]]]:
        from podnet.services.iptables import podnet_jumps

        return podnet_jumps(self.iptables)

    def _iptables_steps(self) -> list[Step]:
        if not self._iptables_ours():
            return []
        return [Step("iptables Service chains (KUBE-SERVICES, KUBE-SVC-*, ... and the jumps to them)",
                     self._remove_iptables)]

    def _remove_iptables(self) -> None:
        from podnet.services.iptables import IptablesServiceApplier

        IptablesServiceApplier(binary=self.iptables, conntrack=None).remove()
        if self._iptables_ours():
            raise PodnetError(f"{self.iptables}: podnet's jumps are still there after removing them")

    # -- files

    def _file_steps(self) -> list[Step]:
        steps = []
        for suffix in AGENT_FILES:
            path = self.socket + suffix
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if suffix == "" and not stat.S_ISSOCK(st.st_mode):
                continue  # not a socket: not the agent's
            steps.append(Step(f"file {path}", lambda p=path: _unlink(p)))
        if os.path.isdir(self.bird_dir) and not os.path.islink(self.bird_dir):
            steps.append(Step(f"directory {self.bird_dir}", lambda: shutil.rmtree(self.bird_dir)))
        return steps


# ---------------------------------------------------------------------- kernel reads


def _iptables_chains(binary: str, table: str) -> set[str]:
    proc = subprocess.run([binary + "-save", "-t", table], capture_output=True, text=True)
    return {line[1:].split()[0] for line in proc.stdout.splitlines() if line.startswith(":")}


def _notrack_addresses() -> list[str]:
    """The addresses the DNS NOTRACK table's rules name (the node DNS addresses it was given)."""
    out: list[str] = []
    try:
        items = nft_json("list", "table", "ip", DNS_TABLE)
    except PodnetError:
        return out
    for item in items:
        for expr in item.get("rule", {}).get("expr", []):
            match = expr.get("match") or {}
            left, right = match.get("left") or {}, match.get("right")
            if (left.get("payload") or {}).get("field") not in ("daddr", "saddr"):
                continue
            values = right.get("set", []) if isinstance(right, dict) else [right]
            for v in values:
                with contextlib.suppress(ValueError, TypeError):
                    text = str(ipaddress.IPv4Address(v))
                    if text not in out:
                        out.append(text)
    return out


def _lock_holder(path: str) -> str | None:
    """The pid written in an agent's lock file while a process holds it ("" if none is
    written); None when no one holds it (or there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip()
        return None
    finally:
        os.close(fd)  # also drops the shared lock taken to look


def _bird_pid(directory: str) -> int | None:
    """The pid of the BIRD its pid file names, if that process runs on this directory's
    control socket (not a reused pid, not a zombie)."""
    try:
        pid = int(open(os.path.join(directory, "bird.pid")).read().strip())
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if state != "Z" and os.path.join(directory, "bird.ctl").encode() in argv else None


def _stop_bird(directory: str, timeout: float = 10.0) -> None:
    pid = _bird_pid(directory)
    if pid is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _bird_pid(directory) == pid and time.monotonic() < deadline:
            time.sleep(0.02)  # BIRD is not our child: poll its /proc entry
        if _bird_pid(directory) != pid:
            return
    raise PodnetError(f"BIRD (pid {pid}) did not exit")


def _answers(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _udp_listening(address: str, port: int) -> bool:
    """Whether a UDP socket of this network namespace is bound to address:port (/proc)."""
    local = f"{int.from_bytes(ipaddress.IPv4Address(address).packed, 'little'):08X}:{port:04X}"
    try:
        with open("/proc/self/net/udp") as f:
            return any(line.split()[1] == local for line in list(f)[1:])
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------------- kernel writes


def _delete_table(family: str, name: str) -> None:
    """Delete one table (gone meanwhile: fine, the transaction adds it first)."""
    tx = Transaction(Table(name, family))
    tx.remove()
    nft_apply(tx.script())


def _del_filter(index: int, direction: str, prio: int) -> None:
    from podnet.ebpf import attach

    with IPRoute() as ipr:
        attach.detach_prio(ipr, index, direction, prio)


def _del_link(index: int) -> None:
    with IPRoute() as ipr:
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != 19:  # ENODEV: gone meanwhile
                raise


def _del_route(dst: str, protocol: int) -> None:
    rtnl = Rtnl()
    try:
        errors = [e for e in rtnl.batch([route_request(dst, protocol=protocol, delete=True)])
                  if "No such process" not in e]  # gone meanwhile (with its device)
    finally:
        rtnl.close()
    if errors:
        raise PodnetError("; ".join(errors))


def _del_rule(rule, table: int) -> None:
    with IPRoute() as ipr:
        try:
            ipr.rule("del", family=socket.AF_INET, priority=rule.get_attr("FRA_PRIORITY"), table=table,
                     src=rule.get_attr("FRA_SRC"), src_len=rule["src_len"], dst=rule.get_attr("FRA_DST"),
                     dst_len=rule["dst_len"])
        except NetlinkError as e:
            if e.code != 2:  # ENOENT: gone meanwhile
                raise


def _del_table_route(route, table: int) -> None:
    with IPRoute() as ipr:
        try:  # dst and dst_len apart: pyroute2 reads "a.b.c.d/n" as a /32 in a delete
            ipr.route("del", dst=route.get_attr("RTA_DST") or "0.0.0.0", dst_len=route["dst_len"], table=table,
                      oif=route.get_attr("RTA_OIF"), scope=route["scope"], proto=route["proto"])
        except NetlinkError as e:
            if e.code not in (2, 3, 19):  # ENOENT, ESRCH, ENODEV: gone meanwhile (with its link)
                raise


def _park_link(index: int) -> None:
    """An ENI's link, down and with no IPv4 address: nothing on the node uses it any more."""
    with IPRoute() as ipr:
        try:
            ipr.link("set", index=index, state="down")
            for a in ipr.get_addr(index=index, family=socket.AF_INET):
                ipr.addr("del", index=index, address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        except NetlinkError as e:
            if e.code not in (19, 99):  # ENODEV, EADDRNOTAVAIL: gone meanwhile
                raise


def _del_addr(lo: int, address: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.addr("del", index=lo, address=address, prefixlen=32)
        except NetlinkError as e:
            if e.code != 99:  # EADDRNOTAVAIL: gone meanwhile
                raise


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
