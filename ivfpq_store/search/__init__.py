"""IVF-PQ search: plan the (query, list) pairs, scan them, keep an exact top-k (or, for a
range search, every record within the radius).

- :mod:`.searcher`: one search call, and the choice of scan;
- :mod:`.plan`: the pairs grouped by list, and the record-fetch seam;
- :mod:`.filtered`: the two plans of a filtered search (a scan of only the admitted rows, or
  the admitted vectors scored directly);
- :mod:`.kernel_scan`: the compiled scan (:mod:`ivfpq_store._kernel`);
- :mod:`.numpy_batch`, :mod:`.numpy_single`: the numpy scans, with :mod:`.tables` (ADC
  lookup tables) and :mod:`.topk` (the pruned running top-k);
- :mod:`.refine`: exact re-ranking of the scans' candidates with the stored vectors;
- :mod:`.range`: the range scan (every record within a radius, numpy only);
- :mod:`.config`: the tuning knobs, one frozen :class:`SearchConfig`.
"""

from __future__ import annotations

from .config import DEFAULT_CONFIG, SearchConfig
from .filtered import SearchPlan
from .plan import RecordFetcher
from .searcher import (
    Probe,
    ProbedResult,
    RangeResult,
    Refiner,
    ScanSource,
    Searcher,
    SearchResult,
)

__all__ = ["DEFAULT_CONFIG", "Probe", "ProbedResult", "RangeResult", "RecordFetcher", "Refiner",
           "ScanSource", "SearchConfig", "SearchPlan", "SearchResult", "Searcher"]
