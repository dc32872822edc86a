"""The progress protocol of long operations: named stages, each with a total known when it
starts, reported to a :data:`~ivfpq_store.types.ProgressFn` as ``(stage, done, total)``.

Every operation that takes a ``progress`` callback (``create``, ``add``, ``upsert``,
``compact``, ``verify``, ``copy``, ``retrain``, ``rebalance``) runs one or more of the stages
in :data:`STAGES`, one after the other. A stage is reported first with ``done == 0``, then
after each step with the steps done so far, and last with ``done == total`` (unless the
operation fails). ``total`` is 0 only for a stage whose size is not known in advance (a
rebalance's splits and merges); its last report then has ``total == done``. A stage may run
several times in one operation (an ``add`` whose encoded batch a retrain made stale is
encoded again; a retrain encodes, then writes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import ProgressFn

__all__ = ["STAGES", "Stage", "StageInfo"]


@dataclass(frozen=True)
class StageInfo:
    """What a stage does (``label``) and what its steps count (``unit``)."""

    label: str
    unit: str


#: Every stage an operation reports, by name.
STAGES: dict[str, StageInfo] = {
    "train-opq": StageInfo("training the OPQ rotation", "iterations"),
    "train-coarse": StageInfo("training the coarse quantizer", "iterations"),
    "train-pq": StageInfo("training the sub-quantizers", "sub-quantizer iterations"),
    "encode": StageInfo("assigning and encoding", "vectors"),
    "write": StageInfo("writing", "vectors"),
    "compact": StageInfo("compacting", "lists"),
    "verify": StageInfo("verifying", "lists"),
    "copy": StageInfo("copying", "lists"),
    "rebalance": StageInfo("splitting and merging lists", "steps"),
}


class Stage:
    """One run of a stage: reports ``(name, 0, total)`` when made, then ``advance(n)``
    reports the steps done so far. Without a callback it does nothing."""

    __slots__ = ("_progress", "done", "name", "total")

    def __init__(self, progress: ProgressFn | None, name: str, total: int) -> None:
        assert name in STAGES, name
        self._progress = progress
        self.name = name
        self.total = total
        self.done = 0
        if progress is not None:
            progress(name, 0, total)

    def advance(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.done += n
        if self._progress is not None:
            self._progress(self.name, self.done, self.total)

    def finish(self) -> None:
        """Report a stage of unknown size as done (``total`` becomes ``done``)."""
        if not self.total:
            self.total = self.done
            if self._progress is not None:
                self._progress(self.name, self.done, self.done)
