"""The RFC 2136 provider: a zone read by a TSIG-signed AXFR, changed by TSIG-signed
UPDATE messages (dnspython over TCP) whose prerequisites make each change conditional.

Each change (plan.Change: one name and type) puts into the message

    create         prerequisites: no RRset of its type at the name (for A/AAAA: no CNAME
                   there; for a CNAME: nothing at all at the name) and no TXT at its
                   registry name; updates: add the records and the registry TXT
    re-create,     prerequisite: the owner's TXT RRset exactly as read (value-dependent
    update,        "RRset exists", RFC 2136 2.4.2); updates: delete the RRset and add the
    delete         new records (delete: nothing), rewrite or delete this owner's own TXT
                   record and no other string that shares its name

A server applies a message all or nothing: every prerequisite first, then every
update. So no change lands on a name that another owner or a person took after the
zone was read (the race ExternalDNS loses, kubernetes-sigs/external-dns#5457), and
only this owner's own records are ever deleted (#1040).

Batching: changes travel --rfc2136-batch-change-size to a message (a batch that does
not fit in the 64 KiB of a DNS message is cut into as many parts as it needs). Deletes and updates go first, creates in later messages, so a
create never depends on a prerequisite that a delete in its own message would make
true (a record changing from A to CNAME). A message refused on a prerequisite (YXDOMAIN,
YXRRSET, NXDOMAIN, NXRRSET) is split in halves and each half sent again, down to the
single changes that lost a race: k lost changes among n cost about 2k log2(n/k)
messages more, and nothing is lost in the common case of none. A message the server
fails or refuses (SERVFAIL, REFUSED) is split the same way, so one change it will not
take (more records at a name than BIND's max-records-per-type, 100 by default) is
reported and the others land; if it takes none of them, or on any other error (the
key, the signature, the connection), the sync fails with one line that says what to
check.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.tsig
import dns.update
import dns.xfr
from dns.rdtypes.ANY.TXT import TXT

from podnet.errors import PodnetError
from podnet.externaldns.plan import Change
from podnet.externaldns.registry import OWNER, RESOURCE, NameMapper, RRset, ZoneView, parse_labels, read_zone

log = logging.getLogger("podnet.externaldns")

TSIG_ALGORITHMS = {
    "hmac-md5": dns.tsig.HMAC_MD5, "hmac-sha1": dns.tsig.HMAC_SHA1, "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha384": dns.tsig.HMAC_SHA384, "hmac-sha512": dns.tsig.HMAC_SHA512,
}
MESSAGE_BYTES = 65_535  # the most a DNS message over TCP carries
PREREQUISITE_FAILED = frozenset({dns.rcode.YXDOMAIN, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.NXRRSET})
CHANGE_REFUSED = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED})
MAX_TXT_STRING = 255


class DNSServerError(PodnetError):
    """The DNS server refused what was sent, or could not be reached: one line saying what to check."""


class DNSServerUnavailable(DNSServerError):
    """The server did not answer (down, restarting, unreachable): retried."""


@dataclass(frozen=True)
class ServerConfig:
    host: str
    zones: tuple[str, ...]
    port: int = 53
    keyname: str | None = None
    secret: str | None = None
    algorithm: str = "hmac-sha256"
    insecure: bool = False
    timeout: float = 10.0
    batch_size: int = 50

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class ApplyResult:
    applied: list[Change] = field(default_factory=list)
    lost: list[tuple[Change, str]] = field(default_factory=list)  # a prerequisite failed: who holds it now
    failed: list[tuple[Change, str, DNSServerError]] = field(default_factory=list)  # the server would not take it
    messages: int = 0


def tsig_key(cfg: ServerConfig) -> dns.tsig.Key | None:
    """The TSIG key of the configuration (None with insecure); PodnetError naming the flag at fault."""
    if cfg.insecure:
        return None
    if not cfg.keyname:
        raise PodnetError("--rfc2136-tsig-keyname is required (or --rfc2136-insecure to send unsigned updates)")
    if not cfg.secret:
        raise PodnetError("--rfc2136-tsig-secret (or $EXTERNAL_DNS_RFC2136_TSIG_SECRET) is required with "
                          "--rfc2136-tsig-keyname")
    alg = TSIG_ALGORITHMS.get(cfg.algorithm.lower())
    if alg is None:
        raise PodnetError(f"--rfc2136-tsig-secret-alg {cfg.algorithm!r} is not supported: expected one of "
                          f"{', '.join(TSIG_ALGORITHMS)}")
    try:
        base64.b64decode(cfg.secret, validate=True)
    except (binascii.Error, ValueError):
        raise PodnetError("--rfc2136-tsig-secret is not base64 (the secret line of the key's tsig-keygen output)") \
            from None
    return dns.tsig.Key(cfg.keyname, cfg.secret, alg)


def _abs(name: str) -> dns.name.Name:
    return dns.name.from_text(name if name.endswith(".") else name + ".")


def to_rdata(rtype: str, value: str) -> dns.rdata.Rdata:
    """The rdata of a record value as this package writes it (CNAME and SRV targets without the dot)."""
    if rtype == "CNAME":
        value = value.rstrip(".") + "."
    elif rtype == "SRV":
        *head, target = value.split()
        value = " ".join([*head, target.rstrip(".") + "."])
    return dns.rdata.from_text(dns.rdataclass.IN, rtype, value)


def txt_rdata(text: str) -> dns.rdata.Rdata:
    """A TXT record holding `text`, in 255-byte strings (one, for every registry value)."""
    data = text.encode()
    chunks = [data[i:i + MAX_TXT_STRING] for i in range(0, len(data), MAX_TXT_STRING)] or [b""]
    return TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def value_of(rdata: dns.rdata.Rdata) -> str:
    """The value of a record as plans compare them."""
    t = rdata.rdtype
    if t in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address  # type: ignore[attr-defined]
    if t == dns.rdatatype.CNAME:
        return rdata.target.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
    if t == dns.rdatatype.SRV:
        r = rdata
        return f"{r.priority} {r.weight} {r.port} {r.target.to_text(omit_final_dot=True).lower()}"  # type: ignore
    return rdata.to_text()


def txt_text(rdata: dns.rdata.Rdata) -> str:
    return b"".join(rdata.strings).decode(errors="replace")  # type: ignore[attr-defined]


class RFC2136Provider:
    def __init__(self, cfg: ServerConfig, *, send: Callable[[dns.message.Message], dns.message.Message] | None = None):
        self.cfg = cfg
        self.key = tsig_key(cfg)
        self.zones = tuple(sorted({z.lower().rstrip(".") for z in cfg.zones}, key=lambda z: (-z.count("."), z)))
        if not self.zones:
            raise PodnetError("--rfc2136-zone is required: the zone(s) to publish records in")
        if cfg.batch_size < 1:
            raise PodnetError(f"--rfc2136-batch-change-size {cfg.batch_size}: expected 1 or more")
        self._send = send or self._send_tcp
        self.messages = 0  # UPDATE messages sent, all time

    # ------------------------------------------------------------------ zones

    def zone_for(self, name: str) -> str | None:
        """The most specific configured zone `name` is in."""
        for z in self.zones:
            if name == z or name.endswith("." + z):
                return z
        return None

    def read(self, zone: str, mapper: NameMapper) -> ZoneView:
        """The zone's records by AXFR, and who owns what in it."""
        rrsets: dict[tuple[str, str], tuple[int, set[str], dict[str, str]]] = {}
        serial = None
        try:
            kw = {"keyring": self.key, "keyname": self.key.name, "keyalgorithm": self.key.algorithm} if self.key else {}
            for msg in dns.query.xfr(self.cfg.host, zone + ".", port=self.cfg.port, relativize=False,
                                     lifetime=self.cfg.timeout, **kw):
                for rrset in msg.answer:
                    if rrset.rdclass != dns.rdataclass.IN:
                        continue
                    name = rrset.name.to_text(omit_final_dot=True).lower()
                    rtype = dns.rdatatype.to_text(rrset.rdtype)
                    _, values, texts = rrsets.setdefault((name, rtype), (rrset.ttl, set(), {}))
                    for rd in rrset:
                        v = value_of(rd)
                        values.add(v)
                        if rtype == "TXT":
                            texts[v] = txt_text(rd)
                        elif rtype == "SOA":
                            serial = rd.serial  # type: ignore[attr-defined]
        except dns.xfr.TransferError as e:
            raise self._refused(f"zone transfer (AXFR) of {zone}", dns.rcode.to_text(e.rcode)) from None
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            raise self._failure(f"zone transfer (AXFR) of {zone}", e) from None
        if not rrsets:
            raise DNSServerError(f"{self.cfg.where}: the zone transfer of {zone} returned nothing: is the server "
                                 f"authoritative for {zone}?")
        view_sets = {k: RRset(ttl, tuple(sorted(values)), tuple(texts[v] for v in sorted(values)) if texts else ())
                     for k, (ttl, values, texts) in rrsets.items()}
        return read_zone(zone, view_sets, mapper, serial)

    # ------------------------------------------------------------------ updates

    def apply(self, zone: str, changes: Sequence[Change]) -> ApplyResult:
        """Send the changes (all in `zone`): deletes and updates first, then creates. A
        message refused on a prerequisite is split until the changes that lost are found;
        one the server fails or refuses (SERVFAIL, REFUSED) is split the same way, so that
        one change it will not take (BIND's max-records-per-type, an update-policy that
        leaves a name out) does not hold up the others. DNSServerError when the server
        took none of a batch, or none at all, for such a reason (it is failing, or the key
        may not update the zone)."""
        result = ApplyResult()
        first = [c for c in changes if c.action != "create"]
        then = [c for c in changes if c.action == "create"]
        for phase in (first, then):
            for batch in self._batches(phase):
                applied, failed = len(result.applied), len(result.failed)
                self._send_batch(zone, batch, result)
                if len(batch) > 1 and len(result.applied) == applied and len(result.failed) - failed == len(batch):
                    raise result.failed[-1][2]
        if result.failed and not result.applied:
            raise result.failed[0][2]
        return result

    def _batches(self, changes: Sequence[Change]) -> list[list[Change]]:
        n = self.cfg.batch_size
        return [list(changes[i:i + n]) for i in range(0, len(changes), n)]

    def _send_batch(self, zone: str, batch: list[Change], result: ApplyResult) -> None:
        msg = self.message(zone, batch)
        try:
            rcode = self._exchange(zone, msg, len(batch))
        except dns.exception.TooBig:  # raised while rendering, before anything is sent
            if len(batch) == 1:
                raise DNSServerError(f"{batch[0].name} {batch[0].type}: {len(batch[0].targets)} records do not fit "
                                     "in one DNS message") from None
            # as many parts as the first change, rendered alone (so compressed the least), says it takes
            per = len(self.message(zone, batch[:1]).to_wire())
            parts = max(2, -(-len(batch) * per // MESSAGE_BYTES))
            step = -(-len(batch) // parts)
            for i in range(0, len(batch), step):
                self._send_batch(zone, batch[i:i + step], result)
            return
        result.messages += 1
        if rcode == dns.rcode.NOERROR:
            result.applied.extend(batch)
            return
        if rcode in PREREQUISITE_FAILED:
            if len(batch) == 1:
                result.lost.append((batch[0], self.holder(batch[0])))
                return
            mid = len(batch) // 2
            self._send_batch(zone, batch[:mid], result)
            self._send_batch(zone, batch[mid:], result)
            return
        if rcode in CHANGE_REFUSED:
            if len(batch) == 1:
                c = batch[0]
                error = self._refused(f"UPDATE of zone {zone}", dns.rcode.to_text(rcode))
                why = dns.rcode.to_text(rcode)
                if rcode == dns.rcode.SERVFAIL and len(c.targets) > 100:
                    why += (f": {len(c.targets)} records of one type at one name (BIND takes at most "
                            "max-records-per-type, 100 by default); see the server's log")
                elif rcode == dns.rcode.SERVFAIL:
                    why += ": see the server's log"
                else:
                    why += f": does the zone's update-policy let key {self.cfg.keyname!r} change this name?"
                result.failed.append((c, why, error))
                return
            mid = len(batch) // 2
            self._send_batch(zone, batch[:mid], result)
            self._send_batch(zone, batch[mid:], result)
            return
        raise self._refused(f"UPDATE of zone {zone}", dns.rcode.to_text(rcode))

    def message(self, zone: str, batch: Sequence[Change]) -> dns.update.UpdateMessage:
        upd = dns.update.UpdateMessage(zone + ".")
        if self.key is not None:
            upd.use_tsig(self.key)
        for c in batch:
            _add_change(upd, c)
        return upd

    def _exchange(self, zone: str, msg: dns.message.Message, changes: int) -> int:
        try:
            resp = self._send(msg)
        except dns.exception.TooBig:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._failure(f"UPDATE of zone {zone} ({changes} changes)", e) from None
        self.messages += 1
        return resp.rcode()

    def _send_tcp(self, msg: dns.message.Message) -> dns.message.Message:
        return dns.query.tcp(msg, self.cfg.host, port=self.cfg.port, timeout=self.cfg.timeout)

    def holder(self, c: Change) -> str:
        """Who holds the name now (after a prerequisite failed), as a phrase for the report."""
        try:
            q = dns.message.make_query(c.txt_name + ".", "TXT")
            resp = dns.query.tcp(q, self.cfg.host, port=self.cfg.port, timeout=self.cfg.timeout)
            for rrset in resp.answer:
                for rd in rrset:
                    if rrset.rdtype == dns.rdatatype.TXT:
                        labels = parse_labels(txt_text(rd))
                        if labels and OWNER in labels:
                            res = labels.get(RESOURCE)
                            return f"owned by owner {labels[OWNER]!r}" + (f" ({res})" if res else "")
        except Exception as e:  # noqa: BLE001 - only for the report
            return f"changed since the zone was read (could not ask who holds it: {e})"
        return "held by records no owner claims (made outside ExternalDNS) or changed since the zone was read"

    # ------------------------------------------------------------------ errors

    def _refused(self, what: str, rcode: str) -> DNSServerError:
        hint = {
            "REFUSED": ("the server refused it: " + ("unsigned requests (--rfc2136-insecure) are not allowed, "
                                                      "sign them with a TSIG key the zone allows"
                                                      if self.key is None else
                                                      f"does the zone's update-policy/allow-update (and allow-transfer)"
                                                      f" grant key {self.cfg.keyname!r}?")),
            "NOTAUTH": "the server is not authoritative for the zone, or did not accept the signature",
            "NOTZONE": "a name is outside the zone",
            "SERVFAIL": "the server failed (see its log)",
            "NOTIMP": "the server does not implement it",
            "FORMERR": "the server could not parse the message",
        }.get(rcode, "")
        return DNSServerError(f"{self.cfg.where}: {what} failed with {rcode}" + (f": {hint}" if hint else ""))

    def _failure(self, what: str, e: Exception) -> DNSServerError:
        key = self.cfg.keyname
        if isinstance(e, dns.tsig.PeerBadKey):
            return DNSServerError(f"{self.cfg.where}: {what}: the server does not know TSIG key {key!r} with "
                                  f"algorithm {self.cfg.algorithm} (BADKEY): check --rfc2136-tsig-keyname and "
                                  "--rfc2136-tsig-secret-alg against the server's key")
        if isinstance(e, dns.tsig.PeerBadSignature):
            return DNSServerError(f"{self.cfg.where}: {what}: the server rejected the signature made with TSIG key "
                                  f"{key!r} (BADSIG): --rfc2136-tsig-secret is not the server's secret for that key")
        if isinstance(e, dns.tsig.PeerBadTime):
            return DNSServerError(f"{self.cfg.where}: {what}: the server rejected the signature's time (BADTIME): "
                                  "this machine's clock and the server's differ by more than 5 minutes")
        if isinstance(e, dns.tsig.PeerError | dns.tsig.BadSignature):
            return DNSServerError(f"{self.cfg.where}: {what}: TSIG failed ({e})")
        if isinstance(e, ConnectionRefusedError):
            return DNSServerUnavailable(f"{self.cfg.where}: {what}: connection refused (is the DNS server running "
                                        "and listening on TCP there?)")
        if isinstance(e, dns.exception.Timeout | socket.timeout | TimeoutError):
            return DNSServerUnavailable(f"{self.cfg.where}: {what}: no answer within {self.cfg.timeout:g}s")
        if isinstance(e, OSError | EOFError | ConnectionError):
            return DNSServerUnavailable(f"{self.cfg.where}: {what}: {e or type(e).__name__}")
        if isinstance(e, dns.exception.DNSException):
            return DNSServerError(f"{self.cfg.where}: {what}: {e}")
        return DNSServerError(f"{self.cfg.where}: {what}: {type(e).__name__}: {e}")


def _add_change(upd: dns.update.UpdateMessage, c: Change) -> None:
    name = _abs(c.name)
    own = c.owner_txt
    if own is None:
        upd.absent(name, c.type)
        if c.type == "CNAME":
            upd.absent(name)  # a CNAME shares its name with nothing
        else:
            upd.absent(name, "CNAME")  # a server silently drops other data added at a CNAME
        upd.absent(_abs(c.txt_name), "TXT")
    else:
        held = dns.rdataset.Rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
        for v in own.txt_rrset:
            held.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, v))
        upd.present(_abs(own.txt_name), held)
        upd.delete(name, c.type)
    if c.action != "delete":
        upd.add(name, c.ttl, *[to_rdata(c.type, t) for t in c.targets])
    # the registry record: this owner's own string only, never another that shares its name
    if own is not None and (c.action == "delete" or own.text != c.txt_value or own.txt_name != c.txt_name):
        if c.action == "delete" or not own.old_format:
            upd.delete(_abs(own.txt_name), dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, own.value))
    for txt_name, value in c.also_delete:
        upd.delete(_abs(txt_name), dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, value))
    if c.txt_value is not None and (own is None or own.text != c.txt_value or own.txt_name != c.txt_name):
        upd.add(_abs(c.txt_name), c.ttl, txt_rdata(c.txt_value))


def effect(rrsets: dict[tuple[str, str], RRset], c: Change) -> None:
    """What an applied change did to the zone (the RRsets by (name, type), as read_zone
    takes them): the same records and registry strings _add_change wrote and deleted."""
    key = (c.name, c.type)
    if c.action == "delete":
        rrsets.pop(key, None)
    else:
        rrsets[key] = RRset(c.ttl, tuple(sorted(c.targets)))
    own = c.owner_txt

    def drop(name: str, value: str) -> None:
        have = rrsets.get((name, "TXT"))
        if have is None or value not in have.values:
            return
        keep = [(v, t) for v, t in zip(have.values, have.texts, strict=True) if v != value]
        if keep:
            rrsets[(name, "TXT")] = RRset(have.ttl, tuple(v for v, _ in keep), tuple(t for _, t in keep))
        else:
            del rrsets[(name, "TXT")]

    if own is not None and (c.action == "delete" or own.text != c.txt_value or own.txt_name != c.txt_name):
        if c.action == "delete" or not own.old_format:
            drop(own.txt_name, own.value)
    for name, value in c.also_delete:
        drop(name, value)
    if c.txt_value is not None and (own is None or own.text != c.txt_value or own.txt_name != c.txt_name):
        value = txt_rdata(c.txt_value).to_text()
        have = rrsets.get((c.txt_name, "TXT"))
        pairs = dict(zip(have.values, have.texts, strict=True)) if have else {}
        pairs[value] = c.txt_value
        rrsets[(c.txt_name, "TXT")] = RRset(c.ttl, tuple(sorted(pairs)), tuple(pairs[v] for v in sorted(pairs)))
