"""Per-request routing on a gateway: which backend a request for a host with rules (from an
Ingress or HTTPRoute) goes to, and the header edits on the way. Pure; built once per config.

Rules come from control in order of precedence and the first one with a fitting match wins, so
the gateway never ranks them itself. A request's path is normalized before it is matched and the
normalized path is the one forwarded: the backend sees exactly the path that chose it. Without
that, ``/public/%2e%2e/admin`` would be matched as under ``/public`` and served as ``/admin`` by
an origin that normalizes; encoded slashes and backslashes (``%2F``, ``%5C``, ``\\``), which
origins disagree about, are refused outright on hosts with rules, as are fragments (``#``: an
origin stops reading the path there) and dot segments with parameters (``..;x``: Java servers
drop the parameter and read ``..``).

A host's rules are bounded (:data:`MAX_CONDITIONS` conditions in all; rules beyond are left out
and counted), and a request's headers are read into a dict once, so no rule set makes a request
cost more than a few thousand comparisons. Compiling never fails: a rule path that could never
fit (control refuses those) fits nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import unquote_to_bytes

from kakuremichi.api.protocol import HeaderEdits, PathMatch, RequestMatch, RequestRule
from kakuremichi.api.request_paths import PathRefused, normalize_path
from kakuremichi.edge.request_heads import HOP_BY_HOP, address_field

PROTECTED = frozenset((b"host", b"content-length", b"trailer", *HOP_BY_HOP))
"""Fields a header edit never touches: the gateway frames the request and names the client
itself (control refuses such edits; a gateway ignores them if one arrives anyway)."""
MAX_CONDITIONS = 2048
"""Path, method, header and query conditions of one host, in all."""
_NEVER = b"\x00"
"""A path no request has (normalized paths have no NUL): what an impossible rule path fits."""


@dataclass(frozen=True, slots=True)
class _Path:
    exact: bool
    value: bytes

    @classmethod
    def of(cls, match: PathMatch) -> _Path:
        try:
            value = normalize_path(match.value.encode())
        except PathRefused:
            return cls(True, _NEVER)
        if match.type == "PathPrefix":
            value = value.rstrip(b"/")  # "/api/" is the prefix "/api"; "/" is "" then
        return cls(match.type == "Exact", value)


@dataclass(frozen=True, slots=True)
class _Match:
    path: _Path | None
    method: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]
    query: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, match: RequestMatch) -> _Match:
        return cls(
            _Path.of(match.path) if match.path is not None else None,
            match.method.encode() if match.method else None,
            tuple(_first_of_each((h.name.lower().encode(), h.value.encode())
                                 for h in match.headers or ())),
            tuple(_first_of_each((unquote_to_bytes(q.name), unquote_to_bytes(q.value))
                                 for q in match.query or ())),
        )  # fmt: skip

    @property
    def besides_path(self) -> bool:
        """Whether it has conditions other than its path."""
        return self.method is not None or bool(self.headers) or bool(self.query)

    def fits_besides_path(self, request: Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        for name, value in self.headers:
            if request.header(name) != value:
                return False
        return all(request.query_value(name) == value for name, value in self.query)


def _first_of_each(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Gateway API: of entries naming the same field, only the first counts."""
    seen: set[bytes] = set()
    kept = []
    for name, value in pairs:
        if name not in seen:
            seen.add(name)
            kept.append((name, value))
    return kept


@dataclass(slots=True)
class Request:
    """What rules look at, taken from a request head only when its host has rules."""

    method: bytes
    path: bytes
    """Normalized (:func:`normalize_path`)."""
    query: bytes
    header_lines: Sequence[bytes]
    """``name: value\\r\\n``, as the client sent them."""
    header_names: Sequence[bytes]
    """Lower case, one per line."""
    _query: dict[bytes, bytes] | None = None
    _headers: dict[bytes, bytes] | None = None

    def header(self, lower: bytes) -> bytes | None:
        """The value of field ``lower``; repeated fields joined with ``, `` (RFC 9110 5.3)."""
        if self._headers is None:
            self._headers = {}
            for line, name in zip(self.header_lines, self.header_names, strict=True):
                value = line[len(name) + 2 : -2].strip()
                known = self._headers.get(name)
                self._headers[name] = value if known is None else known + b", " + value
        return self._headers.get(lower)

    def query_value(self, name: bytes) -> bytes | None:
        """The first value of query parameter ``name``, percent-decoded."""
        if self._query is None:
            self._query = {}
            for pair in self.query.split(b"&"):
                key, _, value = pair.partition(b"=")
                self._query.setdefault(unquote_to_bytes(key), unquote_to_bytes(value))
        return self._query.get(name)


@dataclass(frozen=True, slots=True)
class Edits:
    """Request header modifiers, compiled: removed names, then set and added lines."""

    drop: frozenset[bytes]
    lines: tuple[bytes, ...]
    names: tuple[bytes, ...]

    @classmethod
    def of(cls, edits: HeaderEdits | None) -> Edits | None:
        if edits is None:
            return None
        allowed = [
            pair for pair in (*(edits.set or ()), *(edits.add or ()))
            if _editable(pair.name.lower().encode())
        ]  # fmt: skip
        set_names = {p.name.lower().encode() for p in edits.set or () if p in allowed}
        removed = {n.lower().encode() for n in edits.remove or ()}
        drop = frozenset(n for n in removed | set_names if _editable(n))
        lines = tuple(f"{p.name}: {p.value}\r\n".encode() for p in allowed)
        names = tuple(p.name.lower().encode() for p in allowed)
        return cls(drop, lines, names) if drop or lines else None

    def apply(
        self, lines: Sequence[bytes], names: Sequence[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        """The header lines and their lower-case names after the edits."""
        kept = [i for i, name in enumerate(names) if name not in self.drop]
        return (
            [*(lines[i] for i in kept), *self.lines],
            [*(names[i] for i in kept), *self.names],
        )


def _editable(lower: bytes) -> bool:
    return lower not in PROTECTED and not address_field(lower)


@dataclass(frozen=True, slots=True)
class Choice:
    stream: str | None
    """The backend's stream name; None: the rule has no backend to send to (500)."""
    edits: Edits | None


@dataclass(frozen=True)
class _Rule:
    matches: tuple[_Match, ...]
    streams: tuple[str | None, ...]
    """None: that share is answered 500."""
    bounds: tuple[int, ...]
    """Cumulative weights: backend i takes picks below bounds[i]."""
    edits: Edits | None

    @classmethod
    def of(cls, rule: RequestRule) -> _Rule:
        weighted = [b for b in rule.backends if b.weight > 0]
        bounds, total = [], 0
        for backend in weighted:
            total += backend.weight
            bounds.append(total)
        return cls(
            tuple(_Match.of(m) for m in rule.matches or ()),
            tuple(b.stream for b in weighted),
            tuple(bounds),
            Edits.of(rule.request_headers),
        )

    def choice(self, draw: Callable[[int], int]) -> Choice:
        if len(self.streams) <= 1:  # (the common case: no draw, one object per rule)
            return self._fixed
        return Choice(self.pick(draw), self.edits)

    @cached_property
    def _fixed(self) -> Choice:
        return Choice(self.streams[0] if self.streams else None, self.edits)

    def pick(self, draw: Callable[[int], int]) -> str | None:
        if not self.streams:
            return None
        if len(self.streams) == 1:
            return self.streams[0]
        ticket = draw(self.bounds[-1])
        for stream, bound in zip(self.streams, self.bounds, strict=True):
            if ticket < bound:
                return stream
        return self.streams[-1]


def _conditions(rule: RequestRule) -> int:
    return max(1, sum(
        max(1, (m.path is not None) + (m.method is not None) + len(m.headers or ())
               + len(m.query or ()))
        for m in rule.matches or ()
    ))  # fmt: skip


class RequestRouter:
    """A host's rules, compiled once."""

    __slots__ = ("_draw", "_entries", "_rules", "left_out", "streams")

    def __init__(
        self, rules: Sequence[RequestRule], draw: Callable[[int], int] = random.randrange
    ) -> None:
        kept, budget = [], MAX_CONDITIONS
        for rule in rules:
            budget -= _conditions(rule)
            if budget < 0:
                break
            kept.append(_Rule.of(rule))
        self._rules = tuple(kept)
        self.left_out = len(rules) - len(kept)
        """Rules beyond :data:`MAX_CONDITIONS` (control refuses what would need them)."""
        self._draw = draw
        self.streams = frozenset(s for rule in self._rules for s in rule.streams if s is not None)
        """Every backend stream the rules may choose."""
        self._entries = tuple(
            _entry(m, rule) for rule in self._rules for m in rule.matches or (None,)
        )
        """Each match of each rule, in order, flattened for :meth:`choose`'s one loop."""

    def choose(self, request: Request) -> Choice | None:
        """The first fitting rule's choice; None: no rule fits (404)."""
        path = request.path
        for kind, value, under, rest, rule in self._entries:
            # (inlined path tests: this loop is per request and per rule)
            if kind == _EXACT:
                if path != value:
                    continue
            elif kind == _PREFIX and path != value and not path.startswith(under):
                continue
            if rest is not None and not rest.fits_besides_path(request):
                continue
            return rule.choice(self._draw)
        return None


_ANY, _EXACT, _PREFIX = 0, 1, 2
_Entry = tuple[int, bytes, bytes, _Match | None, _Rule]


def _entry(match: _Match | None, rule: _Rule) -> _Entry:
    """(path test, its value, the value with a slash, the match if it has more to test, rule)."""
    path = match.path if match is not None else None
    rest = match if match is not None and match.besides_path else None
    if path is None or (not path.exact and not path.value):  # (the prefix "/": every path)
        return _ANY, b"", b"", rest, rule
    if path.exact:
        return _EXACT, path.value, b"", rest, rule
    return _PREFIX, path.value, path.value + b"/", rest, rule
