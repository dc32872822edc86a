"""The quantizer: how a vector becomes (list, code), and a code becomes a vector again.

:class:`CoarseQuantizer` holds the ``nlist`` centroids and probes them; :class:`Quantizer`
adds the PQ codebooks of the residuals and the tables derived from them. Creation assigns
the training vectors with a :class:`CoarseQuantizer`; ``add`` assigns and encodes with a
:class:`Quantizer`; search probes, reads its tables and (numpy path) decodes with it. Each
operation picks the compiled kernel when it is built (:data:`ivfpq_store._kernel.KERNEL`,
read at every call) and numpy otherwise.

A store with an OPQ rotation keeps its centroids and codebooks in the rotated space: every
method here takes and returns rotated vectors, and :meth:`Quantizer.rotate` maps a vector
given to the store (added, or a query) into that space. The writer and the searcher call it
at their entry; stored vectors and exact re-ranking stay in the space of the vectors as given
(the rotation is orthogonal, so distances are the same in both).
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import wait as futures_wait

import numpy as np

from . import _kernel
from ._threads import pool
from .training.kmeans import (
    assign_block,
    best_columns,
    l2_score_matrix,
    nearest_labels,
    with_ones,
)
from .types import F32Array, I64Array, Metric, StepFn, U8Array

__all__ = ["ENCODE_BLOCK", "PIPELINE_BLOCK", "PROBE_BLOCK", "CoarseQuantizer", "Quantizer"]

#: Vectors assigned and encoded per block. It bounds the (n, nlist) score matrix and keeps it
#: in cache: 2,048 rows assign 100k vectors to 1,024 lists in 0.22 s, 8,192 in 0.41 s.
ENCODE_BLOCK = 2048
#: Vectors per step of the kernel path's pipeline (assign a block while the previous one is
#: encoded): 16,384 took 0.19-0.20 s per 100k vectors, 4,096 0.22-0.24 s (quiet machine).
PIPELINE_BLOCK = 16384
#: Queries whose coarse scores (nq, nlist) are computed at once by the numpy probe.
PROBE_BLOCK = 8192


class CoarseQuantizer:
    """The ``nlist`` coarse centroids (nlist, dim) float32 of one metric, and their probe."""

    __slots__ = ("centroids", "metric", "probe_matrix")

    def __init__(self, centroids: F32Array, metric: Metric) -> None:
        self.centroids = centroids
        self.metric = metric
        #: (dim + 1, nlist) ``[-2 C^T; |c|^2]`` for l2, (dim, nlist) ``-C^T`` for ip/cosine:
        #: ``[q, 1] @ it`` is ``-2<q, c> + |c|^2``, ``q @ it`` is ``-<q, c>``.
        self.probe_matrix = (l2_score_matrix(centroids) if metric is Metric.L2
                             else np.ascontiguousarray(-centroids.T))

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    def probe(self, queries: F32Array, nprobe: int, *,
              block: int = PROBE_BLOCK) -> tuple[F32Array, I64Array]:
        """The ``nprobe`` best lists per query (nq, nprobe), best first, and their coarse
        costs, with one BLAS product per ``block`` queries.

        Costs are "smaller is better": squared L2 distance to the centroid, or the negated
        inner product with it. Ties go to the lower list number.
        """
        if len(queries) > block:
            parts = [self.probe(queries[s: s + block], nprobe, block=block)
                     for s in range(0, len(queries), block)]
            return (np.concatenate([c for c, _ in parts]), np.concatenate([p for _, p in parts]))
        # Costs up to a per-query constant, from one product and no other pass over the
        # (nq, nlist) matrix: l2 -2<q, c> + |c|^2 (|q|^2 is added to the chosen ones only);
        # ip -<q, c>.
        left = with_ones(queries) if self.metric is Metric.L2 else queries
        scores = left @ self.probe_matrix
        if nprobe == 1:  # assignment (add): the first best, no partition needed
            part = np.argmin(scores, axis=1)[:, None]
        elif nprobe < scores.shape[1]:
            part = np.argpartition(scores, nprobe - 1, axis=1)[:, :nprobe]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(part_scores, axis=1, kind="stable")
        best = np.take_along_axis(part_scores, order, axis=1)
        if self.metric is Metric.L2:
            best += np.einsum("ij,ij->i", queries, queries)[:, None]
        return best, np.take_along_axis(part, order, axis=1).astype(np.int64)

    def assign(self, x: F32Array) -> I64Array:
        """The list (n,) of each vector of ``x``: its best probe, in blocks of
        :data:`ENCODE_BLOCK` vectors (fewer when nlist is large: :func:`assign_block`). Always
        BLAS: see :meth:`Quantizer.assign_and_encode`."""
        return best_columns(x, self.probe_matrix, ones=self.metric is Metric.L2,
                            block=min(ENCODE_BLOCK, assign_block(self.nlist)))


class Quantizer(CoarseQuantizer):
    """A coarse quantizer and the product quantizer of its residuals: ``m`` sub-quantizers of
    ``ksub`` sub-centroids of ``dsub`` floats, ``codebooks`` (m, ksub, dsub) float32.

    Read-only after construction, so one instance serves any number of threads.
    """

    __slots__ = ("_codebook_items", "_offsets", "_rotation_t", "codebooks", "codebooks_t",
                 "norms", "rotation")

    def __init__(self, centroids: F32Array, codebooks: F32Array, metric: Metric,
                 rotation: F32Array | None = None) -> None:
        super().__init__(centroids, metric)
        self.codebooks = codebooks
        #: The orthogonal (dim, dim) OPQ rotation R (a vector x becomes ``R @ x``), or None.
        self.rotation = rotation
        self._rotation_t = None if rotation is None else np.ascontiguousarray(rotation.T)
        #: (m, ksub) squared norms of the sub-centroids.
        self.norms: F32Array = np.einsum("jkd,jkd->jk", codebooks, codebooks)
        #: (m, dsub, ksub) C-contiguous: the codebooks as the table products want them.
        #: numpy's stacked matmul only reaches BLAS when both operands are contiguous; the
        #: transposed view was 13x slower (measured).
        self.codebooks_t: F32Array = np.ascontiguousarray(codebooks.transpose(0, 2, 1))
        # (m*ksub,) opaque items of dsub float32 each: item j*ksub + c is sub-centroid c of
        # sub-quantizer j, for decoding.
        flat = np.ascontiguousarray(codebooks.reshape(-1, self.dsub))
        self._codebook_items = flat.view(
            np.dtype((np.void, flat.itemsize * self.dsub))).reshape(-1)
        # code j of a record indexes row j*ksub + code of a flattened (m*ksub, ...) table.
        self._offsets = (np.arange(self.m) * self.ksub).astype(np.intp)

    @property
    def m(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def ksub(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def dsub(self) -> int:
        return int(self.codebooks.shape[2])

    def same_as(self, other: Quantizer) -> bool:
        """Whether ``other`` quantizes exactly as this one (metric, centroids, codebooks and
        rotation equal), so that distances of the two may be compared."""
        if other is self:
            return True
        if self.rotation is None or other.rotation is None:
            same_rotation = self.rotation is None and other.rotation is None
        else:
            same_rotation = np.array_equal(self.rotation, other.rotation)
        return (same_rotation and self.metric is other.metric
                and np.array_equal(self.centroids, other.centroids)
                and np.array_equal(self.codebooks, other.codebooks))

    def rotate(self, x: F32Array) -> F32Array:
        """``x`` (n, dim) float32 in the space of the centroids and codebooks: rotated by the
        OPQ rotation, or ``x`` itself when there is none."""
        if self._rotation_t is None:
            return x
        out: F32Array = x @ self._rotation_t
        return out

    def unrotate(self, x: F32Array) -> F32Array:
        """``x`` (n, dim) of the rotated space back in the space of the vectors as given
        (R is orthogonal: its inverse is its transpose), or ``x`` itself without a
        rotation."""
        if self.rotation is None:
            return x
        out: F32Array = x @ self.rotation
        return out

    @property
    def kernel(self) -> _kernel.Kernel | None:
        """The compiled kernel when it is built and enabled, else None (numpy)."""
        return _kernel.KERNEL

    def assign_and_encode(self, x: F32Array,
                          advance: StepFn | None = None) -> tuple[I64Array, U8Array]:
        """The list (n,) and PQ code (n, m) of each vector of ``x`` (n, dim), in blocks of
        :data:`ENCODE_BLOCK` (numpy) or :data:`PIPELINE_BLOCK` (the kernel, which encodes a
        block on a worker thread while the next is assigned); ``advance`` is called with
        each block's size once it is encoded."""
        n = x.shape[0]
        kernel = self.kernel
        if kernel is None:
            list_nos = np.empty(n, dtype=np.int64)
            codes = np.empty((n, self.m), dtype=np.uint8)
            for s in range(0, n, ENCODE_BLOCK):
                xb = x[s: s + ENCODE_BLOCK]
                list_nos[s: s + len(xb)] = self.probe(xb, 1)[1][:, 0]
                codes[s: s + len(xb)] = self.encode_residuals(
                    xb - self.centroids[list_nos[s: s + len(xb)]])
                if advance is not None:
                    advance(len(xb))
            return list_nos, codes
        # Pipelined: the kernel encodes a block on a worker thread while BLAS assigns the
        # next one here, so the encoder never waits beside the BLAS thread that keeps
        # spinning after a product. 100k vectors, nlist=256, with another process busy:
        # 0.30-0.49 s one after the other, 0.21-0.23 s pipelined; on a quiet machine the
        # same (0.18-0.20 s both; docs/benchmarks.md, "Performance II"). The same codes.
        list_nos = np.empty(n, dtype=np.int64)
        codes = np.empty((n, self.m), dtype=np.uint8)

        def encode(s: int, e: int) -> None:
            codes[s:e] = kernel.encode(x[s:e], list_nos[s:e], self.centroids, self.codebooks_t,
                                       self.norms, nthreads=_kernel.THREADS)

        encoder = pool("encode", _kernel.THREADS)  # kept: see ivfpq_store._threads
        pending: tuple[Future[None], int] | None = None
        try:
            for s in range(0, n, PIPELINE_BLOCK):
                e = min(n, s + PIPELINE_BLOCK)
                list_nos[s:e] = self.assign(x[s:e])
                if pending is not None:
                    pending[0].result()
                    if advance is not None:
                        advance(pending[1])
                pending = (encoder.submit(encode, s, e), e - s)
            if pending is not None:
                pending[0].result()
                if advance is not None:
                    advance(pending[1])
        finally:  # an error here leaves no encode running
            if pending is not None:
                futures_wait([pending[0]])
        return list_nos, codes

    def encode(self, x: F32Array, list_nos: I64Array,
               advance: StepFn | None = None) -> U8Array:
        """PQ codes (n, m) of the residuals ``x - centroids[list_nos]``, in blocks of
        :data:`ENCODE_BLOCK`. The kernel never materialises the residuals; its codes are
        numpy's but for rare float near-ties."""
        kernel = self.kernel
        n = x.shape[0]
        codes = np.empty((n, self.m), dtype=np.uint8)
        for s in range(0, n, ENCODE_BLOCK):
            e = min(n, s + ENCODE_BLOCK)
            if kernel is None:
                codes[s:e] = self.encode_residuals(x[s:e] - self.centroids[list_nos[s:e]])
            else:
                codes[s:e] = kernel.encode(x[s:e], list_nos[s:e], self.centroids,
                                           self.codebooks_t, self.norms,
                                           nthreads=_kernel.THREADS)
            if advance is not None:
                advance(e - s)
        return codes

    def encode_residuals(self, r: F32Array) -> U8Array:
        """Codes (n, m) uint8 of residuals ``r`` (n, dim) in numpy: per sub-quantizer, the
        nearest sub-centroid (the first one on ties)."""
        codes = np.empty((r.shape[0], self.m), dtype=np.uint8)
        for j in range(self.m):
            sub = r[:, j * self.dsub: (j + 1) * self.dsub]
            codes[:, j] = nearest_labels(sub, self.codebooks[j], centroid_norms=self.norms[j])
        return codes

    def decode_residuals(self, codes: U8Array) -> F32Array:
        """Reconstructed residuals (n, dim) float32 of PQ codes (n, m)."""
        idx = np.add(codes, self._offsets, dtype=np.intp)
        # Each sub-centroid is taken as one opaque dsub*4-byte item: 8x faster than fancy
        # indexing of float32 rows (measured 20 vs 160 us for 1,000 codes of m=16).
        items = np.take(self._codebook_items, idx)
        decoded: F32Array = items.view(np.float32).reshape(len(codes), -1)
        return decoded

    def decode(self, list_nos: I64Array, codes: U8Array) -> F32Array:
        """Reconstructed vectors (n, dim) float32: each list's centroid plus its decoded
        residual."""
        out = self.decode_residuals(codes)
        out += self.centroids[list_nos]
        return out
