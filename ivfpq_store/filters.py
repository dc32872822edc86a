"""Which ids a search may return: :class:`Filter`, built from id sets and ranges.

A filter is an immutable expression: :meth:`Filter.allow`, :meth:`Filter.deny` and
:meth:`Filter.id_range` are its leaves, ``&``, ``|`` and ``~`` combine them. It answers two
questions, both without I/O: which of an array of ids it admits (:meth:`Filter.matches`), and,
when that is cheap to know, a finite superset of the ids it admits (:meth:`Filter.bound`),
from which a search can score the admitted vectors directly instead of scanning lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validate import as_id_list
from .errors import InvalidParamsError
from .params import check_int
from .types import I64Array

__all__ = ["Bound", "Filter", "check_filter"]

_INT64_MAX = int(np.iinfo(np.int64).max)


@dataclass(frozen=True, slots=True)
class Bound:
    """A finite superset of the ids a filter admits: the sorted, distinct ``ids``, or (when
    ``ids`` is None) every id in ``lo <= id < hi``."""

    ids: I64Array | None = None
    lo: int = 0
    hi: int = 0


class Filter:
    """Restricts a search to some ids; reusable across calls, stores and threads.

    Build one with :meth:`allow`, :meth:`deny` or :meth:`id_range` and combine with ``&``
    (both), ``|`` (either) and ``~`` (not)::

        tenant = Filter.allow(ids_from_sqlite)
        visible = tenant & ~Filter.deny(hidden_ids)
        store.search(queries, k=10, filter=visible)
    """

    __slots__ = ("_bitmap", "_hi", "_ids", "_kind", "_lo", "_parts")

    def __init__(self, kind: str, *, ids: I64Array | None = None, lo: int = 0, hi: int = 0,
                 parts: tuple[Filter, ...] = ()) -> None:
        # Use the constructors below; this one takes already validated parts.
        self._kind = kind
        self._ids = ids
        self._lo, self._hi = lo, hi
        self._parts = parts
        self._bitmap: np.ndarray | None = None  # allow: admitted[id], built on first use

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def allow(cls, ids: Any) -> Filter:
        """Only these ids: any integer array or sequence, in any order, repeats allowed.
        Negative ids match nothing (no stored id is negative)."""
        return cls("allow", ids=_frozen(as_id_list(ids, "Filter.allow ids")))

    @classmethod
    def deny(cls, ids: Any) -> Filter:
        """Every id but these (``~Filter.allow(ids)``)."""
        return ~cls.allow(ids)

    @classmethod
    def id_range(cls, lo: Any, hi: Any) -> Filter:
        """The ids ``lo <= id < hi`` (half-open, like ``range``); ``lo <= hi``."""
        lo_i = check_int("Filter.id_range lo", lo, -_INT64_MAX - 1, _INT64_MAX)
        hi_i = check_int("Filter.id_range hi", hi, -_INT64_MAX - 1, _INT64_MAX + 1)
        if lo_i > hi_i:
            raise InvalidParamsError(f"Filter.id_range: expected lo <= hi, got lo={lo_i}, "
                                     f"hi={hi_i}")
        return cls("range", lo=lo_i, hi=hi_i)

    # -- combinators ----------------------------------------------------------------------
    def __and__(self, other: object) -> Filter:
        return Filter("and", parts=(self, _check_filter(other, "&")))

    def __or__(self, other: object) -> Filter:
        return Filter("or", parts=(self, _check_filter(other, "|")))

    def __invert__(self) -> Filter:
        if self._kind == "not":
            return self._parts[0]
        return Filter("not", parts=(self,))

    def __bool__(self) -> bool:
        raise TypeError("a Filter has no truth value; combine filters with &, | and ~, not "
                        "with and, or and not")

    def __repr__(self) -> str:
        if self._kind == "allow":
            assert self._ids is not None
            return f"Filter.allow(<{len(self._ids)} ids>)"
        if self._kind == "range":
            return f"Filter.id_range({self._lo}, {self._hi})"
        if self._kind == "not":
            return f"~{self._parts[0]!r}"
        op = " & " if self._kind == "and" else " | "
        return "(" + op.join(repr(p) for p in self._parts) + ")"

    # -- evaluation -----------------------------------------------------------------------
    def matches(self, ids: I64Array) -> np.ndarray:
        """Boolean array: which of ``ids`` (int64, any shape) the filter admits."""
        ids = np.asarray(ids)
        if self._kind == "allow":
            allowed = self._ids
            assert allowed is not None
            if len(allowed) == 0:
                return np.zeros(ids.shape, dtype=bool)
            bitmap = self._allow_bitmap()
            if bitmap is not None:  # 40x faster than a binary search of a large set
                inside = (ids >= 0) & (ids < len(bitmap))
                return bitmap[np.where(inside, ids, 0)] & inside
            at = np.searchsorted(allowed, ids)
            np.minimum(at, len(allowed) - 1, out=at)
            return allowed[at] == ids  # type: ignore[no-any-return]
        if self._kind == "range":
            return (ids >= self._lo) & (ids < self._hi)
        if self._kind == "not":
            return ~self._parts[0].matches(ids)
        first, second = self._parts
        mask = first.matches(ids)
        if self._kind == "and":
            return mask & second.matches(ids)  # type: ignore[no-any-return]
        return mask | second.matches(ids)  # type: ignore[no-any-return]

    def _allow_bitmap(self) -> np.ndarray | None:
        """For an allow set whose ids are dense enough (the largest below 16 bytes per
        allowed id, or 1 MiB): a bool array indexed by id. Built once, read-only; two threads
        that race build the same array."""
        if self._bitmap is None:
            allowed = self._ids
            assert allowed is not None
            top = int(allowed[-1])
            if top >= max(16 * len(allowed), 1 << 20):
                return None
            bitmap = np.zeros(top + 1, dtype=bool)
            bitmap[allowed] = True
            bitmap.flags.writeable = False
            self._bitmap = bitmap
        return self._bitmap

    def bound(self) -> Bound | None:
        """A finite superset of the admitted ids when one is known without I/O: the allowed
        ids, a range, their intersections and unions of id sets; None when the filter admits
        ids without end (``~``, ``deny``) or only a union of ranges bounds it."""
        if self._kind == "allow":
            return Bound(ids=self._ids)
        if self._kind == "range":  # no stored id is negative
            return Bound(lo=max(self._lo, 0), hi=max(self._hi, 0))
        if self._kind == "not":
            return None
        a, b = (p.bound() for p in self._parts)
        if self._kind == "and":
            if a is None or b is None:
                return a if b is None else b
            if a.ids is not None:
                return Bound(ids=a.ids[Filter._from_bound(b).matches(a.ids)])
            if b.ids is not None:
                return Bound(ids=b.ids[Filter._from_bound(a).matches(b.ids)])
            lo, hi = max(a.lo, b.lo), min(a.hi, b.hi)
            return Bound(lo=lo, hi=max(lo, hi))
        if a is None or b is None or a.ids is None or b.ids is None:
            return None
        return Bound(ids=np.union1d(a.ids, b.ids))

    @staticmethod
    def _from_bound(bound: Bound) -> Filter:
        if bound.ids is not None:
            return Filter("allow", ids=bound.ids)
        return Filter("range", lo=bound.lo, hi=bound.hi)


def _frozen(ids: I64Array) -> I64Array:
    """A read-only copy, so that no caller can change a filter another thread uses."""
    out = np.array(ids, dtype=np.int64)
    out.flags.writeable = False
    return out


def _check_filter(other: object, op: str) -> Filter:
    if not isinstance(other, Filter):
        raise InvalidParamsError(f"Filter {op}: expected a Filter, got "
                                 f"{type(other).__name__}")
    return other


def check_filter(value: object) -> Filter | None:
    """``value`` if it is a Filter or None, else InvalidParamsError naming ``filter``."""
    if value is None or isinstance(value, Filter):
        return value
    raise InvalidParamsError(f"filter: expected an ivfpq_store.Filter or None, got "
                             f"{type(value).__name__} (build one with Filter.allow(ids))")
