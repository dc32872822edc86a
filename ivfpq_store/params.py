"""Validated, immutable parameter objects: the shape of an index and of a search."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from .errors import InvalidParamsError
from .types import Metric, ProgressFn, VectorType

__all__ = [
    "MAX_DIM",
    "MAX_K",
    "MAX_M",
    "MAX_NLIST",
    "IndexParams",
    "RangeParams",
    "SearchParams",
    "check_balance",
    "check_int",
    "check_int_values",
    "check_progress",
    "check_radius",
    "check_ratio",
    "check_split_factor",
    "check_store_vectors",
    "parse_metric",
]

#: Sanity caps; the header format could hold more, but nothing sensible needs it.
MAX_DIM = 1 << 16
MAX_NLIST = 1 << 24
MAX_K = 1 << 20
#: m is a u16 in the header and 8 + m a u16 in segments (docs/format.md); 4096 is plenty.
MAX_M = 1 << 12
#: Centroids must fit the 4 GiB header cap (storage/header_io.py).
MAX_CENTROID_FLOATS = (1 << 30) - (1 << 24)
#: The largest finite float32.
_FLT_MAX = float(np.finfo(np.float32).max)


def parse_metric(metric: str | Metric) -> Metric:
    """Turn ``"l2"``, ``"ip"``, ``"cosine"`` (any case) or a :class:`Metric` into a Metric."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return Metric[metric.strip().upper()]
        except KeyError:
            pass
    choices = ", ".join(repr(m.label) for m in Metric)
    raise InvalidParamsError(f"metric: expected one of {choices}, got {metric!r}")


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """Return ``value`` as an int if it is an integer (Python or numpy) in ``lo..hi``."""
    if isinstance(value, bool | np.bool_):
        raise InvalidParamsError(f"{name}: expected an int, got bool {value!r}")
    try:
        ivalue = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidParamsError(
            f"{name}: expected an int, got {type(value).__name__} {value!r}"
        ) from None
    if not lo <= ivalue <= hi:
        raise InvalidParamsError(f"{name}: expected {lo}..{hi}, got {ivalue}")
    return ivalue


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool (Python or numpy): a flag given "no", 1 or None is a
    mistake, not a truth value."""
    if not isinstance(value, bool | np.bool_):
        raise InvalidParamsError(
            f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_int_values(name: str, values: object, lo: int, hi: int) -> tuple[int, ...]:
    """``values`` (an int, or a non-empty sequence of them) as distinct ints in ``lo..hi``,
    sorted."""
    items = [values] if not isinstance(values, list | tuple | np.ndarray | range) else values
    if not len(items):
        raise InvalidParamsError(f"{name}: expected at least one value, got none")
    return tuple(sorted({check_int(name, v, lo, hi) for v in items}))


def check_progress(value: object) -> ProgressFn | None:
    """Return ``value`` if it is None or callable: a ``progress`` callback
    (:mod:`ivfpq_store.progress`)."""
    if value is not None and not callable(value):
        raise InvalidParamsError(
            f"progress: expected a callable progress(stage, done, total) or None, got "
            f"{type(value).__name__} {value!r}")
    return value


def check_radius(name: str, value: object, metric: Metric) -> float:
    """Return ``value`` as a float if it is a real number (Python or numpy; not a bool) that
    float32 holds as a finite value; under l2, a squared distance, it must also be >= 0."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer
                                                            | np.floating):
        raise InvalidParamsError(
            f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    expected = (f"{name}: expected a finite number within float32 range "
                f"(|{name}| <= {_FLT_MAX:.7g})")
    try:
        radius = float(value)
    except OverflowError:
        raise InvalidParamsError(f"{expected}, got an integer beyond float range") from None
    # Compared in float32, as the costs are (and as faiss's float radius is): a value that
    # float32 cannot hold would turn into infinity there.
    if not (math.isfinite(radius) and abs(radius) <= _FLT_MAX):
        raise InvalidParamsError(f"{expected}, got {value!r}")
    if metric is Metric.L2 and radius < 0:
        raise InvalidParamsError(
            f"{name}: expected a squared l2 distance >= 0, got {radius!r}; under l2 a result "
            "is a vector whose squared distance is below the radius")
    return radius


def check_store_vectors(value: object) -> VectorType | None:
    """``store_vectors`` of :func:`~ivfpq_store.create`: None, ``"float32"`` or
    ``"float16"``."""
    if value is None:
        return None
    if value == "float32":
        return "float32"
    if value == "float16":
        return "float16"
    raise InvalidParamsError(f"store_vectors: expected None, 'float32' or 'float16', got "
                             f"{value!r}")


def check_fast_scan(value: object, nbits: int) -> bool:
    """``fast_scan`` of :func:`~ivfpq_store.create` for codes of ``nbits`` bits: True or
    False, and None for the default, which is True exactly for 4-bit codes."""
    if value is None:
        return nbits == 4
    if not isinstance(value, bool | np.bool_):
        raise InvalidParamsError(f"fast_scan: expected True, False or None, got {value!r}")
    if value and nbits != 4:
        raise InvalidParamsError(
            f"fast_scan: the fast scan looks up 4-bit codes, so it needs nbits=4, got "
            f"nbits={nbits}")
    return bool(value)


def check_ratio(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a real number in 0..1."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise InvalidParamsError(f"{name}: expected a number in 0..1, got {value!r}")
    ratio = float(value)
    if not 0.0 <= ratio <= 1.0:
        raise InvalidParamsError(f"{name}: expected 0..1, got {ratio:g}")
    return ratio


def check_split_factor(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number > 1 (a multiple of the mean
    list size)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number) or (
            not float(value) > 1.0 or not np.isfinite(float(value))):
        raise InvalidParamsError(f"{name}: expected a finite number > 1 (a multiple of the "
                                 f"mean list size), got {value!r}")
    return float(value)


def check_balance(split_factor: object, merge_factor: object,
                  neighbours: object) -> tuple[float, float, int]:
    """A rebalance's thresholds: ``split_factor`` a finite number > 1, ``merge_factor`` one
    in 0..1, ``neighbours`` an int in 0..4096."""
    return (check_split_factor("split_factor", split_factor),
            check_ratio("merge_factor", merge_factor),
            check_int("neighbours", neighbours, 0, 4096))


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexParams:
    """Immutable shape of an index; written to the header at creation.

    Parameters
    ----------
    dim : int
        Vector dimension, divisible by ``m``.
    nlist : int
        Number of coarse cells (inverted lists).
    m : int
        Number of PQ sub-quantizers; each code is ``m`` bytes.
    nbits : int
        Bits per sub-quantizer index, 1..8 (``ksub = 2**nbits`` sub-centroids).
    metric : Metric
        Similarity metric.
    """

    dim: int
    nlist: int
    m: int
    nbits: int = 8
    metric: Metric = Metric.L2

    def __post_init__(self) -> None:
        for name, lo, hi in (("dim", 1, MAX_DIM), ("nlist", 1, MAX_NLIST), ("nbits", 1, 8)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), lo, hi))
        object.__setattr__(self, "m", check_int("m", self.m, 1, min(self.dim, MAX_M)))
        if self.nlist * self.dim > MAX_CENTROID_FLOATS:
            raise InvalidParamsError(
                f"nlist: nlist * dim = {self.nlist * self.dim} centroid floats — expected at most "
                f"{MAX_CENTROID_FLOATS} so the header stays under 4 GiB")
        if self.dim % self.m:
            raise InvalidParamsError(
                f"m: dim={self.dim} must be divisible by m, got m={self.m}"
                f" (divisors of {self.dim} up to 64: "
                f"{[d for d in range(1, min(self.dim, 64) + 1) if self.dim % d == 0]})"
            )
        if not isinstance(self.metric, Metric):
            object.__setattr__(self, "metric", parse_metric(self.metric))

    @property
    def dsub(self) -> int:
        """Width of one sub-vector, ``dim // m``."""
        return self.dim // self.m

    @property
    def ksub(self) -> int:
        """Sub-centroids per sub-quantizer, ``2**nbits``."""
        return 1 << self.nbits

    @property
    def code_size(self) -> int:
        """Bytes per PQ code: one byte per sub-quantizer, whatever ``nbits`` is."""
        return self.m


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchParams:
    """Per-call search settings, validated against the index they apply to."""

    k: int
    nprobe: int
    #: 0, or R >= 1: the scans keep the best R * k by PQ distance, re-ranked exactly.
    refine: int = 0

    @property
    def scan_k(self) -> int:
        """Candidates the scans keep per query: ``k``, or ``refine * k``."""
        return self.k * max(self.refine, 1)

    @classmethod
    def checked(cls, k: object, nprobe: object, nlist: int, refine: object = 0, *,
                vectors: bool = False) -> SearchParams:
        """Validate ``k >= 1``, ``1 <= nprobe <= nlist`` and ``refine >= 0`` (``refine * k``
        at most the largest ``k``; ``refine >= 1`` only on a store that keeps vectors) and
        build the value (kept for the next call with the same plain ints: a single query
        checks its parameters on every call)."""
        key = (k, nprobe, refine, nlist, vectors)
        plain = type(k) is int and type(nprobe) is int and type(refine) is int
        if plain:
            seen = _CHECKED.get(key)
            if seen is not None:
                return seen
        k = check_int("k", k, 1, MAX_K)
        nprobe = check_int("nprobe", nprobe, 1, nlist)
        refine = check_int("refine", refine, 0, MAX_K // k)
        if refine and not vectors:
            raise InvalidParamsError(
                f"refine: {refine} needs stored vectors, and this store keeps none; create "
                "the store with store_vectors='float32' or 'float16' to re-rank")
        params = cls(k=k, nprobe=nprobe, refine=refine)
        if plain:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()
            _CHECKED[key] = params
        return params


#: Search parameters already checked, by (k, nprobe, refine, nlist, vectors) of plain ints.
_CHECKED: dict[tuple[object, ...], SearchParams] = {}
_CHECKED_MAX = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeParams:
    """Per-call range search settings, validated against the index they apply to.

    ``radius`` is a squared distance under l2 (results have distance < radius) and a score
    under ip and cosine (results have score > radius).
    """

    radius: float
    nprobe: int

    @classmethod
    def checked(cls, radius: object, nprobe: object, nlist: int, metric: Metric) -> RangeParams:
        """Validate ``radius`` (:func:`check_radius`) and ``1 <= nprobe <= nlist``."""
        return cls(radius=check_radius("radius", radius, metric),
                   nprobe=check_int("nprobe", nprobe, 1, nlist))
