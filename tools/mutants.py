"""Curated mutation testing: apply hand-made bugs one at a time and check the tests catch them.

Each mutant replaces one short snippet of ``ivfpq_store/`` (Python or the C kernel) with a
buggy version. The snippet is found by searching every ``*.py`` and ``*.c`` file under
``ivfpq_store/`` for exactly one occurrence, so a mutant survives code being moved between
modules; zero or several matches is an error naming the files. Each mutant is applied to a
temporary copy of the repository (never the real tree); a C mutant is rebuilt there with
``python setup.py build_ext --inplace -q`` (or, where the installed setuptools is too old to
read pyproject.toml, setup.py's extension alone with the same flags) and the copy's kernel is
checked to load from the copy. Then
``python -m pytest -x -q -p no:cacheprovider <args>`` runs in the copy (cwd and PYTHONPATH
the copy). A mutant is *killed* when pytest reports failures, hangs past ``TIMEOUT`` or dies
of a signal (a crash is a detected bug), *survived* when it passes.

Usage (from anywhere; the repository is this file's parent's parent)::

    python tools/mutants.py                  # run every mutant, print the kill rate
    python tools/mutants.py --list           # list the mutants and where each applies
    python tools/mutants.py --only ID [--only ID ...]
    python tools/mutants.py --no-baseline    # skip the unmutated run of the same tests

Before the mutants, the union of their tests runs once on an unmutated copy (the baseline):
a mutant "killed" by tests that fail anyway would prove nothing. Exit status: 0 when every
mutant was killed, 1 when any survived or could not be run, 2 on a usage or setup error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "ivfpq_store"
#: Not copied: version control, environments, caches and build leftovers.
IGNORE = shutil.ignore_patterns(".git", "venv", ".venv", "__pycache__", ".pytest_cache",
                                ".mypy_cache", ".ruff_cache", ".hypothesis", "build", "dist",
                                "*.egg-info", "bench-out", "*.ivfpq")
#: Seconds one mutant's tests may run; longer counts as killed (a hang is a detected bug).
TIMEOUT = 900

class Mutant(NamedTuple):
    """One hand-made bug: ``original`` (unique in the package) becomes ``replacement``."""

    id: str
    description: str
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: test files, node ids, -k expressions


MUTANTS: tuple[Mutant, ...] = (
    # -- the seven that survived the whole default suite ------------------------------------
    Mutant("add-no-dir-fsync",
           "an add that creates segment files does not fsync the segments/ directory",
           "fsync_dir(self._layout.segments)  # new files'",
           "pass  # new files'",
           ("tests/test_writes.py", "-k", "fsyncs_their_directory")),
    Mutant("compact-no-segment-sync",
           "compaction never fdatasyncs the new segments before the catalog switch",
           "SyncJob(written, policy=sync, directory=layout.segments).wait()",
           "SyncJob([], policy=sync, directory=layout.segments).wait()",
           ("tests/test_mutation.py", "-k", "compaction_syncs")),
    Mutant("numpy-merge-row-before-rank",
           "numpy single-query block merge orders ties by row before probe rank",
           "np.lexsort((both.row, both.rank, both.cost))",
           "np.lexsort((both.rank, both.row, both.cost))",
           ("tests/test_search.py", "-k", "ties_across_lists")),
    Mutant("numpy-probe-off-by-one",
           "numpy probe takes every list when nprobe == nlist - 1",
           "elif nprobe < scores.shape[1]:",
           "elif nprobe < scores.shape[1] - 1:",
           ("tests/test_search.py", "-k", "nlist_minus_one")),
    Mutant("open-no-format-major-check",
           "open accepts a catalog whose store format has another major version",
           "if list(meta.format)[:1] != [HEADER_VERSION[0]]:",
           "if False and list(meta.format)[:1] != [HEADER_VERSION[0]]:",
           ("tests/test_catalog.py", "-k", "newer_format_major")),
    Mutant("tombstone-cache-ignores-generation",
           "a reader reuses a list's cached tombstones when only its deleted count matches",
           "== (record.generation, record.deleted)",
           "== (old.generation, record.deleted)",
           ("tests/test_catalog.py", "-k", "rereads_tombstones")),
    Mutant("kernel-unrolled-sum-any-m",
           "the kernel's unrolled group-of-4 sum runs for any m >= 4, not only multiples of 4",
           "if (M % 4 == 0) {",
           "if (M >= 4) {",
           ("tests/test_kernel.py", "-k", "kernel_at_any_m")),
    # -- mutants killed only by one lucky test before ---------------------------------------
    Mutant("numpy-product-tombstone-first-row",
           "numpy batch (matrix product) scan misses a tombstone on a block's first row",
           "cost[dead[(dead >= r0)",
           "cost[dead[(dead > r0)",
           ("tests/test_search.py", "-k", "first_row_of_a_block")),
    Mutant("numpy-tables-tombstone-first-row",
           "numpy table scans (_gather) miss a tombstone on a block's first row",
           "at + dead[(dead >= r0)",
           "at + dead[(dead > r0)",
           ("tests/test_search.py", "-k", "first_row_of_a_block")),
    Mutant("segment-truncation-unchecked",
           "a segment shorter than its committed records is mapped without complaint",
           "if size < need:\n            raise CorruptStoreError(\n"
           "                f\"{self.path}: file is {size} bytes",
           "if False:\n            raise CorruptStoreError(\n"
           "                f\"{self.path}: file is {size} bytes",
           ("tests/test_damage.py", "-k", "truncated_segment")),
    Mutant("segment-truncation-wrong-error",
           "a truncated segment raises ValueError instead of CorruptStoreError",
           "raise CorruptStoreError(\n                f\"{self.path}: file is {size} bytes",
           "raise ValueError(\n                f\"{self.path}: file is {size} bytes",
           ("tests/test_damage.py", "-k", "truncated_segment")),
    Mutant("delete-without-writer-lock",
           "delete writes the catalog without taking the writer lock",
           "wanted = as_id_list(ids)\n        with self.locked() as catalog:",
           "wanted = as_id_list(ids)\n"
           "        with contextlib.nullcontext(self._catalog()) as catalog:",
           ("tests/test_concurrency.py", "-k", "live_lock_holder_blocks_every_write")),
    Mutant("kernel-list-terms-by-position",
           "the kernel indexes the cached l2 list terms by the list's position, not its number",
           "lterm = jb->list_terms + jb->list_no[l] * size;",
           "lterm = jb->list_terms + l * size;",
           ("tests/test_kernel.py", "-k", "cached_list_terms")),
    # -- kernel mutants the existing suite kills ---------------------------------------------
    Mutant("kernel-heap-row-before-rank",
           "the kernel's candidate order compares row before probe rank",
           "if (a->rank != b->rank) return a->rank > b->rank;\n    return a->row > b->row;",
           "if (a->row != b->row) return a->row > b->row;\n    return a->rank > b->rank;",
           ("tests/test_search.py", "tests/test_kernel.py")),
    Mutant("kernel-no-tombstone-skip",
           "the kernel scores tombstoned rows like live ones",
           "if (di < nd && dead[di] == i) continue; /* tombstoned */",
           "if (0) continue; /* tombstoned */",
           ("tests/test_search.py", "tests/test_kernel.py", "tests/test_mutation.py")),
    Mutant("kernel-list-terms-pad-zero",
           "the kernel pads l2 list terms of impossible codes with 0 instead of +inf",
           "sub_products(centroids + i * dim, 2.0f, norms, INFINITY,",
           "sub_products(centroids + i * dim, 2.0f, norms, 0.0f,",
           ("tests/test_kernel.py",)),
    Mutant("kernel-probe-ties-to-later-list",
           "the kernel probe's insertion lets a later list win a coarse tie (<=)",
           "while (i > 0 && v < tmp[i - 1].cost) {",
           "while (i > 0 && v <= tmp[i - 1].cost) {",
           ("tests/test_kernel.py", "tests/test_search.py")),
    # -- Python mutants the existing suite kills ---------------------------------------------
    Mutant("add-commit-before-sync",
           "add commits the catalog before its segments are synced",
           "catalog.apply(new_state, changes, before_commit=synced.wait)",
           "catalog.apply(new_state, changes)\n                synced.wait()",
           ("tests/test_writes.py",)),
    Mutant("delete-ndeleted-not-bumped",
           "delete does not count its tombstones in the state's ndeleted",
           "ndeleted=state.ndeleted + removed), changes)",
           "ndeleted=state.ndeleted), changes)",
           ("tests/test_mutation.py", "tests/test_damage.py")),
    Mutant("stale-snapshot-hides-damage",
           "a missing segment is retried as a stale snapshot even when nothing was committed",
           "if self._catalog.snapshot().state.commit == self._snap.state.commit:\n"
           "            return err",
           "if False:\n            return err",
           ("tests/test_mutation.py", "-k", "stale")),
    Mutant("prelude-identity-unchecked",
           "a segment whose prelude names another list, generation or store is accepted",
           "        if got != want:\n            raise CorruptStoreError(\n"
           "                f\"{source}: segment prelude says",
           "        if False:\n            raise CorruptStoreError(\n"
           "                f\"{source}: segment prelude says",
           ("tests/test_damage.py", "tests/test_format_segment.py")),
    Mutant("search-unchecked-records",
           "a search scores a list's records without checking them against the catalog's CRC",
           "        if actual != crc:\n            raise CorruptStoreError(\n"
           "                f\"{self.path}: checksum mismatch in committed records",
           "        if False:\n            raise CorruptStoreError(\n"
           "                f\"{self.path}: checksum mismatch in committed records",
           ("tests/test_damage.py", "-k", "damaged_records or appended_after")),
    Mutant("search-checks-each-record-only-on-first-map",
           "records appended after a reader's first check of a list are never checked",
           "if crc is not None and count > self._checked:",
           "if crc is not None and self._checked == 0:",
           ("tests/test_damage.py", "-k", "damaged_records or appended_after")),
    Mutant("page-walk-ignores-page-numbers",
           "the B-tree walk of data.mdb does not compare a page's number with its place",
           "fail(numbers != pgnos.astype(np.uint64),",
           "fail(numbers != numbers,",
           ("tests/test_catalog.py", "-k", "tree_walk")),
    Mutant("page-walk-only-at-open",
           "verify walks only the B-trees a search reads, not the id map",
           "return check_data_file(data, trees=ALL_TREES if full else SEARCHED_DBS)",
           "return check_data_file(data, trees=SEARCHED_DBS)",
           ("tests/test_damage.py", "-k", "page_of_the_id_map")),
    Mutant("page-walk-cycle",
           "the B-tree walk does not notice a page reached twice",
           "if len(np.unique(seen)) != len(seen):",
           "if False:",
           ("tests/test_damage.py", "-k", "page_of_the_id_map")),
    Mutant("tombstone-sum-unchecked",
           "readers do not compare a list's tombstone rows with its record's tsum",
           "if tsum is not None and tombstone_sum(rows) != tsum:",
           "if False:",
           ("tests/test_damage.py", "-k", "flipped_tombstone")),
    Mutant("record-crc-unchecked",
           "catalog records are decoded without checking their crc entry",
           'if "crc" in obj:  # written since format 1.1; a 1.0 record has none',
           "if False:",
           ("tests/test_catalog.py", "-k", "damaged_byte or crc_entry")),
    Mutant("write-trusts-the-id-map",
           "delete and upsert tombstone the row the id map names without reading the segment",
           "if (held != ids).any():",
           "if False:",
           ("tests/test_damage.py", "-k", "wrong_record")),
    Mutant("filtered-scan-ignores-the-filter",
           "the scan plan reads every live row, not only the rows a filter admits",
           'admitted = self._filter.matches(records["id"])',
           "admitted = np.ones(len(records), dtype=bool)",
           ("tests/test_filters.py", "-k", "exact_best_k or selective")),
    Mutant("filter-and-as-or",
           "Filter a & b admits what either admits",
           "return mask & second.matches(ids)",
           "return mask | second.matches(ids)",
           ("tests/test_filters.py", "-k", "set_algebra")),
    Mutant("direct-plan-for-every-bound",
           "any filter with a finite bound is searched directly, however many ids it names",
           "return int(scan / max(config.direct_per_candidate + config.direct_per_pair * nq, "
           "1e-9))",
           "return 2**62",
           ("tests/test_filters.py", "-k", "plan_is_direct")),
    Mutant("direct-plan-trusts-the-id-map",
           "the direct plan scores the records the id map names without checking they hold "
           "the ids",
           'if recs is None or (recs["id"] != ids[s:e]).any():',
           "if recs is None:",
           ("tests/test_filters.py", "-k", "damaged_id_map")),
    Mutant("range-radius-inclusive",
           "range search's product path keeps vectors at the radius itself",
           "keep = cost < bound",
           "keep = cost <= bound",
           ("tests/test_range_search.py",)),
    Mutant("range-ignores-tombstones",
           "range search's product path returns tombstoned rows",
           "if dead is not None:  # tombstoned rows are never results",
           "if False:",
           ("tests/test_range_search.py",)),
    Mutant("verify-crc-inverted",
           "verify reports a checksum mismatch exactly when the checksums agree",
           "if actual != record.crc32:",
           "if actual == record.crc32:",
           ("tests/test_damage.py",)),
    # -- stored vectors and refine (format 1.2) ---------------------------------------------
    Mutant("refine-l2-wrong-sign",
           "refine ranks l2 candidates by the negated squared distance (farthest first)",
           'part = np.einsum("qcd,qcd->qc", vecs, vecs)',
           'part = -np.einsum("qcd,qcd->qc", vecs, vecs)',
           ("tests/test_vectors.py", "tests/test_state_machine.py")),
    Mutant("refine-ip-wrong-sign",
           "refine ranks ip/cosine candidates by the inner product itself, not its negation",
           'part = -np.einsum("qcd,qcd->qc", vecs, np.broadcast_to(q, vecs.shape))',
           'part = np.einsum("qcd,qcd->qc", vecs, np.broadcast_to(q, vecs.shape))',
           ("tests/test_vectors.py", "-k", "refine_equals")),
    Mutant("refine-ties-reversed",
           "refine breaks equal exact costs by the last candidate first, not in PQ order",
           'order = np.argsort(cost, axis=1, kind="stable")[:, :k]',
           'order = (cost.shape[1] - 1 - np.argsort(cost[:, ::-1], axis=1, '
           'kind="stable"))[:, :k]',
           ("tests/test_vectors.py", "-k", "equal_vectors")),
    Mutant("refine-scores-missing-candidates",
           "refine scores the padding of missing candidates (id -1) as zero vectors",
           "part[~valid] = np.inf",
           "pass",
           ("tests/test_vectors.py", "-k", "pads")),
    Mutant("refine-rows-unchecked",
           "get_vectors and numpy's refine use the rows they read without checking their CRCs",
           "bad = bad_rows(got, ids)",
           "bad = bad_rows(got, ids)[:0]",
           ("tests/test_vectors.py", "-k", "damaged_vector_file")),
    Mutant("row-crc-skips-id",
           "a vector row's CRC covers its values only, not its record's id",
           "zlib.crc32(id_bytes[8 * i: 8 * i + 8]))",
           "0)",
           ("tests/test_format_vectors.py", "tests/test_kernel.py", "-k",
            "golden or row_checksums")),
    Mutant("kernel-row-crc-skips-id",
           "the kernel's row CRC covers a row's values only, not its record's id",
           "out[i] = crc_update(crc_update(0, id, 8), rows + i * row_size, nbytes);",
           "out[i] = crc_update(0, rows + i * row_size, nbytes);",
           ("tests/test_vectors.py", "-k", "moved_to_other_records")),
    Mutant("writer-vector-rows-ungrouped",
           "an add writes its vector rows in input order, not grouped by list like its records",
           'vrows["v"] = vectors[order]',
           'vrows["v"] = vectors',
           ("tests/test_vectors.py", "-k", "get_vectors_returns", "tests/test_state_machine.py")),
    Mutant("compaction-keeps-tombstoned-vectors",
           "compaction copies a list's first vector rows instead of dropping the tombstoned ones",
           "vrows = np.delete(np.asarray(vectors_of(list_no, old)), dead)",
           "vrows = np.asarray(vectors_of(list_no, old))[:len(live)]",
           ("tests/test_vectors.py", "-k", "compaction_keeps")),
    Mutant("compaction-vectors-unchecked",
           "compaction copies vector rows without checking them against their records",
           'bad = bad_rows(vrows, live["id"])',
           'bad = bad_rows(vrows, live["id"])[:0]',
           ("tests/test_vectors.py", "-k", "compaction_refuses")),
    Mutant("compaction-no-vector-sync",
           "compaction fdatasyncs the new segments but not the new vector files",
           "SyncJob(written, policy=sync, directory=layout.segments).wait()",
           "SyncJob([w for w in written if w.suffix == '.seg'], policy=sync, "
           "directory=layout.segments).wait()",
           ("tests/test_vectors.py", "tests/test_writes.py", "-k", "synced or syncs_each_file")),
    Mutant("add-no-vector-sync",
           "an add syncs the segments it appended to but not their vector files",
           "synced = SyncJob(written, policy=self._sync, directory=self._layout.segments)",
           "synced = SyncJob([w for w in written if w.endswith('.seg')], policy=self._sync, "
           "directory=self._layout.segments)",
           ("tests/test_vectors.py", "tests/test_writes.py", "-k", "synced or syncs_each_file")),
    Mutant("faiss-codes-big-endian",
           "faiss's packed codes are read most significant bit first",
           'bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits]',
           'bits = np.unpackbits(packed, axis=1, bitorder="big")[:, : m * nbits]',
           ("tests/test_faiss_interop.py",)),
    Mutant("from-faiss-skips-the-last-list",
           "an import from faiss leaves out the index's last inverted list",
           "    for list_no in range(ivf.nlist):",
           "    for list_no in range(ivf.nlist - 1):",
           ("tests/test_faiss_interop.py", "-k", "becomes_a_store")),
    Mutant("add-encoded-code-bound-off-by-one",
           "add_encoded accepts a code equal to 2**nbits",
           "int(codes.max()) >= params.ksub):",
           "int(codes.max()) > params.ksub):",
           ("tests/test_faiss_interop.py", "-k", "refuses_bad_records")),
    Mutant("add-encoded-list-bound-off-by-one",
           "add_encoded accepts list number nlist",
           "if int(list_nos.min()) < 0 or int(list_nos.max()) >= nlist:",
           "if int(list_nos.min()) < 0 or int(list_nos.max()) > nlist:",
           ("tests/test_faiss_interop.py", "-k", "refuses_bad_records")),
    Mutant("faiss-file-metrics-swapped",
           "the faiss file reader takes faiss's inner-product code for L2 and back",
           "_FAISS_METRICS = {0: Metric.IP, 1: Metric.L2}",
           "_FAISS_METRICS = {0: Metric.L2, 1: Metric.IP}",
           ("tests/test_faiss_interop.py", "-k", "file")),
    Mutant("faiss-file-sparse-pairs-swapped",
           "the faiss file reader reads sparse list sizes as (size, list) pairs",
           "sizes[pairs[:, 0].astype(np.int64)] = pairs[:, 1]",
           "sizes[pairs[:, 1].astype(np.int64) % nlist] = pairs[:, 0]",
           ("tests/test_faiss_interop.py", "-k", "file")),
    Mutant("to-faiss-a-snapshot-per-list",
           "to_faiss reads each list on its own catalog snapshot",
           "((n, *self._live_records(snap, fetch, n))",
           "((n, *self.list_contents(n))",
           ("tests/test_interop_edges.py", "-k", "one_snapshot")),
    Mutant("from-faiss-quantizer-metric-unchecked",
           "from_faiss takes an index whose coarse quantizer has another metric",
           "if ivf.quantizer.metric_type != ivf.metric_type:",
           "if False:",
           ("tests/test_interop_edges.py", "-k", "another_metric")),
    Mutant("export-faiss-unsynced",
           "export-faiss links its file into place before its data is durable",
           "os.fsync(fd)  # the data is durable before the name appears",
           "pass",
           ("tests/test_interop_edges.py", "-k", "syncs_the_file")),
    Mutant("from-faiss-ignores-the-id-map",
           "an import from faiss keeps the internal numbers of an IndexIDMap's index as ids",
           "        ids = id_map[ids]",
           "        ids = ids",
           ("tests/test_faiss_interop.py", "-k", "id_map")),
    Mutant("to-faiss-vectors-misnumbered",
           "to_faiss(vectors=True) numbers each list's records from 0",
           "yield list_no, np.arange(start, start + len(ids), dtype=np.int64), codes",
           "yield list_no, np.arange(len(ids), dtype=np.int64), codes",
           ("tests/test_faiss_interop.py", "-k", "to_faiss_with")),
    Mutant("syncfs-skipped",
           "a write under the syncfs policy makes nothing durable",
           "    atomic.sync_filesystem(path)",
           "    pass",
           ("tests/test_writes.py", "-k", "syncs_each_file")),
    Mutant("syncfs-threshold-off-by-one",
           "the auto sync policy syncs the file system only past 16 files, not from 16",
           "return nfiles >= SYNCFS_MIN_FILES and",
           "return nfiles > SYNCFS_MIN_FILES and",
           ("tests/test_writes.py", "-k", "sixteen_files")),
    Mutant("verify-skips-vectors",
           "verify never checks the vector files",
           '[("vectors", _check_vectors, vector_file_name)] if files.vectors is not None',
           '[] if files.vectors is not None',
           ("tests/test_vectors.py", "-k", "damaged or moved or missing_or_short")),
    Mutant("get-vectors-sorted-order",
           "get_vectors returns the vectors in sorted-id order, not the order asked",
           "return vectors[by_id[np.searchsorted(found.ids, wanted, sorter=by_id)]]",
           "return vectors[by_id[np.searchsorted(found.ids, np.sort(wanted), sorter=by_id)]]",
           ("tests/test_vectors.py", "-k", "get_vectors_returns", "tests/test_state_machine.py")),
    Mutant("direct-refine-swaps-list-and-row",
           "a refined direct-plan search reads each candidate's vector at (row, list)",
           "pick(located.list_nos), pick(located.rows),",
           "pick(located.rows), pick(located.list_nos),",
           ("tests/test_vectors.py", "-k", "refine_with_a_filter")),
    Mutant("numpy-topk-rank-zero",
           "the numpy scans report every result in the query's first probed list",
           "out.rank[q, col] = rank",
           "out.rank[q, col] = 0",
           ("tests/test_vectors.py", "-k", "refine_equals")),
    Mutant("kernel-refine-rows-unchecked",
           "the kernel's refine scores rows without checking their CRCs",
           "if (crc_update(crc_update(0, idb, 8), row, nbytes) != stored) return 1;",
           "if (0) return 1;",
           ("tests/test_vectors.py", "tests/test_kernel.py", "-k",
            "damaged_vector_file or refine_costs or damaged_row or first_bad_result")),
    Mutant("kernel-half-exponent-off-by-one",
           "the kernel reads float16 values at half their value (exponent bias off by one)",
           "bits = sign | ((exp + 112u) << 23) | (man << 13);",
           "bits = sign | ((exp + 111u) << 23) | (man << 13);",
           ("tests/test_kernel.py", "-k", "refine_costs")),
    Mutant("kernel-rank-zero",
           "the kernel reports every result in the query's first probed list",
           "jb->out_rank[q * k + at] = c[i].rank;",
           "jb->out_rank[q * k + at] = 0;",
           ("tests/test_vectors.py", "-k", "refine_equals")),
    # -- performance II: training, one-call single queries, caches, syncs --------------------
    Mutant("kernel-cluster-sums-overwrite",
           "the kernel's k-means update keeps each cluster's last point instead of the sum",
           "for (int64_t t = lo; t < hi; t++) dst[t] += (double)src[t];",
           "for (int64_t t = lo; t < hi; t++) dst[t] = (double)src[t];",
           ("tests/test_kernel.py", "tests/test_training.py", "-k", "cluster_sums or kmeans")),
    Mutant("kernel-encoder-group-last-tie",
           "the encoder's four-vector path takes the last of equally near sub-centroids",
           "const vi take = acc[v] < bv[v];",
           "const vi take = acc[v] <= bv[v];",
           ("tests/test_kernel.py", "-k", "encoder")),
    Mutant("pq-update-from-first-sub-quantizer",
           "PQ training updates every sub-quantizer from the first one's sums",
           "books[j], s = update(sums[j], counts[j], books[j], rng)",
           "books[j], s = update(sums[0], counts[0], books[j], rng)",
           ("tests/test_training.py", "tests/test_quantizer.py")),
    Mutant("kernel-search-one-rank-zero",
           "a single query's one-call search reports every result in its first probed list",
           "rank[n] = (int32_t)i;",
           "rank[n] = 0;",
           ("tests/test_kernel.py", "tests/test_vectors.py", "-k",
            "one_call or better_ranked or refine_equals")),
    Mutant("list-table-no-tombstones",
           "the kernel's list table keeps a list's records without its tombstones",
           "table.put(list_no, fetch(list_no, record), deleted.get(list_no))",
           "table.put(list_no, fetch(list_no, record), None)",
           ("tests/test_mutation.py", "tests/test_search.py")),
    Mutant("list-table-outlives-its-snapshot",
           "the searcher keeps one list table across commits",
           "if cached is not None and cached[0] is snapshot and",
           "if cached is not None and",
           ("tests/test_search.py", "-k", "once_per_snapshot")),
    Mutant("catalog-state-cache-stale",
           "the catalog reuses its decoded state record whatever its bytes",
           "if last is not None and last[0] == raw:",
           "if last is not None:",
           ("tests/test_mutation.py", "tests/test_concurrency.py")),
    Mutant("catalog-list-cache-stale",
           "the catalog reuses a list's decoded record whatever its bytes",
           "if known is not None and known[0] == v:",
           "if known is not None:",
           ("tests/test_mutation.py", "tests/test_concurrency.py")),
    Mutant("sync-job-first-of-each-share",
           "an add fdatasyncs only the first file of each sync thread's share",
           "self._futures.append(threads.submit(_sync_all, paths[share::workers]))",
           "self._futures.append(threads.submit(_sync_all, paths[share:share + 1]))",
           ("tests/test_writes.py", "tests/test_vectors.py", "-k", "sync")),
    Mutant("pipeline-encodes-with-first-block-lists",
           "the add pipeline encodes every block with the first block's list numbers",
           "codes[s:e] = kernel.encode(x[s:e], list_nos[s:e], self.centroids, self.codebooks_t,",
           "codes[s:e] = kernel.encode(x[s:e], list_nos[:e - s], self.centroids, self.codebooks_t,",
           ("tests/test_quantizer.py", "tests/test_writes.py")),
    Mutant("validate-misses-nan",
           "input validation lets rows with NaN through",
           "    if sq.max() <= MAX_SQUARED_NORM:",
           "    if not np.isinf(sq).any():",
           ("tests/test_bad_input.py",)),
    Mutant("validate-float32-batch-unchecked",
           "a float32 batch skips the check of its rows' norms",
           "    if sq.max() <= MAX_SQUARED_NORM:",
           "    if sq.max() <= MAX_SQUARED_NORM or arr.dtype == np.float32:",
           ("tests/test_bad_input.py",)),
    # -- the packed id map (format 1.3) -------------------------------------------------------
    Mutant("bucket-crc-unchecked",
           "buckets of the packed id map are decoded without checking their CRC",
           "sound_shaped = ((actual == stored) & (live > 0)",
           "sound_shaped = ((actual == actual) & (live > 0)",
           ("tests/test_idmap.py", "-k", "damaged or truncated or another_key")),
    Mutant("bucket-bits-reversed",
           "a bucket's bitmap numbers its bits from the top (id 64b + 63 - bit)",
           "bits = np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64))",
           "bits = np.left_shift(np.uint64(1), (63 - (ids & 63)).astype(np.uint64))",
           ("tests/test_idmap.py", "-k", "golden")),
    Mutant("packed-generation-unchecked",
           "the catalog lets a write place ids of a packed map at another generation",
           "if id_map.schema == PACKED:\n                self._check_current(",
           "if False:\n                self._check_current(",
           ("tests/test_idmap.py", "-k", "another_generation")),
    Mutant("packed-scan-limit-off-by-one",
           "a range lookup of the packed map says it held more than limit ids when it held "
           "exactly limit",
           "if limit is not None and count > limit:",
           "if limit is not None and count >= limit:",
           ("tests/test_idmap.py", "-k", "answer_every_lookup")),
    Mutant("packed-append-at-the-last-bucket",
           "a write appends the bucket at the last key too, instead of putting it again",
           "tail = int(np.searchsorted(after, last, side=\"right\"))",
           "tail = int(np.searchsorted(after, last, side=\"left\"))",
           ("tests/test_idmap.py", "-k", "12_bytes_per_vector")),
    Mutant("id-map-layout-cached-forever",
           "a catalog handle keeps the id map layout it first read, across an upgrade",
           "if cached is not None and cached[0] == raw:",
           "if cached is not None:",
           ("tests/test_upgrade.py", "-k", "handle_open_during")),
    Mutant("upgrade-keeps-stale-generations",
           "the upgrade packs per-id entries of a former generation (which then name rows "
           "of the current one)",
           "self._check_current(ids, entries, lists, where)",
           "pass",
           ("tests/test_upgrade.py", "-k", "cannot_pack")),
    Mutant("writer-ignores-the-row-limit",
           "a write to a packed store does not check the 2**32 - 1 records of a list",
           "if count + n > limit:",
           "if False:",
           ("tests/test_idmap.py", "-k", "row_limit")),
    Mutant("search-does-not-rotate-queries",
           "the searcher probes and scans a store with an OPQ rotation with unrotated queries",
           "inner = qz.rotate(queries)",
           "inner = queries",
           ("tests/test_opq.py", "-k", "adc_of_the_rotated")),
    Mutant("add-does-not-rotate-vectors",
           "the writer encodes the vectors of a store with a rotation without rotating them",
           "list_nos, codes = quantizer.assign_and_encode(quantizer.rotate(x),\n",
           "list_nos, codes = quantizer.assign_and_encode(x,\n",
           ("tests/test_opq.py", "-k", "encodes_the_rotated")),
    Mutant("refine-scores-rotated-queries",
           "exact re-ranking scores the rotated queries against the stored vectors",
           "return self._refined(queries, params, hits.ids, list_nos, rows, refiner)",
           "return self._refined(self.quantizer.rotate(queries), params, hits.ids, list_nos,"
           " rows, refiner)",
           ("tests/test_opq.py", "-k", "as_given")),
    Mutant("kernel-refine-scores-rotated-queries",
           "the kernel's refine in the scan's call scores the rotated queries",
           "exact = ExactRows(queries, params.k, [_vector_fetcher(refiner)])",
           "exact = ExactRows(self.quantizer.rotate(queries), params.k,"
           " [_vector_fetcher(refiner)])",
           ("tests/test_opq.py", "-k", "as_given")),
    Mutant("faiss-refine-vectors-left-rotated",
           "from_faiss keeps the raw vectors of a RefineFlat inside the transform rotated",
           "vectors = vectors @ found.rotation",
           "vectors = vectors",
           ("tests/test_opq.py", "-k", "unrotated_wherever")),
    Mutant("retrain-does-not-switch-the-generation",
           "a retrain commits its lists but leaves meta/state naming the old quantizer",
           "replace(snap.state, commit=snap.state.commit + 1, ndeleted=ndeleted,\n"
           "                        qgen=number)",
           "replace(snap.state, commit=snap.state.commit + 1, ndeleted=ndeleted)",
           ("tests/test_retrain.py", "-k", "adc_of_the_new")),
    Mutant("write-drops-the-generation",
           "an add rewrites meta/state without the quantizer generation a retrain set",
           "new_state = replace(\n                    state, commit=state.commit + 1,",
           "new_state = replace(\n                    state, qgen=None, commit=state.commit + 1,",
           ("tests/test_retrain.py", "-k", "writes_after")),
    Mutant("write-skips-encoding-again-after-a-retrain",
           "an add encoded before a retrain commits its codes of the replaced quantizer",
           "if state.quantizer != encoded[0]:",
           "if False:",
           ("tests/test_retrain.py", "-k", "encoded_again_under")),
    Mutant("retrain-leaves-reconstructions-rotated",
           "a retrain of a store without vectors encodes its codes' reconstructions without "
           "rotating them back",
           "out: F32Array = x @ self.rotation",
           "out: F32Array = x",
           ("tests/test_opq.py", "-k", "retrained_out_of_opq")),
    Mutant("retrain-keeps-old-tombstones",
           "a retrain re-encodes the tombstoned records too",
           "live = np.delete(np.arange(record.count), snap.deleted.get(list_no, []))\n"
           "        recs = np.asarray(fetch(list_no, record))[live]",
           "live = np.arange(record.count)\n"
           "        recs = np.asarray(fetch(list_no, record))[live]",
           ("tests/test_retrain.py", "-k", "adc_of_the_new")),
    Mutant("rebalance-keeps-codes-of-a-moved-centroid",
           "a split keeps the old codes of the records that stay in the list whose centroid "
           "moved",
           "self._pool.fresh[places] = True  # its centroid moved",
           "pass",
           ("tests/test_rebalance.py", "-k", "splits_the_large_lists")),
    Mutant("rebalance-keeps-codes-of-moved-records",
           "a record moved to another list keeps the code of the list it left",
           "self._pool.fresh[going] = True",
           "pass",
           ("tests/test_rebalance.py", "-k", "merge_empties")),
    Mutant("rebalance-empties-untouched-lists",
           "a rebalance replaces every list of the snapshot, not only the lists it changed",
           "for list_no in (snap.lists if replaced is None else replaced):",
           "for list_no in snap.lists:",
           ("tests/test_rebalance.py", "-k", "keep_their_files")),
    Mutant("rebalance-keeps-dropped-tombstones-counted",
           "a rebalance drops the tombstones of the lists it rewrote but not from ndeleted",
           "ndeleted=snap.state.ndeleted - dropped)",
           "ndeleted=snap.state.ndeleted)",
           ("tests/test_rebalance.py", "-k", "merge_empties")),
    Mutant("rebalance-merge-adds-a-list",
           "a merged list's number is not reused: its split takes a new number",
           "self.split(plan, small[0])",
           "self.split(plan, len(self.counts))",
           ("tests/test_rebalance.py", "-k", "merge_empties")),
    Mutant("rebalance-splits-off-what-a-merge-takes-back",
           "a split may leave a half under the merge floor, which the next rebalance merges "
           "back (copies under cosine: nlist grows with every other call)",
           "np.count_nonzero(dest == slot)) >= max(least, 1):",
           "np.count_nonzero(dest == slot)) >= 1:",
           ("tests/test_adversarial_rebalance.py", "-k", "no_split_can_part")),
    Mutant("two-means-unbalanced",
           "the 2-means does not keep a quarter of the points on each side",
           "ones = min(max(ones, n - hi), n - lo)",
           "ones = max(ones, 1)",
           ("tests/test_rebalance.py", "-k", "two_means")),
    Mutant("auto-rebalance-never-runs",
           "adds never rebalance, whatever auto_rebalance says",
           "            if not any(r is not None and r.count - r.deleted > max(\n"
           "                    limit, 2 * self._stuck.get(n, 0)) for n, r in touched.items()):",
           "            if True:",
           ("tests/test_rebalance.py", "-k", "auto_rebalance_rebalance")),
    # -- sharded stores -----------------------------------------------------------------------
    Mutant("shard-merge-ignores-probe-rank",
           "the merge of the shards' results orders equal distances by shard, not by the "
           "probe rank one store's scan uses",
           "order = np.lexsort((ranks, dist * sign), axis=1)[:, :scan_k]",
           "order = np.argsort(dist * sign, axis=1, kind='stable')[:, :scan_k]",
           ("tests/test_sharding.py", "-k", "merge_rules")),
    Mutant("shard-merge-refines-each-shard-alone",
           "with refine, the merge re-ranks every shard's candidates, not the best R * k of "
           "all shards' (more candidates than one store re-ranks)",
           "order = np.lexsort((ranks, dist * sign), axis=1)[:, :scan_k]",
           "order = np.lexsort((ranks, dist * sign), axis=1)[:, :scan_k * (len(results) "
           "if refine else 1)]",
           ("tests/test_sharding.py", "-k", "merge_rules")),
    Mutant("shard-routing-constant",
           "the routing uses another mixing constant than the documented splitmix64",
           "_MIX1 = np.uint64(0xBF58476D1CE4E5B9)",
           "_MIX1 = np.uint64(0xBF58476D1CE4E5B1)",
           ("tests/test_sharding.py", "-k", "routing")),
    Mutant("shard-uuid-unchecked",
           "opening a shard does not check that it is the store the manifest names",
           "        if store.store_uuid != entry.uuid:",
           "        if False:",
           ("tests/test_sharding.py", "-k", "swapped or cli_info_and_verify")),
    Mutant("shard-fingerprint-unchecked",
           "opening a shard does not check its quantizer's fingerprint",
           "        if store_fingerprint(store) != self.manifest.quantizer:",
           "        if False:",
           ("tests/test_sharding.py", "-k", "another_quantizer")),
    Mutant("probed-search-ignores-generation",
           "a scan of given probed lists accepts a probe of another quantizer generation",
           "if generation is not None and snap.state.quantizer != generation:",
           "if False:",
           ("tests/test_sharding.py", "-k", "another_generation")),
    Mutant("fingerprint-skips-rotation",
           "the quantizer fingerprint leaves the rotation out",
           "    for arr in (centroids, codebooks, rotation):",
           "    for arr in (centroids, codebooks):",
           ("tests/test_sharding.py", "-k", "fingerprint_sees")),
    Mutant("kernel-segments-rows-restart",
           "a list scanned over several stores' segments numbers each segment's rows from 0 "
           "(ties across shards then fall to the heap's order, and refine reads wrong rows)",
           "                row0 += jb->rec_count[s];",
           "                row0 += 0;",
           ("tests/test_sharding.py", "-k", "together")),
    Mutant("kernel-segments-last-only",
           "a list scanned over several stores' segments scans only its last segment",
           "            for (int64_t s = s0; s < s1; s++) {\n"
           "                const uint8_t *base",
           "            for (int64_t s = s1 - 1; s < s1; s++) {\n"
           "                const uint8_t *base",
           ("tests/test_sharding.py", "-k", "together")),
    Mutant("together-source-off-by-one",
           "a hit of a scan of several stores is placed in the store after its own",
           "    at = np.minimum((hits.row >= ends).sum(axis=0), len(tables) - 1)",
           "    at = np.minimum((hits.row > ends).sum(axis=0), len(tables) - 1)",
           ("tests/test_sharding.py", "-k", "together")),
    Mutant("together-any-quantizer",
           "a scan of several stores merges stores of another quantizer",
           "        if sources and not sources[0].searcher.quantizer.same_as("
           "gen.searcher.quantizer):",
           "        if False:",
           ("tests/test_sharding.py", "-k", "together")),
    Mutant("sharded-search-one-call-per-shard",
           "a worker's actor scans only its own shard, so a search asks every shard's actor",
           "        servers = [self] + [served[i] for i in shards",
           "        servers = [self] + [served[i] for i in ()",
           ("tests/test_dask.py", "-k", "one_actor_per_worker")),
    # -- first run ------------------------------------------------------------------------
    Mutant("if-exists-open-skips-check",
           "create(if_exists='open') opens a store created with other parameters",
           "    differ = [f\"{name} {has[name]!r} (asked {asked[name]!r})\" for name in asked\n"
           "              if has[name] != asked[name]]",
           "    differ = [f\"{name} {has[name]!r} (asked {asked[name]!r})\" for name in asked\n"
           "              if False]",
           ("tests/test_first_run.py", "-k", "differs")),
    Mutant("if-exists-replace-without-lock",
           "create(if_exists='replace') swaps the store in without its writer lock",
           "        with writer_lock(lock, timeout):\n            os.rename(dest, old)",
           "        with contextlib.nullcontext():\n            os.rename(dest, old)",
           ("tests/test_first_run.py", "-k", "writer_lock")),
    Mutant("if-exists-replace-any-directory",
           "create(if_exists=...) opens or replaces a path that is not a store",
           "    elif not StoreLayout(root).looks_like_store():",
           "    elif False:",
           ("tests/test_bad_input.py", "-k", "never_opens_or_replaces")),
    Mutant("empty-probe-warns-when-nothing-is-live",
           "the empty-probe warning fires when the store holds no live vector at all",
           "        if held is not None and held[0] and (first[0] if len(first) == 1 else",
           "        if held is not None and (first[0] if len(first) == 1 else",
           ("tests/test_first_run.py", "-k", "empty_lists")),
    Mutant("progress-reports-the-step-not-the-total",
           "a stage reports each step's size instead of the steps done so far",
           "        self.done += n\n        if self._progress is not None:",
           "        self.done = n\n        if self._progress is not None:",
           ("tests/test_progress.py", "-k", "training_stage")),
    Mutant("progress-bar-per-batch",
           "the CLI draws a bar per add batch instead of one over the whole file",
           "        goal = self._totals.get(stage, total)",
           "        goal = total",
           ("tests/test_progress.py", "-k", "terminal")),
    Mutant("eval-query-finds-itself",
           "a query drawn from the store counts itself among its true neighbours",
           "        if self.exclude is not None:\n            scores[ids[None, :] == ",
           "        if False:\n            scores[ids[None, :] == ",
           ("tests/test_eval.py", "-k", "leave")),
    Mutant("eval-ties-to-the-larger-id",
           "exact neighbours at equal distance are ordered by the larger id first",
           "np.lexsort((np.where(all_i < 0, np.iinfo(np.int64).max, all_i), all_d),",
           "np.lexsort((np.where(all_i < 0, np.iinfo(np.int64).min, -all_i), all_d),",
           ("tests/test_eval.py", "-k", "ties")),
    Mutant("eval-float32-order",
           "exact neighbours keep only the float32 products' best k, never re-ranked in float64",
           "        t = min(len(ids), self.k + MARGIN)",
           "        t = min(len(ids), self.k)",
           ("tests/test_eval.py", "-k", "float32_products_are_not or brute_force_in_any")),
    Mutant("sharded-add-skips-live-check",
           "a sharded add does not refuse ids that are already live (it upserts them)",
           "        if check_new:\n            live = self.contains(wanted)",
           "        if False:\n            live = self.contains(wanted)",
           ("tests/test_dask.py", "-k", "whole_batch")),

    # -- the 4-bit fast scan (format 1.5) -----------------------------------------------------
    Mutant("fast-bound-skips-ties",
           "the fast scan's sum bound leaves out a sum whose cost equals the heap's worst",
           "while (s >= 0 && !(fast_cost(s, base, inv) <= bound)) s--;",
           "while (s >= 0 && !(fast_cost(s, base, inv) < bound)) s--;",
           ("tests/test_fastscan.py", "-k", "ties or scanned_later")),
    Mutant("fast-bound-one-short",
           "the fast scan's sum bound is one below the largest sum that could enter",
           "    while (s >= 0 && !(fast_cost(s, base, inv) <= bound)) s--;\n    return s;",
           "    while (s >= 0 && !(fast_cost(s, base, inv) <= bound)) s--;\n    return s - 1;",
           ("tests/test_fastscan.py", "-k", "kernel")),
    Mutant("fast-simd-mask-strict",
           "the SIMD block sums keep only rows strictly under the bound",
           "const __m128i tv = _mm_set1_epi16((short)(uint16_t)thr);",
           "const __m128i tv = _mm_set1_epi16((short)(uint16_t)(thr - 1));",
           ("tests/test_fastscan.py", "-k", "ties or scanned_later")),
    Mutant("fast-scalar-nibbles-swapped",
           "the plain block sums read the high nibble as rows 0-15",
           "            acc[i] += tj[cj[i] & 15];\n            acc[i + 16] += tj[cj[i] >> 4];",
           "            acc[i] += tj[cj[i] >> 4];\n            acc[i + 16] += tj[cj[i] & 15];",
           ("tests/test_fastscan.py", "-k", "reference")),
    Mutant("fast-tail-row-16-low-nibble",
           "the packed tail puts row 16's code in the low nibble, over row 0's",
           "const int lane = (int)(i & 15), shift = i >= 16 ? 4 : 0;",
           "const int lane = (int)(i & 15), shift = i > 16 ? 4 : 0;",
           ("tests/test_fastscan.py", "-k", "reference")),
    Mutant("fast-no-tombstone-skip",
           "the fast scan scores tombstoned rows of blocks like live ones",
           "if (di < nd && dead[di] == row) continue; /* tombstoned */",
           "if (0) continue; /* tombstoned */",
           ("tests/test_fastscan.py", "-k", "reference")),
    Mutant("fast-blocks-without-the-old-tail",
           "an append packs blocks from its new records only, not after the list's tail",
           "            ids += [tail[\"id\"], records[\"id\"][s: s + full - len(tail)]]",
           "            ids += [records[\"id\"][s: s + full - len(tail)]]",
           ("tests/test_fastscan.py", "-k", "packing_of_the_segments")),
    Mutant("fast-tail-unchecked",
           "a fast scan reads a list's tail without checking it against tcrc",
           "    check_tail(path, data, record)\n    return np.frombuffer(data, dtype).copy()",
           "    return np.frombuffer(data, dtype).copy()",
           ("tests/test_fastscan.py", "-k", "damaged_tail")),

    # -- the two-pass scan, row checksums and refine on threads --------------------------------
    Mutant("kernel-limit-from-a-partial-heap",
           "the first pass's limit is taken from a heap that holds fewer than cap candidates",
           "if (ws[t].heaps[q].n == cap && ws[t].heaps[q].c[0].cost < limit)",
           "if (ws[t].heaps[q].n > 0 && ws[t].heaps[q].c[0].cost < limit)",
           ("tests/test_kernel.py", "tests/test_fastscan.py")),
    Mutant("batch-query-runs-overlap",
           "a batch split by queries gives a run's last query's pairs to the next thread too",
           "    return q >= w->q0 && q < w->q1 && in_pass(w->job, p, w->pass);",
           "    return q >= w->q0 && q <= w->q1 && in_pass(w->job, p, w->pass);",
           ("tests/test_kernel.py", "tests/test_fastscan.py", "-k", "threads")),
    Mutant("batch-split-drops-a-query",
           "a batch split by queries gives no thread the first query of each later run",
           "            ws[t].q0 = q;\n",
           "            ws[t].q0 = q + (t > 0);\n",
           ("tests/test_kernel.py", "tests/test_fastscan.py", "-k", "threads")),
    Mutant("fast-presum-counts-tombstones",
           "a first pair's bound summed ahead counts tombstoned rows among its k best",
           "            if (di < nd && dead[di] == row) continue;\n            count[out",
           "            count[out",
           ("tests/test_fastscan.py", "-k", "summed_ahead")),
    Mutant("crc-fold-wrong-constant",
           "the folding CRC reduces 64 bits to 32 with a wrong constant",
           "const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);",
           "const __m128i k5 = _mm_set_epi64x(0, 0x163cd6125);",
           ("tests/test_kernel.py", "-k", "checksums")),
    Mutant("refine-scores-against-the-runs-first-query",
           "refine scores every result of a thread's run against the run's first query",
           "                             raw + q * dim, dim, half, jb->l2, &w->rcost[c])) {",
           "                             raw + w->b0 * dim, dim, half, jb->l2, &w->rcost[c])) {",
           ("tests/test_vectors.py", "-k", "refine")),
    Mutant("ptr-fallback-address-zero",
           "an array without a writable contiguous buffer is given to the kernel at address 0",
           "    except (TypeError, ValueError, BufferError):\n"
           "        return int(a.__array_interface__[\"data\"][0])",
           "    except (TypeError, ValueError, BufferError):\n        return 0",
           ("tests/test_kernel.py", "-k", "addresses")),
    Mutant("crc-fold512-wrong-constant",
           "the AVX-512 fold folds 512 bits with a wrong constant",
           "_mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596, 0x154442bd4));",
           "_mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596, 0x154442bd5));",
           ("tests/test_kernel.py", "-k", "checksums")),
    Mutant("refine-threads-name-the-last-bad-row",
           "with candidates on threads, refine names the last thread's bad row, not the first",
           "            rc = rs[t].bad + 1;\n            break;",
           "            rc = rs[t].bad + 1;",
           ("tests/test_kernel.py", "-k", "refine_costs")),
    Mutant("kernel-refine-ties-by-place-reversed",
           "the scan's refine past 32 results orders equal exact costs against the scan's order",
           "    return key[i] < key[j] || (key[i] == key[j] && i < j);",
           "    return key[i] < key[j] || (key[i] == key[j] && i > j);",
           ("tests/test_vectors.py", "-k", "scans_call")),
    Mutant("kernel-refine-insertion-ties-reversed",
           "the scan's refine of at most 32 results puts a result before kept ones of its cost",
           "                while (at > 0 && ki < key[idx[at - 1]]) {",
           "                while (at > 0 && ki <= key[idx[at - 1]]) {",
           ("tests/test_vectors.py", "-k", "scans_call or pq_order")),
    Mutant("kernel-refine-frame-of-unknown-size-reads",
           "a refine frame made before any list's rows were known reads rows filled since",
           "    const int vsized = refine && refine[R_SIZE] > 4;",
           "    const int vsized = refine != NULL;",
           ("tests/test_kernel.py", "-k", "before_any_rows")),
    Mutant("kernel-refine-sort-skips-pairs",
           "the scan's refine past 32 results sorts from runs of two, never ordering pairs",
           "    for (int64_t w = 1; w < n; w *= 2) {",
           "    for (int64_t w = 2; w < n; w *= 2) {",
           ("tests/test_vectors.py", "-k", "scans_call")),
    Mutant("kernel-refine-names-the-last-threads-bad-result",
           "the scan's refine names the last thread's bad result, not the first",
           "            refine[R_BAD_KIND] = ws[t].bad_kind;\n            break;",
           "            refine[R_BAD_KIND] = ws[t].bad_kind;",
           ("tests/test_kernel.py", "-k", "first_bad_result")),
    Mutant("kernel-refine-segment-walk-off-by-one",
           "the scan's refine takes a list's next segment's first row as its last one's end",
           "for (; s < s1 && row >= segment_rows(jb, s); s++)",
           "for (; s < s1 && row > segment_rows(jb, s); s++)",
           ("tests/test_sharding.py", "-k", "scanned_together")),
    Mutant("vector-files-read-ahead",
           "a vector file is mapped without the hint that stops its reads ahead",
           "                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)",
           "                pass",
           ("tests/test_vectors.py", "-k", "cold_refined")),
    Mutant("pool-forgets-fork",
           "a forked child believes it has its parent's worker threads",
           "static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }",
           "static void pool_init(void) { (void)pool_after_fork; }",
           ("tests/test_kernel.py", "-k", "forked")),
    Mutant("pool-starts-workers-every-call",
           "the pool starts a new worker for each call and never counts it",
           "        if (!ok) break;\n        pool_workers++;\n",
           "        if (!ok) break;\n        break;\n",
           ("tests/test_kernel.py", "-k", "worker_threads")),
    Mutant("fast-tables-tree-pairs-wrong-lanes",
           "the fast tables' min/max tree pairs the wrong lanes at its first level",
           "const f16v y = __builtin_shuffle(rows[2 * i], rows[2 * i + 1], x1 + 8);",
           "const f16v y = __builtin_shuffle(rows[2 * i], rows[2 * i + 1], x1 + 7);",
           ("tests/test_fastscan.py",)),
    Mutant("fast-tables-minima-half-summed",
           "a pair's base adds only the first 8 of each 16 rows' minima",
           "            acc += __builtin_convertvector(half[0], d8v)"
           " + __builtin_convertvector(half[1], d8v);",
           "            acc += __builtin_convertvector(half[0], d8v);",
           ("tests/test_fastscan.py",)),
    Mutant("single-frames-unbounded",
           "a list table keeps a single-query frame for every (nprobe, k) ever asked",
           "                if len(made[2]) >= ONE_LAYOUTS:",
           "                if False:",
           ("tests/test_kernel.py", "-k", "frames_are_bounded")),
    Mutant("packed-tail-scans-every-row",
           "a tail packed into its list table scans all 32 rows, not only its records",
           "    memcpy(out + 16 * m + ID_BYTES * BLOCK_ROWS, &valid, sizeof(valid));",
           "    const uint32_t all = ~(uint32_t)0;\n"
           "    memcpy(out + 16 * m + ID_BYTES * BLOCK_ROWS, &all, sizeof(all));",
           ("tests/test_fastscan.py", "-k", "reference")),
    Mutant("single-refine-ids-overlap-costs",
           "a single query's refined ids start inside its refined costs (odd kout)",
           "        refine[R_OUT_ID] = (int64_t)(uintptr_t)(costs + (refine[R_KOUT] + 1) / 2);",
           "        refine[R_OUT_ID] = (int64_t)(uintptr_t)(costs + refine[R_KOUT] / 2);",
           ("tests/test_vectors.py",)),
    Mutant("checked-params-ignore-nlist",
           "checked search parameters are reused for a store of fewer lists",
           "        key = (k, nprobe, refine, nlist, vectors)",
           "        key = (k, nprobe, refine, vectors)",
           ("tests/test_bad_input.py", "-k", "reused")),
    Mutant("one-vector-not-checked-finite",
           "one float32 vector skips the finite and squared-norm check",
           "            and np.vdot(x, x) <= MAX_SQUARED_NORM):",
           "            ):",
           ("tests/test_bad_input.py",)),
    Mutant("snapshot-kept-after-a-commit",
           "the catalog keeps its last state record without comparing the state's bytes",
           "        if last is not None and last[0] == raw:\n            return last[1]",
           "        if last is not None:\n            return last[1]",
           ("tests/test_concurrency.py", "tests/test_store.py")),
    Mutant("single-frame-cached-before-vector-rows",
           "a single query's refine frame is kept before any list's vector rows are known",
           "            if not kout or sized:",
           "            if True:",
           ("tests/test_vectors.py",)),
    Mutant("fast-tables-avx512-minima-half-summed",
           "the AVX-512 pair tables' base adds only the first 8 of each 16 rows' minima",
           "        acc = _mm512_add_pd(acc, _mm512_add_pd(l0, l1));",
           "        acc = _mm512_add_pd(acc, l0);",
           ("tests/test_fastscan.py",)),
    Mutant("batch-pair-cursors-kept",
           "a batch's pairs are placed by cursors that are not moved back: each list's pairs"
           " start where the next list's do",
           "        for (int64_t e = n; e > 0; e--) start[e] = start[e - 1];\n"
           "        start[0] = 0;",
           "        (void)0;",
           ("tests/test_fastscan.py", "tests/test_kernel.py")),
    Mutant("probe-last-columns-from-zero",
           "the probe's last few columns, summed aside, start from zero, not their scores",
           "            memcpy(aside + b * 16, scores + b * nlist + last, 16 * sizeof(float));",
           "            memset(aside + b * 16, 0, 16 * sizeof(float));",
           ("tests/test_kernel.py", "-k", "probe")),
    Mutant("probe-runs-share-a-minimum",
           "the probe's bound takes a vector's first run's least score for each of its runs",
           "                for (int64_t k = 0; k < per; k++) mins[r + k] = x[k * width];",
           "                for (int64_t k = 0; k < per; k++) mins[r + k] = x[0];",
           ("tests/test_kernel.py", "-k", "probe")),
    Mutant("merge-equal-costs-unordered",
           "the merge places candidates of equal cost by cost alone: they share a place",
           "                if (same[i - i0] > 1) /* others of its cost: those before it by",
           "                if (0) /* others of its cost: those before it by",
           ("tests/test_kernel.py", "tests/test_fastscan.py")),
    Mutant("batch-blocks-sized-by-fast-terms",
           "an 8-bit store's batch is cut into blocks as if its terms were the fast scan's",
           "    block = _query_block(config, len(arrays.codebooks_t), table.fast, k * threads,",
           "    block = _query_block(config, len(arrays.codebooks_t), True, k * threads,",
           ("tests/test_kernel.py", "-k", "threads_blocks")),
    Mutant("batch-block-bad-row-not-offset",
           "a bad row found in a later block of a batch is reported as the first block's",
           "            parts.append((found, refined._replace(bad=q0 * k + refined.bad)))",
           "            parts.append((found, refined._replace(bad=refined.bad)))",
           ("tests/test_vectors.py",)),
)


class SnippetError(Exception):
    """A mutant's snippet is missing from the package or is not unique."""


def source_files(root: Path) -> list[Path]:
    """Every Python and C source of the package under ``root``, sorted."""
    pkg = root / PACKAGE
    return sorted(p for p in pkg.rglob("*") if p.is_file() and p.suffix in (".py", ".c"))


def locate(root: Path, mutant: Mutant) -> Path:
    """The one package file holding ``mutant.original`` exactly once."""
    hits = [(p, p.read_text(encoding="utf-8").count(mutant.original))
            for p in source_files(root)]
    hits = [(p, n) for p, n in hits if n]
    total = sum(n for _, n in hits)
    if total != 1:
        where = ", ".join(f"{p.relative_to(root)} ({n}x)" for p, n in hits) or "no file"
        raise SnippetError(f"{mutant.id}: the original snippet must occur exactly once in "
                           f"{PACKAGE}/**/*.py|*.c; found {total} in {where}: "
                           f"{mutant.original!r}")
    return hits[0][0]


def copy_repo(dest: Path) -> Path:
    """A copy of the working tree (no .git, environments or caches) at ``dest/repo``."""
    out = dest / "repo"
    shutil.copytree(REPO, out, ignore=IGNORE, symlinks=True)
    return out


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("IVFPQ_STORE_KERNEL", None)  # the kernel must not be switched off by accident
    return env


def _probe(copy: Path) -> str:
    """Where the copy's package is imported from, and its kernel status (one line each)."""
    code = ("import ivfpq_store, ivfpq_store._kernel as k; print(ivfpq_store.__file__); "
            "print(k.kernel_status()); print(k.KERNEL is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy),
                         capture_output=True, text=True, check=True)
    return out.stdout


def _check_copy(copy: Path, *, need_kernel: bool) -> str | None:
    """Why the copy cannot be tested (package imported from elsewhere, kernel missing)."""
    try:
        where, status, loaded = _probe(copy).splitlines()[:3]
    except subprocess.CalledProcessError as err:
        return f"the copy does not import: {err.stderr.strip()[-500:]}"
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        return f"ivfpq_store was imported from {where}, not from the copy"
    if need_kernel and loaded != "True":
        return f"the copy's C kernel did not load: {status}"
    return None


#: setup.py's extensions built without reading pyproject.toml: a setuptools older than the
#: one pyproject.toml's [build-system] asks for (77, for the PEP 639 ``license``) refuses the
#: file, but builds the extension alone with the same flags.
_BUILD_EXTENSIONS_ONLY = """
import sys, setuptools
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__"})
dist = setuptools.Distribution({"ext_modules": captured["ext_modules"],
                                "script_name": "setup.py",
                                "script_args": ["build_ext", "--inplace", "-q"]})
dist.parse_command_line()
dist.run_commands()
"""


def _build(copy: Path) -> str | None:
    """Rebuild the copy's C kernel in place; why it failed, or None.

    Runs ``python setup.py build_ext --inplace -q``; where the installed setuptools cannot
    read pyproject.toml, builds setup.py's extensions alone (see _BUILD_EXTENSIONS_ONLY).
    """
    for so in (copy / PACKAGE).glob("_scan*.so"):
        so.unlink()  # the rebuilt library must be the one loaded
    errors = []
    for cmd in ([sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
                [sys.executable, "-c", _BUILD_EXTENSIONS_ONLY]):
        done = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
        if done.returncode == 0:
            break
        errors.append((done.stderr or done.stdout).strip()[-400:])
    else:
        return "build failed: " + " | then: ".join(errors)
    if not list((copy / PACKAGE).glob("_scan*.so")):
        return "build produced no _scan library (the optional extension was skipped)"
    return None


def _pytest(copy: Path, args: tuple[str, ...]) -> tuple[int | None, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT} s"
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return done.returncode, (failed[0] if failed else (lines[-1] if lines else ""))


class Outcome(NamedTuple):
    mutant: Mutant
    status: str  # killed, survived, error
    detail: str
    seconds: float


def run_mutant(mutant: Mutant) -> Outcome:
    """Apply ``mutant`` to a fresh copy of the repository and run its tests there."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        copy = copy_repo(Path(tmp))
        target = locate(copy, mutant)
        text = target.read_text(encoding="utf-8")
        target.write_text(text.replace(mutant.original, mutant.replacement), encoding="utf-8")
        is_c = target.suffix == ".c"
        problem = _build(copy) if is_c else None
        problem = problem or _check_copy(copy, need_kernel=is_c)
        if problem:
            return Outcome(mutant, "error", problem, time.perf_counter() - t0)
        rc, detail = _pytest(copy, mutant.tests)
    seconds = time.perf_counter() - t0
    if rc is None or rc == 1:  # failures, or a hang
        return Outcome(mutant, "killed", detail, seconds)
    if rc < 0:  # pytest died of a signal (a crash such as SIGSEGV or SIGBUS)
        return Outcome(mutant, "killed", f"the tests crashed (signal {-rc}): {detail}", seconds)
    if rc == 0:
        return Outcome(mutant, "survived", detail, seconds)
    return Outcome(mutant, "error", f"pytest exit status {rc}: {detail}", seconds)


def baseline(mutants: list[Mutant]) -> str | None:
    """Run the union of the mutants' tests on an unmutated copy; why it failed, or None."""
    files = sorted({a for m in mutants for a in m.tests if a.startswith("tests/")})
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        copy = copy_repo(Path(tmp))
        problem = _check_copy(copy, need_kernel=False)
        if problem:
            return problem
        rc, detail = _pytest(copy, tuple(files))
    return None if rc == 0 else f"pytest exit status {rc}: {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="ID",
                        help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true",
                        help="list the mutants and the file each applies to, then exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run of the mutants' tests")
    args = parser.parse_args(argv)

    known = {m.id: m for m in MUTANTS}
    if len(known) != len(MUTANTS):
        parser.error("duplicate mutant ids")
    unknown = [i for i in args.only or [] if i not in known]
    if unknown:
        parser.error(f"unknown mutant id(s) {', '.join(unknown)}; see --list")
    chosen = [known[i] for i in args.only] if args.only else list(MUTANTS)
    try:
        targets = {m.id: locate(REPO, m) for m in chosen}  # fail early, before any copy
    except SnippetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id:38} {targets[m.id].relative_to(REPO)}\n    {m.description}\n"
                  f"    tests: {' '.join(m.tests)}")
        return 0
    if not args.no_baseline:
        print("baseline: running the mutants' tests on an unmutated copy...", flush=True)
        problem = baseline(chosen)
        if problem:
            print(f"error: the unmutated tests fail: {problem}", file=sys.stderr)
            return 2
    outcomes = []
    for m in chosen:
        outcome = run_mutant(m)
        outcomes.append(outcome)
        print(f"{outcome.status.upper():9} {m.id:38} {outcome.seconds:6.1f} s  "
              f"{outcome.detail[:110]}", flush=True)
    killed = sum(o.status == "killed" for o in outcomes)
    print(f"\nkill rate: {killed}/{len(outcomes)} ({100 * killed / len(outcomes):.0f}%)")
    for o in outcomes:
        if o.status != "killed":
            print(f"  {o.status}: {o.mutant.id}: {o.mutant.description}")
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
