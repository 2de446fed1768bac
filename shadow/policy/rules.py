"""The policy: which client is in which class, and what each class may not do.

A policy file is TOML: a list of classes, the first whose match holds takes the client
(a client no class matches is unrestricted)::

    [[class]]
    name = "reporting"
    users = ["report_*"]              # globs; absent: any
    databases = ["app"]
    application_names = ["metabase*"]
    networks = ["10.0.0.0/8"]          # the client's address
    refuse_kinds = ["INSERT", "UPDATE", "DELETE", "DDL", "COPY"]
    refuse_objects = ["hr.salaries", "audit.*", "function:pg_read_file"]
    # allow_kinds / allow_objects: when given, everything else is refused
    # trusted_functions = ["audit.log_event"]   # plpgsql/C functions it may call all the same

    [[class.mask]]                      # what the class may read, but not see
    column = "public.person.ssn"        # schema.table.column or table.column (globs)
    mask = "last"                       # full | last | hash | null | constant
    keep = 4                            # (last) the characters kept
    # value = "n/a"                     # (constant) the value shown
    # key_env = "CONNMGR_MASK_KEY"      # (hash) the environment variable holding the key
    # allow_predicates = false          # WHERE/ORDER BY/GROUP BY/DISTINCT on it refused

A mask keeps the column's type (shadow/policy/masking.py says how per type): ``full``
shows ``****`` (a number 0, a date 1970-01-01, ...), ``last`` the last ``keep`` characters
(the others ``*``), ``hash`` a keyed HMAC (the same value always gives the same hash, so
joins and counts by it still work), ``null`` NULL, ``constant`` ``value``.

Objects: ``schema.table`` (globs in either part; a name with no schema matches in every
schema) and ``function:name`` (or ``function:schema.name``). A statement names a table
without its schema: it matches a pattern whose table part it matches, in any schema (the
search path is the database's; until the catalog is read, connmgr assumes the worst).

:func:`load_policy` raises :class:`PolicyError` naming the file, the class and the key,
and how to fix it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field

from shadow.policy.rewrite import RULES, Rewrites, Rule, TableEntry

__all__ = ["KINDS", "MASKS", "ClientClass", "ColumnMask", "ObjectPattern", "Policy", "PolicyError", "load_policy", "parse_policy"]

#: the request kinds a rule may name (shadow/policy/analysis.py assigns them)
KINDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "DDL", "TRUNCATE", "GRANT", "CALL", "DO", "SET",
         "SHOW", "LISTEN", "NOTIFY", "TRANSACTION", "CURSOR", "PREPARE", "EXECUTE", "EXPLAIN", "LOCK", "MAINTENANCE",
         "OTHER")  # fmt: skip

_CLASS_KEYS = {"name", "users", "databases", "application_names", "networks", "refuse_kinds", "refuse_objects",
               "allow_kinds", "allow_objects", "mask", "rewrite", "rule", "trusted_functions"}  # fmt: skip
#: what a mask shows instead of a value
MASKS = ("full", "last", "hash", "null", "constant")
_MASK_KEYS = {"column", "mask", "keep", "value", "key_env", "allow_predicates"}


class PolicyError(Exception):
    """A policy file that cannot be used (the message names the key and the fix).
    Internal: refused at load; a client never sees it."""


@dataclass(frozen=True, slots=True)
class ObjectPattern:
    """``kind`` is "table" or "function"; ``schema`` None matches every schema."""

    kind: str
    schema: str | None
    name: str
    text: str

    @classmethod
    def parse(cls, text: str, where: str) -> ObjectPattern:
        raw = text.strip()
        kind = "table"
        if raw.lower().startswith("function:"):
            kind, raw = "function", raw[len("function:"):].strip()
        parts = raw.lower().split(".")
        if not raw or len(parts) > 2 or not all(parts):
            raise PolicyError(f"{where}: {text!r} is not an object: write \"schema.table\", \"table\","
                              " \"schema.*\" or \"function:name\"")  # fmt: skip
        schema, name = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        return cls(kind, None if schema == "*" else schema, name, text)

    def matches(self, kind: str, schema: str | None, name: str) -> bool:
        """Does a ``kind`` object ``schema.name`` (schema None: not written) match? An
        object named without its schema matches in any schema."""
        if kind != self.kind or not fnmatch.fnmatchcase(name, self.name):
            return False
        return self.schema is None or schema is None or fnmatch.fnmatchcase(schema, self.schema)


@dataclass(frozen=True, slots=True)
class ColumnMask:
    """A mask on the columns ``schema.table.column`` matches (``schema`` None: any)."""

    schema: str | None
    table: str
    column: str
    mask: str
    text: str
    keep: int = 0
    value: str = ""
    key: bytes = field(default=b"", repr=False)
    #: WHERE, ORDER BY, GROUP BY, DISTINCT, joins on it are allowed (the operator accepts
    #: that a client can learn the value by probing)
    allow_predicates: bool = False

    def matches(self, schema: str | None, table: str, column: str) -> bool:
        if not fnmatch.fnmatchcase(column, self.column) or not fnmatch.fnmatchcase(table, self.table):
            return False
        return self.schema is None or schema is None or fnmatch.fnmatchcase(schema, self.schema)

    @property
    def label(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True, eq=False)
class ClientClass:
    """(Compared and hashed by identity: each is made once, when the policy is loaded, and
    is a key of every decision cached.)"""

    name: str
    users: tuple[str, ...] | None = None
    databases: tuple[str, ...] | None = None
    application_names: tuple[str, ...] | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    refuse_kinds: frozenset[str] = frozenset()
    refuse_objects: tuple[ObjectPattern, ...] = ()
    allow_kinds: frozenset[str] | None = None
    allow_objects: tuple[ObjectPattern, ...] | None = None
    masks: tuple[ColumnMask, ...] = ()
    rewrites: Rewrites = Rewrites()
    #: functions in another language than SQL (plpgsql, C) the operator vouches for: a
    #: class that restricts objects may call them (what they read is not seen)
    trusted_functions: tuple[ObjectPattern, ...] = ()
    #: what the class was made of (its TOML table and the mask keys it read): two classes
    #: of two policy versions with the same fingerprint decide alike (shadow/policy/guard.py)
    fingerprint: str = field(default="", repr=False)

    def holds(self, user: str, database: str, application_name: str, address: str | None) -> bool:
        """Does this class take a client with these properties (``address`` an IP, or
        None for a Unix socket: then no ``networks`` class takes it)?"""
        for patterns, value in ((self.users, user), (self.databases, database),
                                (self.application_names, application_name)):  # fmt: skip
            if patterns is not None and not any(fnmatch.fnmatchcase(value, p) for p in patterns):
                return False
        if self.networks is not None:
            try:
                ip = ipaddress.ip_address(address) if address else None
            except ValueError:
                ip = None
            if ip is None or not any(ip in net for net in self.networks):
                return False
        return True

    @property
    def restricts_objects(self) -> bool:
        """Does this class refuse some objects (so a statement it cannot analyse is refused)?"""
        return bool(self.refuse_objects) or self.allow_objects is not None or bool(self.masks)

    def mask_of(self, schema: str | None, table: str, column: str) -> ColumnMask | None:
        """The first mask on column ``schema.table.column`` (lower case), or None."""
        for mask in self.masks:
            if mask.matches(schema, table, column):
                return mask
        return None


@dataclass(frozen=True, slots=True)
class Policy:
    classes: tuple[ClientClass, ...]
    #: where it was read from (for log lines)
    source: str = "policy"

    def classify(self, user: str, database: str, application_name: str, address: str | None) -> ClientClass | None:
        """The first class that takes this client, or None (unrestricted)."""
        for cls in self.classes:
            if cls.holds(user, database, application_name, address):
                return cls
        return None


def load_policy(path: str) -> Policy:
    """The policy in TOML file ``path``; PolicyError if it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy file: {e.strerror or e}") from None
    return parse_policy(raw.decode("utf-8", "replace"), path)


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    unknown = set(doc) - {"class"}
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}: a policy holds [[class]] tables only")
    entries = doc.get("class", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PolicyError(f"{source}: class: write each class as a [[class]] table")
    classes = []
    names: set[str] = set()
    for i, entry in enumerate(entries, 1):
        cls = _client_class(entry, f"{source}: [[class]] {i}")
        if cls.name in names:
            raise PolicyError(f"{source}: [[class]] {i}: name {cls.name!r} is used twice: give each class its own name")
        names.add(cls.name)
        classes.append(cls)
    return Policy(tuple(classes), source)


def _known_keys(entry: dict, keys: set[str], what: str, where: str) -> None:
    unknown = set(entry) - keys
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} ({what} takes"
                          f" {', '.join(sorted(keys))})")  # fmt: skip


def _client_class(entry: dict, where: str) -> ClientClass:
    _known_keys(entry, _CLASS_KEYS, "a class", where)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PolicyError(f"{where}: name: every class needs a name (a non-empty string), used in refusals and logs")
    where = f"{where} ({name!r})"

    def strings(key: str) -> tuple[str, ...] | None:
        value = entry.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PolicyError(f"{where}: {key}: expected a list of non-empty strings, got {value!r}")
        return tuple(value)

    def kinds(key: str) -> frozenset[str] | None:
        value = strings(key)
        if value is None:
            return None
        upper = [v.upper() for v in value]
        bad = [v for v in upper if v not in KINDS]
        if bad:
            raise PolicyError(f"{where}: {key}: unknown kind(s) {', '.join(bad)} (one of {', '.join(KINDS)})")
        return frozenset(upper)

    def objects(key: str) -> tuple[ObjectPattern, ...] | None:
        value = strings(key)
        return None if value is None else tuple(ObjectPattern.parse(v, f"{where}: {key}") for v in value)

    networks = None
    if (nets := strings("networks")) is not None:
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in nets)
        except ValueError as e:
            raise PolicyError(f"{where}: networks: {e} (write an address or a network: \"10.0.0.0/8\")") from None
    return ClientClass(
        name=name, users=strings("users"), databases=strings("databases"),
        application_names=strings("application_names"), networks=networks,
        refuse_kinds=kinds("refuse_kinds") or frozenset(), refuse_objects=objects("refuse_objects") or (),
        allow_kinds=kinds("allow_kinds"), allow_objects=objects("allow_objects"),
        masks=(masks := _masks(entry.get("mask"), where)), rewrites=_rewrites(entry, where),
        trusted_functions=tuple(ObjectPattern.parse(v if v.lower().startswith("function:") else "function:" + v,
                                                    f"{where}: trusted_functions")
                                for v in strings("trusted_functions") or ()),
        fingerprint=json.dumps(entry, sort_keys=True, default=str)
        + hashlib.sha256(b"".join(m.key for m in masks)).hexdigest(),
    )  # fmt: skip


def _rewrites(entry: dict, where: str) -> Rewrites:
    table, rules = entry.get("rewrite", []), entry.get("rule", [])
    for key, value in (("rewrite", table), ("rule", rules)):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise PolicyError(f"{where}: {key}: write each as a [[class.{key}]] table under its class")
    entries = []
    for i, item in enumerate(table, 1):
        stray = set(item) - {"match", "replace"}
        if stray or not isinstance(item.get("match"), str) or not isinstance(item.get("replace"), str):
            raise PolicyError(f"{where}: rewrite {i}: a rewrite has match and replace (statements as strings)"
                              + (f"; unknown key(s) {', '.join(sorted(stray))}" if stray else ""))  # fmt: skip
        try:
            entries.append(TableEntry.parse(item["match"], item["replace"]))
        except ValueError as e:
            raise PolicyError(f"{where}: rewrite {i}: {e}") from None
    keys = [e.key for e in entries]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise PolicyError(f"{where}: rewrite {i + 1}: its match is rewrite {keys.index(key) + 1}'s (normalized,"
                              " they are the same statement): keep one")  # fmt: skip
    loaded = []
    for i, item in enumerate(rules, 1):
        name = item.get("rule")
        if name not in RULES:
            raise PolicyError(f"{where}: rule {i}: rule: one of {', '.join(RULES)}, got {name!r}")
        try:
            loaded.append(Rule.load(name, {k: v for k, v in item.items() if k != "rule"}))
        except ValueError as e:
            raise PolicyError(f"{where}: rule {i} ({name}): {e}") from None
    return Rewrites(tuple(entries), tuple(loaded))


def _masks(value, where: str) -> tuple[ColumnMask, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PolicyError(f"{where}: mask: write each mask as a [[class.mask]] table under its class")
    return tuple(_mask(entry, f"{where}: mask {i}") for i, entry in enumerate(value, 1))


def _mask(entry: dict, where: str) -> ColumnMask:
    _known_keys(entry, _MASK_KEYS, "a mask", where)
    column = entry.get("column")
    parts = column.strip().lower().split(".") if isinstance(column, str) else []
    if len(parts) not in (2, 3) or not all(parts):
        raise PolicyError(f"{where}: column: write \"schema.table.column\" or \"table.column\" (globs allowed:"
                          f" \"*.ssn\"), got {column!r}")  # fmt: skip
    schema, table, name = (None, *parts) if len(parts) == 2 else parts
    kind = entry.get("mask")
    if kind not in MASKS:
        raise PolicyError(f"{where} ({column}): mask: one of {', '.join(MASKS)}, got {kind!r}")
    allowed = {"column", "mask", "allow_predicates"} | {"last": {"keep"}, "constant": {"value"},
                                                         "hash": {"key_env"}}.get(kind, set())  # fmt: skip
    stray = set(entry) - allowed
    if stray:
        raise PolicyError(f"{where} ({column}): {', '.join(sorted(stray))}: not a setting of mask {kind!r}")
    keep = entry.get("keep", 4)
    if kind == "last" and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
        raise PolicyError(f"{where} ({column}): keep: the number of last characters shown (0 or more), got {keep!r}")
    value = entry.get("value")
    if kind == "constant" and not isinstance(value, str):
        raise PolicyError(f"{where} ({column}): value: the text shown instead (a string; it must read as the"
                          f" column's type), got {value!r}")  # fmt: skip
    key = b""
    if kind == "hash":
        env = entry.get("key_env")
        if not isinstance(env, str) or not env:
            raise PolicyError(f"{where} ({column}): key_env: the environment variable that holds the hash's key"
                              " (a hash without a secret key can be reversed by hashing guesses)")  # fmt: skip
        secret = os.environ.get(env, "")
        if len(secret) < 16:
            raise PolicyError(f"{where} ({column}): key_env: environment variable {env} must hold a key of at least"
                              f" 16 characters ({'it is not set' if not secret else 'it is shorter'})")  # fmt: skip
        key = secret.encode()
    allow = entry.get("allow_predicates", False)
    if not isinstance(allow, bool):
        raise PolicyError(f"{where} ({column}): allow_predicates: true or false, got {allow!r}")
    return ColumnMask(None if schema == "*" else schema, table, name, kind, column, keep=keep if kind == "last" else 0,
                      value=value if kind == "constant" else "", key=key, allow_predicates=allow)  # fmt: skip
