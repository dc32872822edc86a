"""Array type aliases, the Metric enum and the progress-callback type. No logic."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = ["F32Array", "I64Array", "IfExists", "Metric", "MetricName", "PathArg", "ProgressFn",
           "StepFn", "SyncPolicy", "U8Array", "VectorType"]

F32Array: TypeAlias = npt.NDArray[np.float32]
U8Array: TypeAlias = npt.NDArray[np.uint8]
I64Array: TypeAlias = npt.NDArray[np.int64]
#: ``progress(stage, done, total)``: a long operation's progress (:mod:`ivfpq_store.progress`).
ProgressFn: TypeAlias = Callable[[str, int, int], None]
#: ``advance(n)``: ``n`` more steps of the stage in progress done.
StepFn: TypeAlias = Callable[[int], None]
#: A file-system path as the standard library takes it; bytes are decoded with os.fsdecode.
PathArg: TypeAlias = str | bytes | os.PathLike[str] | os.PathLike[bytes]
#: How a write makes its files durable (``open(sync=...)``).
SyncPolicy: TypeAlias = Literal["auto", "files", "filesystem"]
#: A metric by name (``create(metric=...)``); :class:`Metric` is the same as an enum.
MetricName: TypeAlias = Literal["l2", "ip", "cosine"]
#: What ``create`` does when its path exists.
IfExists: TypeAlias = Literal["error", "open", "replace"]
#: The element type of stored vectors (``create(store_vectors=...)``).
VectorType: TypeAlias = Literal["float32", "float16"]


class Metric(enum.IntEnum):
    """Similarity metric; the integer value is what the header stores (docs/format.md)."""

    L2 = 0  #: squared Euclidean distance, smaller is better
    IP = 1  #: inner product, larger is better
    COSINE = 2  #: inner product of L2-normalised vectors, larger is better

    @property
    def label(self) -> str:
        """The lower-case name used by the API and the CLI (``"l2"``, ``"ip"``, ``"cosine"``)."""
        return self.name.lower()

    @property
    def higher_is_better(self) -> bool:
        """True for similarity scores (ip, cosine), False for distances (l2)."""
        return self is not Metric.L2
