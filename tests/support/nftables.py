"""An in-memory nftables for unit tests: applies podnet.dataplane.nftables transactions
with the kernel's rules (all or nothing; add is idempotent, create and delete check
existence; a chain or set still referenced cannot be deleted; a map element cannot
change its value without a delete), and shows the result as `Ruleset.dump()`, the same
stable form a kernel read-back gives."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from podnet.dataplane.nft import NftError
from podnet.dataplane.nftables import (
    Chain,
    Chains,
    ChainState,
    Elements,
    NftDefinitionError,
    Rule,
    Ruleset,
    Set,
    SetState,
    Table,
    Transaction,
    canonical_element,
    chain_spec,
    declared_types,
    set_spec,
)
from podnet.dataplane.ruledigest import ChainDigest, chain_digests


@dataclass
class _Table:
    table: Table
    chains: dict[str, Chain] = field(default_factory=dict)
    rules: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)  # chain -> (handle, rule)
    sets: dict[str, Set] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)  # set -> canonical key -> element


def _refs(rule: str) -> tuple[set[str], set[str]]:
    """(sets, chains) a rule's text refers to."""
    words = rule.replace("{", " ").replace("}", " ").replace(",", " ").split()  # anonymous vmaps too
    sets = {w[1:] for w in words if w.startswith("@")}
    chains = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("jump", "goto")}
    return sets, chains


class FakeNft:
    """Tables by (family, name). `apply(tx)` has NftRunner's signature."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], _Table] = {}
        self.transactions: list[Transaction] = []
        self.fail_next: list[bool] = []  # True: refuse that transaction as the kernel would
        self._handle = 0

    # ---- reading

    def ruleset(self, name: str, family: str = "ip") -> Ruleset | None:
        t = self.tables.get((family, name))
        if t is None:
            return None
        out = Ruleset(family, name)
        for cname, c in t.chains.items():
            rules = [r.rule for _, r in t.rules[cname]]
            out.chains[cname] = ChainState(chain_spec(c), rules, len(rules))
        for sname, s in t.sets.items():
            out.sets[sname] = SetState(s.kind, set_spec(s), set(t.elements[sname].values()))
        return out

    def chain_digests(self, name: str, chains=None, family: str = "ip") -> dict[str, ChainDigest] | None:
        """The kernel's per-chain rule digests (of every chain, or of these), taken here over
        each rule's text (the kernel's are over its expressions: equal texts, equal digests,
        as there)."""
        t = self.tables.get((family, name))
        if t is None:
            return None
        return chain_digests((c, r.rule.encode()) for c in (t.rules if chains is None else chains)
                             for _, r in t.rules.get(c, ()))

    def dump(self, rules: bool = True) -> str:
        return "".join(self.ruleset(n, f).dump(rules) for f, n in sorted(self.tables))  # type: ignore[union-attr]

    # ---- writing

    def apply(self, tx: Transaction) -> str:
        if not tx.ops:
            return ""
        self.transactions.append(tx)
        if self.fail_next and self.fail_next.pop(0):
            raise NftError("nft rejected the ruleset: Error: Could not process rule: No such file or directory")
        tables = copy.deepcopy(self.tables)
        try:
            for verb, obj in tx.ops:
                self._op(tables, tx.table, verb, obj)
        except (KeyError, NftDefinitionError) as e:
            raise NftError(f"nft rejected the ruleset: {e}") from None
        self.tables = tables
        return "netlink" if tx.batch() is not None else "nft"

    def _op(self, tables: dict, table: Table, verb: str, obj) -> None:
        key = (table.family, table.name)
        if isinstance(obj, Table):
            if verb in ("add", "create"):
                if key in tables and verb == "create":
                    raise NftDefinitionError(f"table {table.ref} exists")
                tables.setdefault(key, _Table(obj))
            elif key not in tables:
                raise NftDefinitionError(f"no table {table.ref}")
            elif verb == "delete":
                del tables[key]
            else:  # flush: every chain's rules
                for rules in tables[key].rules.values():
                    rules.clear()
            return
        t: _Table | None = tables.get(key)
        if t is None:
            raise NftDefinitionError(f"no table {table.ref}")
        if isinstance(obj, Chains):  # every chain, then every rule
            for c, _ in obj.chains:
                self._chain(t, verb, c)
            for r in obj.rules():
                self._rule(t, verb, r)
        elif isinstance(obj, Chain):
            self._chain(t, verb, obj)
        elif isinstance(obj, Rule):
            self._rule(t, verb, obj)
        elif isinstance(obj, Set):
            self._set(t, verb, obj)
        else:
            self._elements(t, verb, obj)

    def _chain(self, t: _Table, verb: str, c: Chain) -> None:
        have = t.chains.get(c.name)
        if verb in ("add", "create"):
            if have is not None:
                if verb == "create" or (c.hook is not None and chain_spec(have) != chain_spec(c)):
                    raise NftDefinitionError(f"chain {c.name} exists")
                return
            t.chains[c.name] = c
            t.rules[c.name] = []
            return
        if have is None:
            raise NftDefinitionError(f"no chain {c.name}")
        if verb == "flush":
            t.rules[c.name].clear()
            return
        if t.rules[c.name]:
            raise NftDefinitionError(f"chain {c.name} is not empty")
        if self._chain_users(t, c.name):
            raise NftDefinitionError(f"chain {c.name} is in use")
        del t.chains[c.name], t.rules[c.name]

    def _chain_users(self, t: _Table, name: str) -> bool:
        for rules in t.rules.values():
            if any(name in _refs(r.rule)[1] for _, r in rules):
                return True
        for sname, els in t.elements.items():
            if declared_types(t.sets[sname]).data == ("verdict",):
                if any(e.split(" : ", 1)[1].split()[-1] == name for e in els.values()):
                    return True
        return False

    def _rule(self, t: _Table, verb: str, r: Rule) -> None:
        rules = t.rules.get(r.chain)
        if rules is None:
            raise NftDefinitionError(f"no chain {r.chain}")
        at = None
        if r.handle is not None:
            at = next((i for i, (h, _) in enumerate(rules) if h == r.handle), None)
            if at is None:
                raise NftDefinitionError(f"no rule with handle {r.handle} in {r.chain}")
        if verb == "delete":
            del rules[at]  # type: ignore[arg-type]
            return
        sets, chains = _refs(r.rule)
        for s in sets:
            if s not in t.sets:
                raise NftDefinitionError(f"rule in {r.chain}: no set {s}")
        for c in chains:
            if c not in t.chains:
                raise NftDefinitionError(f"rule in {r.chain}: no chain {c}")
        self._handle += 1
        entry = (self._handle, r)
        if verb == "add":
            rules.insert(len(rules) if at is None else at + 1, entry)
        elif verb == "insert":
            rules.insert(0 if at is None else at, entry)
        else:  # replace
            rules[at] = (rules[at][0], r)  # type: ignore[index]

    def _set(self, t: _Table, verb: str, s: Set) -> None:
        have = t.sets.get(s.name)
        if verb in ("add", "create"):
            if have is not None:
                if verb == "create" or set_spec(have) != set_spec(s) or have.kind != s.kind:
                    raise NftDefinitionError(f"{s.kind} {s.name} exists")
                return
            t.sets[s.name] = s
            t.elements[s.name] = {}
            return
        if have is None or have.kind != s.kind:
            raise NftDefinitionError(f"no {s.kind} {s.name}")
        if verb == "flush":
            t.elements[s.name].clear()
            return
        if any(s.name in _refs(r.rule)[0] for rules in t.rules.values() for _, r in rules):
            raise NftDefinitionError(f"{s.kind} {s.name} is in use")
        del t.sets[s.name], t.elements[s.name]

    def _elements(self, t: _Table, verb: str, e: Elements) -> None:
        s = t.sets.get(e.of.name)
        if s is None:
            raise NftDefinitionError(f"no set {e.of.name}")
        types = declared_types(s)
        els = t.elements[s.name]
        for item in e.items:
            for canon in canonical_element(types, item, verb != "delete"):
                k = canon.partition(" : ")[0]
                if verb == "delete":
                    if k not in els:
                        raise NftDefinitionError(f"{s.name}: no element {k}")
                    del els[k]
                    continue
                if types.data == ("verdict",):
                    target = canon.split(" : ", 1)[1].split()
                    if target[0] in ("jump", "goto") and target[-1] not in t.chains:
                        raise NftDefinitionError(f"{s.name}: element {k}: no chain {target[-1]}")
                old = els.get(k)
                if old is not None and (verb == "create" or old != canon):
                    raise NftDefinitionError(f"{s.name}: element {k} exists")
                els[k] = canon
