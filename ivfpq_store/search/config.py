"""The search's tuning knobs, in one frozen value: memory budgets, thresholds, threads.

None of them changes a result but the filtered-search cost model, which chooses between two
plans whose results are documented (a scan of the probed lists, or every admitted vector):
each moves work between strategies or between blocks, and tests use small values to drive
every branch (see tests/test_search.py, tests/test_filters.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _kernel
from ..quantizer import PROBE_BLOCK

__all__ = ["DEFAULT_CONFIG", "SearchConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchConfig:
    """How a :class:`~ivfpq_store.search.Searcher` splits its work. The defaults are measured
    on this project's benchmarks (docs/benchmarks.md)."""

    #: Queries whose coarse scores (nq, nlist) the numpy probe computes at once.
    probe_block: int = PROBE_BLOCK
    #: Floats of costs per numpy scan block (16 MiB): a list is scored in row blocks of at
    #: most this many (row, query) costs, so memory is bounded whatever the list sizes.
    scan_budget: int = 4 << 20
    #: Candidates the numpy running top-k holds before it is cut back to the best k per query.
    pool_budget: int = 1 << 20
    #: Costs sampled by :func:`~ivfpq_store.search.topk.kth_bound` for a single query's block.
    sample: int = 2048
    #: A list probed by fewer queries of a numpy batch than this is scored from lookup
    #: tables, with the pairs of many such lists gathered together, instead of being decoded
    #: for a matrix product (per row: about 140 ns decoded for one query, about 35 ns from
    #: tables; measured).
    few_queries: int = 3
    #: Floats of lookup tables gathered from at once by the few-queries path (1 MiB).
    table_cache: int = 1 << 18
    #: Records a range search scores per block of queries (summed over the lists each query
    #: probes; at least one query per block): the block's candidates (about 60 bytes each at
    #: the peak, 120 MiB at most here) are held until they are sorted; only the results (12
    #: bytes each) are kept across blocks.
    range_budget: int = 1 << 21
    #: Floats of stored vectors a refined search gathers per block of queries (refine * k
    #: candidates of dim floats each; 16 MiB here; at least one query per block).
    refine_budget: int = 4 << 20
    #: Threads of the C kernel (one per CPU this process may run on; see _kernel.THREADS).
    threads: int = _kernel.THREADS
    #: Queries below which the kernel probes on one thread.
    thread_min_queries: int = 8
    #: Rows to scan (summed over the (query, list) pairs) below which the kernel uses one
    #: thread: starting a thread costs about as much as scanning a few thousand rows.
    thread_min_rows: int = 1 << 16
    #: Bytes of query tables (16 KiB per query at m=16) and candidate heaps (24 bytes per
    #: candidate, k per query and thread) the kernel may hold; bigger batches are scanned in
    #: blocks of queries.
    kernel_budget: int = 32 << 20
    #: Bytes of l2 list terms (m * 256 floats per list) kept for the life of the searcher: up
    #: to 4,096 lists at m=16. Past it each scanned list's terms are recomputed by every search.
    list_terms_budget: int = 64 << 20
    #: A filtered scan reads a compact copy of a list's admitted live rows when they are at
    #: most this fraction of its records (else it skips the others like tombstones), while the
    #: copies of one call hold at most ``filter_copy_budget`` bytes (64 MiB: the records of
    #: 2.8M vectors at m=16). Batch of 1,000, 200k vectors, nlist 256, nprobe 16, against the
    #: unfiltered batch: 50% admitted 0.66x copied, 1.10x skipped; 25% 0.46x, 1.11x; 10%
    #: 0.32x, 1.14x; at 90% copies (0.98x) barely beat skipping (1.06x), and skipping copies
    #: nothing for a filter that denies a few ids (/tmp script timing both ways).
    filter_copy_ratio: float = 0.75
    filter_copy_budget: int = 64 << 20
    #: The cost model that chooses a filtered search's plan (search/filtered.py,
    #: ``direct_limit``), in nanoseconds, fitted to `python tools/bench.py --dataset synthetic
    #: --n 1000000 --nlist 1024 --nprobe 16 --filters 0.5,0.1,0.01,0.001` (2 cores, C kernel):
    #: a direct plan costs about 18 us per candidate once per call (its id-map lookup, the
    #: segment maps of the lists it touches, decoding) plus 40 ns per candidate and query; a
    #: scan 13 ns per probed row and query plus 115 ns per probed row once. The direct plan
    #: has become about twice as cheap per call since that fit (one pass per list), and the
    #: scan of a selective filter reads compact copies of the admitted rows (at 1% admitted,
    #: 0.2x the unfiltered batch, 200k vectors, nlist 256, nprobe 16); on that store the
    #: model still picks the faster plan from 0.1% to 10% admitted, for one query and for
    #: 1,000 (/tmp script timing both plans forced).
    direct_per_candidate: float = 18_000.0
    direct_per_pair: float = 40.0
    scan_per_row_once: float = 115.0
    scan_per_row: float = 13.0


DEFAULT_CONFIG = SearchConfig()
