/*
 * The IVF-PQ kernel: the coarse probe, ADC lookup tables, table sums over a list's codes and an
 * exact top-k for many (query, list) pairs at once, and the PQ encoder of add, on threads.
 *
 * Plain C, no Python API in the hot path: it is called through ctypes (which releases the GIL)
 * by ivfpq_store/_kernel.py, and is compiled at install time as an optional extension. When it
 * is missing, ivfpq_store.search runs the same search in numpy. docs/design.md, "Scan kernel",
 * describes the contract; the tests check both against an exhaustive ADC reference.
 *
 * Results are exact and deterministic: candidates are ordered by (cost, probe rank, row), as in
 * the numpy path, so ties go to the better-ranked list, then the earlier row, whatever the
 * number of threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the kernel reads little-endian record ids in place; this build falls back to numpy"
#endif

/* Hot loops are compiled for several x86-64 levels and the best one the CPU has is picked
 * when the library loads (gcc/clang function multiversioning): the install stays portable,
 * and AVX2 or AVX-512 machines get wide products (measured against the baseline build: the
 * probe 2.2x faster, a 1,000-query scan 1.3x). */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones) && defined(__GLIBC__) /* ifunc: glibc, not musl */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef HOT
#define HOT
#endif

/* The fast scan's block sums use the shuffles of AVX2 or AVX-512BW where the CPU has them,
 * chosen once at run time; a plain loop elsewhere (and in a build without x86 intrinsics). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(IVFPQ_NO_SIMD)
#include <immintrin.h>
#define FAST_SIMD 1
#endif

/* Version of the ivfpq_scan contract; _kernel.py refuses a library of another version. */
#define IVFPQ_SCAN_ABI 14
/* Every sub-table has 256 entries, whatever ksub: a code byte can never index out of the
 * tables, and entries >= ksub (impossible codes of a damaged file) are +inf, never results. */
#define TSTRIDE 256
/* Bytes of the id that starts every record (docs/format.md, segment records). */
#define ID_BYTES 8

/* Rows per block (docs/format.md §5.6): block b of a list holds rows 32b .. 32b + 31, their
 * codes sub-quantizer by sub-quantizer (16 bytes each: row i's code in the low 4 bits of byte
 * i, row i + 16's in the high 4 bits), then their 32 ids. */
#define BLOCK_ROWS 32
#define FAST_KSUB 16

/* A sub-quantizer's 16 table entries as one vector (GCC vector extensions: one AVX-512
 * register in the x86-64-v4 clone, two AVX2 ones in v3, four SSE ones elsewhere; the same
 * operations, so the same bits, in every clone). */
/* Vectors passed between always-inline helpers only: no call ever uses the vector ABI that
 * GCC warns of (-Wpsabi) when the baseline clone has no AVX-512. */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f16v __attribute__((vector_size(FAST_KSUB * sizeof(float))));
typedef int32_t i16v __attribute__((vector_size(FAST_KSUB * sizeof(int32_t))));
typedef uint8_t u16v __attribute__((vector_size(FAST_KSUB)));
typedef float f8v __attribute__((vector_size(8 * sizeof(float))));
typedef float f4v __attribute__((vector_size(4 * sizeof(float))));

typedef struct {
    float cost;
    int32_t rank;
    int64_t row;
    int64_t id;
} cand_t;

/* The 16-bit sums (32,) of a block's rows over the 8-bit tables lut, in row order, and the
 * mask of the rows whose sum is at most thr (bit i: row i). */
typedef uint32_t (*block_sums_fn)(const uint8_t *codes, const uint8_t *lut, int64_t m,
                                  int64_t thr, uint16_t *out);

/* A pair's 8-bit tables (fast_tables, or its AVX-512 copy: the same bits). */
typedef int (*fast_tables_fn)(const float *lterm, const float *qterm, float bias, int64_t m,
                              float bound, float *t, uint8_t *lut, float *base, float *inv);

/* Is a after b in the result order (cost, rank, row)? */
static inline int after(const cand_t *a, const cand_t *b) {
    if (a->cost != b->cost) return a->cost > b->cost;
    if (a->rank != b->rank) return a->rank > b->rank;
    return a->row > b->row;
}

/* A bounded max-heap: c[0] is the worst of the best `cap` candidates so far. limit: the
 * largest cost a candidate may have and still be among the query's best, when cap better
 * candidates are known elsewhere (FLT_MAX: none are). */
typedef struct {
    cand_t *c;
    int64_t n;
    float limit;
} heap_t;

/* The largest cost a candidate may have and still be offered to h. */
static inline float heap_bound(const heap_t *h, int64_t cap) {
    return h->n < cap || h->c[0].cost > h->limit ? h->limit : h->c[0].cost;
}

static void heap_offer(heap_t *h, int64_t cap, const cand_t *x) {
    cand_t *c = h->c;
    int64_t i;
    if (h->n < cap) { /* sift up */
        i = h->n++;
        while (i > 0) {
            int64_t parent = (i - 1) / 2;
            if (!after(x, &c[parent])) break;
            c[i] = c[parent];
            i = parent;
        }
        c[i] = *x;
        return;
    }
    if (!after(&c[0], x)) return; /* not better than the worst kept */
    i = 0;                        /* replace the top, sift down */
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, big = i;
        const cand_t *bv = x;
        if (l < cap && after(&c[l], bv)) { big = l; bv = &c[l]; }
        if (r < cap && after(&c[r], bv)) { big = r; }
        if (big == i) break;
        c[i] = c[big];
        i = big;
    }
    c[i] = *x;
}

/* Scratch memory kept from call to call. A batch's scratch (heaps, terms, tables: megabytes)
 * taken fresh from malloc comes as new pages, each faulted in and zeroed on first touch:
 * about 1,100 faults in a refined 1,000-query batch at 1M, 0.9-1.4 ms of its 23 (measured by
 * perf stat -e page-faults over python tools/bench.py's batch, and against mallopt keeping
 * the heap). The blocks go back to a few spares instead: at most SPARE_BLOCKS, each at most
 * SPARE_BYTES; a call takes the smallest spare that fits. */
#define SPARE_BLOCKS 4
#define SPARE_BYTES ((size_t)64 << 20)
#define SCRATCH_ALIGN 64
static pthread_mutex_t spare_lock = PTHREAD_MUTEX_INITIALIZER;
static void *spare[SPARE_BLOCKS];
static size_t spare_size[SPARE_BLOCKS];

static void pool_ready(void); /* the fork handler that resets spare_lock too */

/* A block of at least `size` bytes, aligned to SCRATCH_ALIGN (its size to *got), or NULL. */
static void *scratch_take(size_t size, size_t *got) {
    void *p = NULL;
    int best = -1;
    pool_ready();
    pthread_mutex_lock(&spare_lock);
    for (int i = 0; i < SPARE_BLOCKS; i++)
        if (spare[i] && spare_size[i] >= size && (best < 0 || spare_size[i] < spare_size[best]))
            best = i;
    if (best >= 0) {
        p = spare[best];
        *got = spare_size[best];
        spare[best] = NULL;
    }
    pthread_mutex_unlock(&spare_lock);
    if (p) return p;
    size = (size + SCRATCH_ALIGN - 1) & ~(size_t)(SCRATCH_ALIGN - 1);
    if (posix_memalign(&p, SCRATCH_ALIGN, size ? size : SCRATCH_ALIGN)) return NULL;
    *got = size;
    return p;
}

/* Give back a block of scratch_take's (NULL: none): kept as a spare in an empty slot or in
 * place of a smaller one, else freed. */
static void scratch_give(void *p, size_t size) {
    if (p && size <= SPARE_BYTES) {
        int slot = -1;
        pthread_mutex_lock(&spare_lock);
        for (int i = 0; i < SPARE_BLOCKS && slot < 0; i++)
            if (!spare[i]) slot = i;
        if (slot < 0) /* all full: in place of the smallest smaller one, if any */
            for (int i = 0; i < SPARE_BLOCKS; i++)
                if (spare_size[i] < size && (slot < 0 || spare_size[i] < spare_size[slot]))
                    slot = i;
        if (slot >= 0) {
            void *old = spare[slot];
            spare[slot] = p;
            spare_size[slot] = size;
            p = old;
        }
        pthread_mutex_unlock(&spare_lock);
    }
    free(p);
}

/* Offsets at[i] of n parts of sizes[i] bytes laid out in one block, each aligned to
 * SCRATCH_ALIGN; returns the block's size. */
static size_t lay_out(const size_t *sizes, size_t *at, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        at[i] = total;
        total += (sizes[i] + SCRATCH_ALIGN - 1) & ~(size_t)(SCRATCH_ALIGN - 1);
    }
    return total;
}

/* ---- worker threads kept from call to call ----------------------------------------------
 *
 * A scan runs up to five parallel phases (probe, query terms, two list passes, merge). Threads
 * started and joined for each left the other CPUs idle between phases, and on a virtual
 * machine an idle CPU halts: every phase then waited for the host to wake one again. After
 * half a second idle, a refined 1,000-query batch at 1M took 30 ms for 6 calls or more,
 * against 19 ms back to back (python tools/bench.py, which pauses before each timed call;
 * faiss's OpenMP threads spin between calls and were not slowed). Workers now wait for the
 * next phase spinning for POOL_SPIN_NS, then sleep. One call at a time uses the pool; a call
 * made while another holds it starts and joins its own threads, as before. A forked child
 * starts a pool of its own. */
#define POOL_MAX 64
#define POOL_SPIN_NS 2000000 /* 2 ms */

/* A worker's mailbox: the caller writes fn and item, then bumps seq (release); the worker
 * runs fn(item) for each new seq. The caller gives a worker an item only when it has finished
 * its last one, so a mailbox is never written while its worker reads it. */
typedef struct {
    uint64_t seq;
    void *(*fn)(void *);
    void *item;
} __attribute__((aligned(64))) pool_slot_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;  /* held by the pool's user */
static pthread_mutex_t pool_sleep = PTHREAD_MUTEX_INITIALIZER; /* guards the two below */
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;    /* some mailbox has an item */
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;    /* the last item finished */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_workers;      /* started (under pool_lock) */
static int pool_sleepers;     /* workers asleep on pool_wake (under pool_sleep) */
static int pool_caller_waits; /* the caller asleep on pool_done (under pool_sleep) */
static int pool_remaining;    /* the workers' items of the task not finished (atomic) */
static int pool_failed;       /* some fn of the task returned non-NULL (atomic) */
static pool_slot_t pool_slots[POOL_MAX];

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *pool_worker(void *arg) {
    pool_slot_t *slot = &pool_slots[(intptr_t)arg];
    uint64_t seen = 0; /* a new worker's mailbox starts at 0 (pool_run) */
    for (;;) {
        const uint64_t start = now_ns();
        for (unsigned i = 1; __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE) == seen; i++) {
            cpu_relax();
            if (!(i & 255) && now_ns() - start > POOL_SPIN_NS) { /* sleep till an item */
                pthread_mutex_lock(&pool_sleep);
                pool_sleepers++;
                while (__atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE) == seen)
                    pthread_cond_wait(&pool_wake, &pool_sleep);
                pool_sleepers--;
                pthread_mutex_unlock(&pool_sleep);
                break;
            }
        }
        seen = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
        if (slot->fn(slot->item) != NULL) __atomic_store_n(&pool_failed, 1, __ATOMIC_RELAXED);
        if (__atomic_sub_fetch(&pool_remaining, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&pool_sleep);
            if (pool_caller_waits) pthread_cond_signal(&pool_done);
            pthread_mutex_unlock(&pool_sleep);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: it starts its own. Its locks may have
 * been held by the parent's other threads at the fork: they start unlocked. */
static void pool_after_fork(void) {
    pthread_mutex_init(&spare_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&pool_sleep, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_workers = pool_sleepers = pool_caller_waits = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void pool_ready(void) { pthread_once(&pool_once, pool_init); }

/* Run the task on the pool (the caller holds pool_lock): item 0 here, items 1.. in the
 * mailboxes of workers, started as needed; items past the workers there are run here too. */
static int pool_run(int n, char *at, size_t item_size, void *(*fn)(void *)) {
    while (pool_workers < n - 1 && pool_workers < POOL_MAX) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        __atomic_store_n(&pool_slots[pool_workers].seq, 0, __ATOMIC_RELAXED);
        const int ok = pthread_create(&tid, &attr, pool_worker,
                                      (void *)(intptr_t)pool_workers) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool_workers++;
    }
    const int shared = n - 1 < pool_workers ? n : pool_workers + 1; /* items the pool takes */
    __atomic_store_n(&pool_failed, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool_remaining, shared - 1, __ATOMIC_RELAXED);
    for (int w = 0; w + 1 < shared; w++) {
        pool_slots[w].fn = fn;
        pool_slots[w].item = at + (size_t)(w + 1) * item_size;
        __atomic_add_fetch(&pool_slots[w].seq, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_lock(&pool_sleep);
    if (pool_sleepers) pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_sleep);
    int failed = fn(at) != NULL;
    for (int u = shared; u < n; u++) failed |= fn(at + (size_t)u * item_size) != NULL;
    const uint64_t start = now_ns();
    for (unsigned i = 1; __atomic_load_n(&pool_remaining, __ATOMIC_ACQUIRE) > 0; i++) {
        cpu_relax();
        if (!(i & 255) && now_ns() - start > POOL_SPIN_NS) {
            pthread_mutex_lock(&pool_sleep);
            pool_caller_waits = 1;
            while (__atomic_load_n(&pool_remaining, __ATOMIC_ACQUIRE) > 0)
                pthread_cond_wait(&pool_done, &pool_sleep);
            pool_caller_waits = 0;
            pthread_mutex_unlock(&pool_sleep);
            break;
        }
    }
    return failed | __atomic_load_n(&pool_failed, __ATOMIC_RELAXED);
}

/* Run fn on items[0..n) (each item_size bytes): item 0 on this thread, the others on the
 * pool's workers, or when another call holds the pool, on n - 1 new threads (a thread that
 * cannot be started has its share run here instead). Returns whether any fn returned
 * non-NULL (a failure). */
static int run_parallel(int n, void *items, size_t item_size, pthread_t *tids,
                        void *(*fn)(void *)) {
    char *at = (char *)items;
    if (n <= 1) return n == 1 && fn(at) != NULL;
    pool_ready();
    if (pthread_mutex_trylock(&pool_lock) == 0) {
        const int failed = pool_run(n, at, item_size, fn);
        pthread_mutex_unlock(&pool_lock);
        return failed;
    }
    int started = 0, failed = 0;
    for (int t = 1; t < n; t++) {
        if (pthread_create(&tids[t], NULL, fn, at + (size_t)t * item_size) != 0) {
            for (int u = t; u < n; u++) failed |= fn(at + (size_t)u * item_size) != NULL;
            break;
        }
        started = t;
    }
    failed |= fn(at) != NULL;
    for (int t = 1; t <= started; t++) {
        void *r = NULL;
        pthread_join(tids[t], &r);
        failed |= r != NULL;
    }
    return failed;
}

typedef struct {
    int64_t nq, dim, m, ksub, dsub, stride, cap;
    int l2;
    const float *queries;     /* (nq, dim) */
    const float *centroids;   /* (nlist, dim) */
    const float *codebooks_t; /* (m, dsub, ksub) */
    const float *norms;       /* (m, ksub): |sub-centroid|^2 */
    const float *list_terms;  /* l2: (nlist, m, tstride) from ivfpq_list_terms, or NULL */
    const int64_t *list_no;   /* (L,) */
    const int64_t *seg_start; /* (L + 1,) segments of list l: seg_start[l] .. [l+1], or NULL */
    const uint64_t *rec_addr; /* (S,) address of the segment's first record */
    const int64_t *rec_count; /* (S,) */
    const uint64_t *dead_addr;  /* (S,) address of sorted int64 tombstoned rows, or 0 */
    const int64_t *dead_count;  /* (S,) */
    const int64_t *pair_start;  /* (L + 1,) pairs of list l: pair_start[l] .. pair_start[l+1] */
    const int64_t *pair_q;      /* (P,) query of each pair */
    const int32_t *pair_rank;   /* (P,) probe rank of the list for that query */
    float *query_terms;         /* (nq, m, tstride), filled by the first phase */
    int32_t *first_rank;        /* (nq,) the best probe rank among each query's pairs */
    /* The fast scan (4-bit codes in blocks), or NULL: (S,) address of the segment's first
     * block and its number of blocks; rec_addr and rec_count are then the segment's tail,
     * the records after its blocks, packed as one more block (ivfpq_pack_tail), and a
     * segment holds 32 * blk_count + rec_count rows. */
    const uint64_t *blk_addr;
    const int64_t *blk_count;
    /* Entries per sub-table of the terms: TSTRIDE, or FAST_KSUB (16) in the fast scan,
     * whose tables are built from the first 16 of each and which reads no code past 15. */
    int64_t tstride;
    /* The merge's outputs (nq, k), and the refine frame (R_* slots) or NULL; with it, the
     * list entry of each query's probe ranks (nq, nrank), -1 for a rank it does not scan. */
    int64_t k;
    float *out_cost;
    int64_t *out_id;
    int32_t *out_rank;
    int64_t *out_row;
    const int64_t *refine;
    int32_t *entry_of;
    int64_t nrank;
    int64_t nlists; /* L */
} job_t;

typedef struct worker {
    const job_t *job;
    int64_t b0, b1;  /* queries [b0, b1) in the first and last phases, lists [b0, b1) in the
                        others */
    int pass;        /* the list phase's pass: 0 each query's first pair, 1 the others */
    int64_t q0, q1;  /* the list phase takes the pairs of queries [q0, q1) only */
    heap_t *heaps;   /* (nq,) */
    float *table;    /* (m, TSTRIDE) */
    float *lterm;    /* (m, TSTRIDE): the current list's terms, when not precomputed */
    uint8_t *lut;    /* the fast scan: (m rounded up to 4, 16) 8-bit tables, zero padded */
    uint16_t *presums;   /* the fast scan: a pair's sums of a list's every row (scan_fast) */
    block_sums_fn sums; /* the fast scan's block sums */
    fast_tables_fn tables; /* and its pair tables */
    /* The merge: every thread's workers (nall), scratch for a query's candidates, and for
     * refine its queries' row addresses and exact costs ((b1 - b0) * k each); the first
     * result whose row is bad (-1: none) and why (R_BAD_KIND). */
    const struct worker *all;
    int nall;
    cand_t *merge;
    uint64_t *raddr;
    float *rcost;
    int64_t bad, bad_kind;
} worker_t;

/* Sub-centroids whose products are summed in registers at once: four AVX-512 vectors. */
#define PRODUCT_BLOCK 64

/* t[j][c] = (init ? init[j][c] : 0) + scale * v_j.C_jc for c < ksub, and pad for c >= ksub:
 * products of the sub-vectors of v (dim,) with every sub-centroid, in (m, TSTRIDE). Each
 * block of PRODUCT_BLOCK sub-centroids is summed over the dsub dimensions in registers and
 * stored once, rather than loaded and stored again for each d (Kernel.list_terms of 1,000
 * vectors at m=16, dsub=8: 5.0 ms against 9.2 ms, best of five); every entry adds its
 * terms in the order d = 0, 1, ..., as the rest does. */
HOT static void sub_products(const float *v, float scale, const float *init, float pad,
                         const float *codebooks_t, int64_t m, int64_t dsub, int64_t ksub,
                         int64_t stride, float *t) {
    if (ksub == FAST_KSUB && stride == FAST_KSUB) { /* the fast scan's: a vector a table */
        for (int64_t j = 0; j < m; j++) {
            const float *cbj = codebooks_t + j * dsub * FAST_KSUB;
            f16v acc = {0};
            if (init) memcpy(&acc, init + j * FAST_KSUB, sizeof(acc));
            for (int64_t d = 0; d < dsub; d++) {
                f16v cb;
                memcpy(&cb, cbj + d * FAST_KSUB, sizeof(cb));
                acc += (scale * v[j * dsub + d]) * cb;
            }
            memcpy(t + j * FAST_KSUB, &acc, sizeof(acc));
        }
        return;
    }
    for (int64_t j = 0; j < m; j++) {
        float *tj = t + j * stride;
        const float *cbj = codebooks_t + j * dsub * ksub;
        int64_t c0 = 0;
        for (; c0 + PRODUCT_BLOCK <= ksub; c0 += PRODUCT_BLOCK) {
            float acc[PRODUCT_BLOCK];
            if (init) memcpy(acc, init + j * ksub + c0, sizeof(acc));
            else memset(acc, 0, sizeof(acc));
            for (int64_t d = 0; d < dsub; d++) {
                const float a = scale * v[j * dsub + d];
                const float *cb = cbj + d * ksub + c0;
                for (int c = 0; c < PRODUCT_BLOCK; c++) acc[c] += a * cb[c];
            }
            memcpy(tj + c0, acc, sizeof(acc));
        }
        if (c0 < ksub) { /* the rest (all of ksub < PRODUCT_BLOCK), summed in memory */
            const int64_t rest = ksub - c0;
            if (init) memcpy(tj + c0, init + j * ksub + c0, (size_t)rest * sizeof(float));
            else memset(tj + c0, 0, (size_t)rest * sizeof(float));
            for (int64_t d = 0; d < dsub; d++) {
                const float a = scale * v[j * dsub + d];
                const float *cb = cbj + d * ksub;
                for (int64_t c = c0; c < ksub; c++) tj[c] += a * cb[c];
            }
        }
        for (int64_t c = ksub; c < stride; c++) tj[c] = pad;
    }
}

/*
 * The l2 lookup tables split as faiss's precomputed tables do: |x_j - C_jc|^2 with x = q - c
 * is |x_j|^2 + (|C_jc|^2 + 2 c_j.C_jc) + (-2 q_j.C_jc). The list term (middle) is per list,
 * the query term (last) per query; a pair's table is their sum, and the sum of its |x_j|^2 is
 * the pair's constant. For ip the query term -q_j.C_jc is the whole table and -<q, c> the
 * constant. Impossible codes (>= ksub) get +inf, from the list term (l2) or query term (ip).
 */
void ivfpq_list_terms(int64_t n, int64_t dim, int64_t m, int64_t ksub, const float *centroids,
                      const float *codebooks_t, const float *norms, int64_t stride,
                      float *out) {
    for (int64_t i = 0; i < n; i++)
        sub_products(centroids + i * dim, 2.0f, norms, INFINITY, codebooks_t, m, dim / m, ksub,
                     stride, out + i * m * stride);
}

/* Table sums of one list's rows for one pair, offered to the query's heap. M is a
 * compile-time constant in the specialised copies, so the sum is unrolled. */
static inline __attribute__((always_inline)) void scan_rows(
        const uint8_t *base, int64_t n, int64_t stride, int64_t M, const float *t, float bias,
        const int64_t *dead, int64_t nd, int32_t rank, int64_t row0, heap_t *h, int64_t cap) {
    int64_t di = 0;
    float bound = heap_bound(h, cap);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *code = base + i * stride + ID_BYTES;
        float s;
        if (M % 4 == 0) { /* four independent sums: the adds overlap instead of chaining */
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            for (int64_t j = 0; j < M; j += 4) {
                s0 += t[j * TSTRIDE + code[j]];
                s1 += t[(j + 1) * TSTRIDE + code[j + 1]];
                s2 += t[(j + 2) * TSTRIDE + code[j + 2]];
                s3 += t[(j + 3) * TSTRIDE + code[j + 3]];
            }
            s = bias + ((s0 + s1) + (s2 + s3));
        } else {
            s = bias;
            for (int64_t j = 0; j < M; j++) s += t[j * TSTRIDE + code[j]];
        }
        if (!(s <= bound)) continue; /* also drops +inf and NaN */
        while (di < nd && dead[di] < i) di++;
        if (di < nd && dead[di] == i) continue; /* tombstoned */
        cand_t cand;
        cand.cost = s;
        cand.rank = rank;
        cand.row = row0 + i;
        memcpy(&cand.id, base + i * stride, sizeof(int64_t)); /* little-endian, maybe unaligned */
        heap_offer(h, cap, &cand);
        bound = heap_bound(h, cap);
    }
}

#define SCAN_FIXED(MV)                                                                     \
    HOT static void scan_m##MV(const uint8_t *base, int64_t n, int64_t stride, const float *t,  \
                           float bias, const int64_t *dead, int64_t nd, int32_t rank,       \
                           int64_t row0, heap_t *h, int64_t cap) {                          \
        scan_rows(base, n, stride, MV, t, bias, dead, nd, rank, row0, h, cap);             \
    }
SCAN_FIXED(4)
SCAN_FIXED(8)
SCAN_FIXED(16)
SCAN_FIXED(32)
SCAN_FIXED(64)

static void scan_any(const uint8_t *base, int64_t n, int64_t stride, int64_t m, const float *t,
                     float bias, const int64_t *dead, int64_t nd, int32_t rank, int64_t row0,
                     heap_t *h, int64_t cap) {
    switch (m) {
    case 4: scan_m4(base, n, stride, t, bias, dead, nd, rank, row0, h, cap); break;
    case 8: scan_m8(base, n, stride, t, bias, dead, nd, rank, row0, h, cap); break;
    case 16: scan_m16(base, n, stride, t, bias, dead, nd, rank, row0, h, cap); break;
    case 32: scan_m32(base, n, stride, t, bias, dead, nd, rank, row0, h, cap); break;
    case 64: scan_m64(base, n, stride, t, bias, dead, nd, rank, row0, h, cap); break;
    default: scan_rows(base, n, stride, m, t, bias, dead, nd, rank, row0, h, cap);
    }
}

/* ---- the fast scan: 4-bit codes in blocks of 32, 8-bit tables ------------------------- */


/* The largest 8-bit table entry for m sub-quantizers, so that a row's sum fits 16 bits. */
static inline int64_t lut_range(int64_t m) {
    const int64_t r = 65535 / m;
    return r < 255 ? r : 255;
}

/* Sub-quantizer rows of an 8-bit table, rounded up so that the widest shuffle (4 rows at a
 * time) reads only zero rows past m. */
static inline int64_t lut_rows(int64_t m) { return (m + 3) & ~(int64_t)3; }

/* The cost of a row whose 8-bit entries sum to s: exact in double (s < 2^16 and a float's
 * 24 bits make at most 40), rounded once, then to float; fused or not, the same bits, in C and
 * in numpy. */
static inline float fast_cost(int64_t s, float base, float inv) {
    return (float)((double)base + (double)s * (double)inv);
}


static inline __attribute__((always_inline)) f16v pick(i16v mask, f16v a, f16v b) {
    return (f16v)((mask & (i16v)a) | (~mask & (i16v)b));
}

/* The least (greatest: 0 or 1) entry of each of 16 rows, lane r for row r, by a tree that
 * halves the lanes a row keeps while doubling the rows a vector holds: 4 levels of two
 * two-vector shuffles and a compare, 45 operations for 16 rows (halving each row alone takes
 * 12 a row). */
static inline __attribute__((always_inline)) f16v extreme_rows(const f16v *rows,
                                                               const int greatest) {
    const i16v x1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const i16v x2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const i16v x3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const i16v x4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    f16v a[8];
#define KEEP(x, y) (greatest ? pick(y > x, y, x) : pick(y < x, y, x))
    for (int i = 0; i < 8; i++) { /* rows 2i, 2i + 1: 8 lanes each */
        const f16v x = __builtin_shuffle(rows[2 * i], rows[2 * i + 1], x1);
        const f16v y = __builtin_shuffle(rows[2 * i], rows[2 * i + 1], x1 + 8);
        a[i] = KEEP(x, y);
    }
#define LEVEL(X, STEP, N)                                                                  \
    for (int i = 0; i < N; i++) {                                                          \
        const f16v x = __builtin_shuffle(a[2 * i], a[2 * i + 1], X);                        \
        const f16v y = __builtin_shuffle(a[2 * i], a[2 * i + 1], X + STEP);                 \
        a[i] = KEEP(x, y);                                                                 \
    }
    LEVEL(x2, 4, 4) /* 4 rows of 4 lanes a vector */
    LEVEL(x3, 2, 2) /* 8 rows of 2 */
    LEVEL(x4, 1, 1) /* 16 rows of 1 */
#undef LEVEL
#undef KEEP
    return a[0];
}

/* Rows j0 .. j0 + 15 of a pair's float table (the last of the m rows repeated past m): the
 * list's terms plus the query's (l2), or the query's (ip: lterm NULL). */
static inline __attribute__((always_inline)) void table_rows(const float *lterm,
                                                             const float *qterm, int64_t m,
                                                             int64_t j0, f16v *rows) {
    for (int64_t r = 0; r < 16; r++) {
        const int64_t j = j0 + r < m ? j0 + r : m - 1;
        memcpy(&rows[r], qterm + j * FAST_KSUB, sizeof(f16v));
        if (lterm) {
            f16v add;
            memcpy(&add, lterm + j * FAST_KSUB, sizeof(add));
            rows[r] += add;
        }
    }
}

/*
 * A pair's 8-bit tables: row j of its float table is lterm[j] + qterm[j] (l2) or qterm[j]
 * (ip: lterm NULL), terms of 16 entries per sub-quantizer, bias its constant. Entry (j, c) is
 * trunc(min(max((t[j][c] - min_j) * a, 0), R) + 1/2), a = R / span, span the widest of the
 * rows' ranges and R = lut_range(m); rows m .. lut_rows(m) are zero. A row whose entries
 * sum to s costs fast_cost(s, base, inv) with base = bias + the rows' minima (in double,
 * row j's added in lane j % 8, then the 8 lanes in order) and inv = span / R. t is scratch
 * of m floats. Non-finite tables give costs no heap keeps.
 * Returns 1; 0 without writing lut or inv when base is above `bound`, so that no row of the
 * pair can cost at most bound (a scan's pairs that cannot enter their query's heap).
 */
HOT static int fast_tables(const float *lterm, const float *qterm, float bias, int64_t m,
                           float bound, float *t, uint8_t *lut, float *base, float *inv) {
    /* The rows' least entries (to t[0 .. m)) and base first: most pairs of a scan stop here.
     * The minima are summed in 8 lanes: one serial chain of double adds was the costliest
     * line of this function (perf annotate, the searches of python tools/bench.py
     * --dataset siftsmall --nlist 100 --m 32 --nbits 4). */
    typedef double d8v __attribute__((vector_size(8 * sizeof(double))));
    typedef float f8v __attribute__((vector_size(8 * sizeof(float))));
    d8v acc = {0};
    f16v rows[16];
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        const int64_t nr = m - j0 < 16 ? m - j0 : 16;
        table_rows(lterm, qterm, m, j0, rows);
        const f16v lo = extreme_rows(rows, 0);
        if (nr == 16) {
            f8v half[2];
            memcpy(t + j0, &lo, sizeof(lo));
            memcpy(half, &lo, sizeof(half));
            acc += __builtin_convertvector(half[0], d8v) + __builtin_convertvector(half[1], d8v);
        } else {
            for (int64_t r = 0; r < nr; r++) {
                t[j0 + r] = lo[r];
                acc[r % 8] += (double)lo[r];
            }
        }
    }
    double mins = 0.0;
    for (int i = 0; i < 8; i++) mins += acc[i];
    *base = (float)((double)bias + mins);
    if (*base > bound) return 0;
    const float range = (float)lut_range(m);
    float span = 0.0f;
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        const int64_t nr = m - j0 < 16 ? m - j0 : 16;
        table_rows(lterm, qterm, m, j0, rows);
        const f16v hi = extreme_rows(rows, 1);
        for (int64_t r = 0; r < nr; r++) {
            const float d = hi[r] - t[j0 + r];
            if (d > span || !(d == d)) span = d;
        }
    }
    const float a = span > 0.0f ? range / span : 0.0f;
    const f16v zero = {0}, top = zero + range;
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        const int64_t nr = m - j0 < 16 ? m - j0 : 16;
        table_rows(lterm, qterm, m, j0, rows);
        for (int64_t r = 0; r < nr; r++) {
            f16v v = (rows[r] - t[j0 + r]) * a;
            v = pick(v > zero, v, zero); /* NaN: 0 */
            v = pick(v < top, v, top);
            const u16v q = __builtin_convertvector(__builtin_convertvector(v + 0.5f, i16v), u16v);
            memcpy(lut + (j0 + r) * FAST_KSUB, &q, sizeof(q));
        }
    }
    memset(lut + m * FAST_KSUB, 0, (size_t)(lut_rows(m) - m) * FAST_KSUB);
    *inv = span > 0.0f ? span / range : 0.0f;
    return 1;
}

#ifdef FAST_SIMD
/* The least (greatest) entry of each of 16 rows of 16, lane r for row r: extreme_rows's tree
 * in AVX-512, its shuffles the same lanes and its picks a vminps (vmaxps), which pick as it
 * does (the second operand on a NaN or a tie), so the same bits. */
__attribute__((target("avx512f"))) static inline __m512 extreme_rows_avx512(const __m512 *rows,
                                                                           const int greatest) {
    const __m512i x1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i x2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i x3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
    const __m512i x4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    __m512 a[8];
#define KEEP(x, y) (greatest ? _mm512_max_ps((y), (x)) : _mm512_min_ps((y), (x)))
#define STEP(FROM, X, S, N)                                                                \
    for (int i = 0; i < N; i++) {                                                          \
        const __m512 x = _mm512_permutex2var_ps(FROM[2 * i], X, FROM[2 * i + 1]);          \
        const __m512 y = _mm512_permutex2var_ps(                                           \
                FROM[2 * i], _mm512_add_epi32(X, _mm512_set1_epi32(S)), FROM[2 * i + 1]);    \
        a[i] = KEEP(x, y);                                                                 \
    }
    STEP(rows, x1, 8, 8) /* rows 2i, 2i + 1: 8 lanes each */
    STEP(a, x2, 4, 4)    /* 4 rows of 4 lanes a vector */
    STEP(a, x3, 2, 2)    /* 8 rows of 2 */
    STEP(a, x4, 1, 1)    /* 16 rows of 1 */
#undef STEP
#undef KEEP
    return a[0];
}

/* Rows j0 .. j0 + 15 (all below m) of a pair's float table, as table_rows. */
__attribute__((target("avx512f"))) static inline void table_rows_avx512(const float *lterm,
                                                                       const float *qterm,
                                                                       int64_t j0, __m512 *rows) {
    for (int r = 0; r < 16; r++) {
        rows[r] = _mm512_loadu_ps(qterm + (j0 + r) * FAST_KSUB);
        if (lterm) rows[r] = _mm512_add_ps(rows[r], _mm512_loadu_ps(lterm + (j0 + r) * FAST_KSUB));
    }
}

/* fast_tables for m a multiple of 16 in AVX-512, the same operations in the same order (so
 * the same bits), with the rows held in registers where the vector-extension code keeps
 * them on the stack, and a vminps (vmaxps) for each pick: 130-150 ns a pair against 180 at
 * m=32 (a C loop of each over 1,600 pairs of random terms). */
__attribute__((target("avx512f"))) static int fast_tables_avx512(
        const float *lterm, const float *qterm, float bias, int64_t m, float bound, float *t,
        uint8_t *lut, float *base, float *inv) {
    __m512d acc = _mm512_setzero_pd();
    __m512 rows[16];
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        table_rows_avx512(lterm, qterm, j0, rows);
        const __m512 lo = extreme_rows_avx512(rows, 0);
        _mm512_storeu_ps(t + j0, lo);
        const __m512d l0 = _mm512_cvtps_pd(_mm512_castps512_ps256(lo));
        const __m512d l1 = _mm512_cvtps_pd(
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lo), 1)));
        acc = _mm512_add_pd(acc, _mm512_add_pd(l0, l1));
    }
    double lanes[8], mins = 0.0;
    _mm512_storeu_pd(lanes, acc);
    for (int i = 0; i < 8; i++) mins += lanes[i];
    *base = (float)((double)bias + mins);
    if (*base > bound) return 0;
    const float range = (float)lut_range(m);
    __m512 spans = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        table_rows_avx512(lterm, qterm, j0, rows);
        const __m512 d = _mm512_sub_ps(extreme_rows_avx512(rows, 1), _mm512_loadu_ps(t + j0));
        const __mmask16 take = _mm512_cmp_ps_mask(d, spans, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
        spans = _mm512_mask_blend_ps(take, spans, d);
    }
    float sp[16], span = 0.0f; /* the rows' order: a NaN range, once met, stays */
    _mm512_storeu_ps(sp, spans);
    for (int r = 0; r < 16; r++)
        if (sp[r] > span || !(sp[r] == sp[r])) span = sp[r];
    const float a = span > 0.0f ? range / span : 0.0f;
    const __m512 va = _mm512_set1_ps(a), zero = _mm512_setzero_ps(), top = _mm512_set1_ps(range);
    const __m512 half = _mm512_set1_ps(0.5f);
    for (int64_t j0 = 0; j0 < m; j0 += 16) {
        table_rows_avx512(lterm, qterm, j0, rows);
        for (int r = 0; r < 16; r++) {
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(rows[r], _mm512_set1_ps(t[j0 + r])), va);
            v = _mm512_min_ps(_mm512_max_ps(v, zero), top); /* NaN: 0 */
            _mm_storeu_si128((__m128i *)(lut + (j0 + r) * FAST_KSUB),
                             _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_add_ps(v, half))));
        }
    }
    *inv = span > 0.0f ? span / range : 0.0f;
    return 1;
}
#endif

/* The fast scan's pair constant: l2 |q - c|^2, ip -<q, c>, in 16 interleaved sums added
 * pairwise (its own order: the float scan's tables are not these). One function for the scan
 * and for ivfpq_fast_tables, so that the tests' tables are the scan's, bit for bit. */
HOT static float fast_bias(int l2, const float *q, const float *c, int64_t dim) {
    f16v acc = {0};
    int64_t d = 0;
    for (; d + FAST_KSUB <= dim; d += FAST_KSUB) {
        f16v a, b;
        memcpy(&a, q + d, sizeof(a));
        memcpy(&b, c + d, sizeof(b));
        if (l2) {
            const f16v e = a - b;
            acc += e * e;
        } else {
            acc -= a * b;
        }
    }
    float lanes[FAST_KSUB], rest = 0.0f;
    for (; d < dim; d++) rest += l2 ? (q[d] - c[d]) * (q[d] - c[d]) : -(q[d] * c[d]);
    memcpy(lanes, &acc, sizeof(lanes));
    for (int h = FAST_KSUB / 2; h >= 1; h /= 2)
        for (int u = 0; u < h; u++) lanes[u] += lanes[u + h];
    return lanes[0] + rest;
}

/* The largest sum s whose cost is at most bound: -1 when none is, 65535 when every one is;
 * ra = 1 / inv. Costs are rounded to float, so that many sums can share bound's cost: the
 * estimate aims at the top of the interval of values that round to bound, and is corrected
 * by stepping (a step or none, mostly), so the bound is exact: a row of sum s enters a heap
 * of that bound exactly when s <= sum_bound(bound). */
static inline int64_t sum_bound(float bound, float base, float inv, double ra) {
    if (!(base <= bound)) return -1;
    if (!(inv > 0.0f)) return 65535;
    uint32_t bits; /* the next float up from bound, finite and not NaN here */
    memcpy(&bits, &bound, 4);
    float up;
    if (bound == 0.0f) bits = 1;
    else bits += bound > 0.0f ? 1 : (uint32_t)-1;
    memcpy(&up, &bits, 4);
    const double edge = 0.5 * ((double)bound + (double)up);
    const double est = (edge - (double)base) * ra;
    int64_t s = est >= 65535.0 ? 65535 : (int64_t)est;
    while (s < 65535 && fast_cost(s + 1, base, inv) <= bound) s++;
    while (s >= 0 && !(fast_cost(s, base, inv) <= bound)) s--;
    return s;
}

static uint32_t block_sums_scalar(const uint8_t *codes, const uint8_t *lut, int64_t m,
                                  int64_t thr, uint16_t *out) {
    uint32_t acc[BLOCK_ROWS] = {0};
    for (int64_t j = 0; j < m; j++) {
        const uint8_t *cj = codes + 16 * j, *tj = lut + FAST_KSUB * j;
        for (int i = 0; i < 16; i++) {
            acc[i] += tj[cj[i] & 15];
            acc[i + 16] += tj[cj[i] >> 4];
        }
    }
    uint32_t mask = 0;
    for (int i = 0; i < BLOCK_ROWS; i++) {
        out[i] = (uint16_t)acc[i];
        mask |= (uint32_t)((int64_t)acc[i] <= thr) << i;
    }
    return mask;
}

#ifdef FAST_SIMD
/* Rows 0-7, 8-15, 16-23 and 24-31 from the even- and odd-row sums of rows 0-15 (e0, o0) and
 * 16-31 (e1, o1), compared with thr (unsigned 16-bit); stored when some row is under it. */
__attribute__((target("avx2"))) static inline uint32_t block_finish(
        __m128i e0, __m128i o0, __m128i e1, __m128i o1, int64_t thr, uint16_t *out) {
    const __m128i r0 = _mm_unpacklo_epi16(e0, o0), r1 = _mm_unpackhi_epi16(e0, o0);
    const __m128i r2 = _mm_unpacklo_epi16(e1, o1), r3 = _mm_unpackhi_epi16(e1, o1);
    const __m128i tv = _mm_set1_epi16((short)(uint16_t)thr);
#define LE(v) _mm_cmpeq_epi16(_mm_min_epu16((v), tv), (v))
    const uint32_t lo = (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(LE(r0), LE(r1)));
    const uint32_t hi = (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(LE(r2), LE(r3)));
#undef LE
    if (lo | hi) { /* most blocks have no row under the bound: nothing to store */
        _mm_storeu_si128((__m128i *)out, r0);
        _mm_storeu_si128((__m128i *)(out + 8), r1);
        _mm_storeu_si128((__m128i *)(out + 16), r2);
        _mm_storeu_si128((__m128i *)(out + 24), r3);
    }
    return lo | hi << 16;
}

/* Two sub-quantizers per step: a 32-byte load holds their codes (one per 128-bit lane), the
 * table rows beside them, and one in-lane shuffle per nibble looks up 16 rows of each. The
 * bytes are summed as 16-bit words: the odd rows' bytes shifted down, the even rows' as the
 * words' sums less the odd bytes' (every sum stays below 2^16). */
__attribute__((target("avx2"))) static uint32_t block_sums_avx2(
        const uint8_t *codes, const uint8_t *lut, int64_t m, int64_t thr, uint16_t *out) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i elo = _mm256_setzero_si256(), olo = elo, ehi = elo, ohi = elo;
    for (int64_t j = 0; j < m; j += 2) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(codes + 16 * j));
        const __m256i t = _mm256_loadu_si256((const __m256i *)(lut + FAST_KSUB * j));
        const __m256i vlo = _mm256_shuffle_epi8(t, _mm256_and_si256(c, low));
        const __m256i vhi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), low));
        elo = _mm256_add_epi16(elo, vlo);
        olo = _mm256_add_epi16(olo, _mm256_srli_epi16(vlo, 8));
        ehi = _mm256_add_epi16(ehi, vhi);
        ohi = _mm256_add_epi16(ohi, _mm256_srli_epi16(vhi, 8));
    }
    elo = _mm256_sub_epi16(elo, _mm256_slli_epi16(olo, 8));
    ehi = _mm256_sub_epi16(ehi, _mm256_slli_epi16(ohi, 8));
#define LANES2(v) _mm_add_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256((v), 1))
    return block_finish(LANES2(elo), LANES2(olo), LANES2(ehi), LANES2(ohi), thr, out);
#undef LANES2
}

/* Four sub-quantizers per step, as block_sums_avx2 does two. */
__attribute__((target("avx512bw"))) static uint32_t block_sums_avx512(
        const uint8_t *codes, const uint8_t *lut, int64_t m, int64_t thr, uint16_t *out) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512i elo = _mm512_setzero_si512(), olo = elo, ehi = elo, ohi = elo;
    for (int64_t j = 0; j < m; j += 4) {
        const __m512i c = _mm512_loadu_si512((const void *)(codes + 16 * j));
        const __m512i t = _mm512_loadu_si512((const void *)(lut + FAST_KSUB * j));
        const __m512i vlo = _mm512_shuffle_epi8(t, _mm512_and_si512(c, low));
        const __m512i vhi = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), low));
        elo = _mm512_add_epi16(elo, vlo);
        olo = _mm512_add_epi16(olo, _mm512_srli_epi16(vlo, 8));
        ehi = _mm512_add_epi16(ehi, vhi);
        ohi = _mm512_add_epi16(ohi, _mm512_srli_epi16(vhi, 8));
    }
    elo = _mm512_sub_epi16(elo, _mm512_slli_epi16(olo, 8));
    ehi = _mm512_sub_epi16(ehi, _mm512_slli_epi16(ohi, 8));
#define LANES4(v)                                                                          \
    _mm_add_epi16(                                                                         \
        _mm_add_epi16(_mm512_castsi512_si128(v), _mm512_extracti32x4_epi32((v), 1)),        \
        _mm_add_epi16(_mm512_extracti32x4_epi32((v), 2), _mm512_extracti32x4_epi32((v), 3)))
    return block_finish(LANES4(elo), LANES4(olo), LANES4(ehi), LANES4(ohi), thr, out);
#undef LANES4
}
#endif

/* The widest block sums this CPU runs, at most `limit` (0 scalar, 1 AVX2, 2 AVX-512BW):
 * ivfpq_fast_level sets the limit, for the tests that compare the three. */
static int fast_limit = 2;

static int fast_level(void) {
#ifdef FAST_SIMD
    __builtin_cpu_init();
    if (fast_limit >= 2 && __builtin_cpu_supports("avx512bw")) return 2;
    if (fast_limit >= 1 && __builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

/* The pair tables the scans use at a level of fast_level: the AVX-512 copy at level 2 for m
 * a multiple of 16 (whole chunks of rows), else the vector-extension code. */
static fast_tables_fn fast_tables_of(int level, int64_t m) {
#ifdef FAST_SIMD
    if (level == 2 && m % 16 == 0) return fast_tables_avx512;
#endif
    (void)level;
    (void)m;
    return fast_tables;
}

static block_sums_fn block_sums_of(int level) {
#ifdef FAST_SIMD
    if (level == 2) return block_sums_avx512;
    if (level == 1) return block_sums_avx2;
#endif
    (void)level;
    return block_sums_scalar;
}

/* Set the widest block sums the scans may use (limit >= 0; -1 keeps it) and return the level
 * they use on this CPU now. */
int ivfpq_fast_level(int limit) {
    if (limit >= 0) fast_limit = limit;
    return fast_level();
}

/* A segment's tail, its nt < 32 records of `stride` bytes after its blocks, packed as one
 * more block at out (bsize bytes); returns the mask of the rows it holds whose codes are all
 * possible (below 16): a damaged code is never a result. */
static uint32_t pack_tail(const uint8_t *recs, int64_t nt, int64_t stride, int64_t m,
                          uint8_t *out) {
    memset(out, 0, (size_t)(16 * m));
    uint32_t valid = 0;
    for (int64_t i = 0; i < nt; i++) {
        const uint8_t *code = recs + i * stride + ID_BYTES;
        const int lane = (int)(i & 15), shift = i >= 16 ? 4 : 0;
        uint8_t any = 0;
        for (int64_t j = 0; j < m; j++) {
            any |= code[j];
            out[16 * j + lane] |= (uint8_t)((code[j] & 15) << shift);
        }
        memcpy(out + 16 * m + ID_BYTES * i, recs + i * stride, ID_BYTES);
        if (any < FAST_KSUB) valid |= (uint32_t)1 << i;
    }
    return valid;
}

/*
 * A fast scan's tail, packed once when its list enters a table: the nt (< 32) records at
 * recs (stride bytes each: id, then m codes of one byte) as one block at out (16 * m code
 * bytes, then 32 ids, rows past nt zero), followed by the mask of its rows (uint32: row i
 * is scanned when bit i is set; a row with a code above 15 is not). out holds
 * ivfpq_tail_bytes(m). Returns 0, or -1 for nt outside 0 .. 31 (nothing written).
 */
int ivfpq_pack_tail(const uint8_t *recs, int64_t nt, int64_t stride, int64_t m, uint8_t *out) {
    if (nt < 0 || nt >= BLOCK_ROWS) return -1;
    memset(out + 16 * m, 0, (size_t)(ID_BYTES * BLOCK_ROWS));
    const uint32_t valid = pack_tail(recs, nt, stride, m, out);
    memcpy(out + 16 * m + ID_BYTES * BLOCK_ROWS, &valid, sizeof(valid));
    return 0;
}

/* The bytes of a packed tail (ivfpq_pack_tail): a block, then its mask, padded to 8. */
int64_t ivfpq_tail_bytes(int64_t m) { return 16 * m + ID_BYTES * BLOCK_ROWS + 8; }

/* The mask of the rows of segment s's packed tail (the block at rec_addr[s]; none read for
 * an empty tail). */
static inline uint32_t tail_rows(const job_t *jb, int64_t s) {
    uint32_t rows = 0;
    if (!jb->rec_count[s]) return 0;
    memcpy(&rows, (const uint8_t *)(uintptr_t)jb->rec_addr[s] + 16 * jb->m +
                      ID_BYTES * BLOCK_ROWS, sizeof(rows));
    return rows;
}

/*
 * The sums of every row of segment s for one pair, block by block, to presums ((blocks + 1)
 * * 32: the tail packed as the last block), and the largest sum a row of the pair may have
 * and still be among the best cap: the sums are counted in 256 bins that split the possible
 * sums (0 .. m * lut_range(m)), T is the top of the first run of bins that holds cap live
 * rows, and the bound is the largest sum whose cost is at most T's (a row of a higher sum
 * costs more than cap rows of the pair, so it can never enter). 65535 when the pair has
 * fewer than cap live rows.
 */
static int64_t presum_bound(const job_t *jb, block_sums_fn sums_of, const uint8_t *lut,
                            float base, float inv, int64_t s, uint16_t *presums, int64_t cap) {
    const int64_t m = jb->m, bsize = 16 * m + ID_BYTES * BLOCK_ROWS;
    const uint8_t *blk = (const uint8_t *)(uintptr_t)jb->blk_addr[s];
    const int64_t nb = jb->blk_count[s];
    const int64_t *dead = (const int64_t *)(uintptr_t)jb->dead_addr[s];
    const int64_t nd = dead ? jb->dead_count[s] : 0;
    uint32_t count[256] = {0};
    int shift = 0; /* bins of 2^shift sums */
    while ((m * lut_range(m)) >> shift >= 256) shift++;
    int64_t di = 0;
    for (int64_t b = 0; b <= nb; b++) {
        const uint32_t rows = b < nb ? ~(uint32_t)0 : tail_rows(jb, s);
        if (!rows) break;
        uint16_t *out = presums + b * BLOCK_ROWS;
        sums_of(b < nb ? blk + b * bsize : (const uint8_t *)(uintptr_t)jb->rec_addr[s], lut, m,
                65535, out); /* every row stored */
        for (int i = 0; i < BLOCK_ROWS; i++) {
            if (!(rows >> i & 1)) continue;
            const int64_t row = b * BLOCK_ROWS + i;
            while (di < nd && dead[di] < row) di++;
            if (di < nd && dead[di] == row) continue;
            count[out[i] >> shift]++;
        }
    }
    int64_t seen = 0;
    for (int top = 0; top < 256; top++) {
        seen += count[top];
        if (seen >= cap) {
            const int64_t t = ((int64_t)(top + 1) << shift) - 1;
            return sum_bound(fast_cost(t, base, inv), base, inv, 1.0 / (double)inv);
        }
    }
    return 65535;
}

/* One pair's fast scan over the segments [s0, s1) of a list: each segment's blocks, then
 * its tail as one more block (packed by ivfpq_pack_tail, at rec_addr[s]). Rows whose 16-bit
 * sum is above the heap's bound are skipped without a cost; the others are offered as the
 * ordinary scan offers them, so the result is the exact top-k of the costs. */
static void scan_fast(const job_t *jb, block_sums_fn sums_of, const uint8_t *lut, float base,
                      float inv, int64_t s0, int64_t s1, uint16_t *presums, int32_t rank,
                      heap_t *h, int64_t cap) {
    const int64_t m = jb->m, bsize = 16 * m + ID_BYTES * BLOCK_ROWS;
    const double ra = 1.0 / (double)inv;
    float bound = heap_bound(h, cap);
    int64_t thr = sum_bound(bound, base, inv, ra);
    /* A pair with no bound yet (its query's first, one segment) and a heap of at least a 32nd
     * of its rows: every block summed first, then the bound that cap of its own rows meet, so
     * that far fewer rows enter the heap (its heap would take about cap * ln(rows / cap)).
     * Measured at 1M, nprobe=16 (python tools/bench.py ... --nbits 4 --refine 4): 5-7% off
     * a refined batch (cap 40, lists of 1,000); with cap 10 the extra pass cost 7% more. */
    const int presum = bound == FLT_MAX && s1 == s0 + 1 && presums &&
                       cap * BLOCK_ROWS >= jb->blk_count[s0] * BLOCK_ROWS + jb->rec_count[s0];
    if (presum) thr = presum_bound(jb, sums_of, lut, base, inv, s0, presums, cap);
    int64_t row0 = 0;
    uint16_t block[BLOCK_ROWS];
    for (int64_t s = s0; s < s1 && thr >= 0; s++) {
        const uint8_t *blk = (const uint8_t *)(uintptr_t)jb->blk_addr[s];
        const int64_t nb = jb->blk_count[s];
        const int64_t *dead = (const int64_t *)(uintptr_t)jb->dead_addr[s];
        const int64_t nd = dead ? jb->dead_count[s] : 0;
        int64_t di = 0;
        for (int64_t b = 0; b <= nb && thr >= 0; b++) { /* block nb: the tail */
            const uint32_t rows = b < nb ? ~(uint32_t)0 : tail_rows(jb, s);
            if (!rows) break;
            const uint8_t *bp = b < nb ? blk + b * bsize
                                       : (const uint8_t *)(uintptr_t)jb->rec_addr[s];
            const uint16_t *sums = block;
            uint32_t mask = 0;
            if (presum) {
                sums = presums + b * BLOCK_ROWS;
                for (int i = 0; i < BLOCK_ROWS; i++) mask |= (uint32_t)(sums[i] <= thr) << i;
                mask &= rows;
            } else {
                mask = sums_of(bp, lut, m, thr, block) & rows;
            }
            const float was = bound;
            while (mask) {
                const int i = __builtin_ctz(mask);
                mask &= mask - 1;
                const int64_t row = b * BLOCK_ROWS + i;
                while (di < nd && dead[di] < row) di++;
                if (di < nd && dead[di] == row) continue; /* tombstoned */
                cand_t cand;
                cand.cost = fast_cost(sums[i], base, inv);
                if (!(cand.cost <= bound)) continue;
                cand.rank = rank;
                cand.row = row0 + row;
                memcpy(&cand.id, bp + 16 * m + ID_BYTES * i, sizeof(int64_t));
                heap_offer(h, cap, &cand);
                bound = heap_bound(h, cap); /* the block's later rows are held to it by cost */
            }
            if (bound != was) thr = sum_bound(bound, base, inv, ra); /* once a block */
        }
        row0 += nb * BLOCK_ROWS + jb->rec_count[s];
    }
}

/* A pair's l2 table: the list's terms plus the query's. */
HOT static void add_terms(const float *a, const float *b, int64_t n, float *out) {
    for (int64_t e = 0; e < n; e++) out[e] = a[e] + b[e];
}

/* First phase: the query terms of queries [b0, b1). */
static void *query_phase(void *arg) {
    worker_t *w = (worker_t *)arg;
    const job_t *jb = w->job;
    const int64_t size = jb->m * jb->tstride;
    for (int64_t q = w->b0; q < w->b1; q++)
        sub_products(jb->queries + q * jb->dim, jb->l2 ? -2.0f : -1.0f, NULL,
                     jb->l2 ? 0.0f : INFINITY, jb->codebooks_t, jb->m, jb->dsub, jb->ksub,
                     jb->tstride, jb->query_terms + q * size);
    return NULL;
}

/* The segments of list entry l: [*s0, *s1). Without seg_start, entry l is segment l. */
static inline void entry_segments(const job_t *jb, int64_t l, int64_t *s0, int64_t *s1) {
    *s0 = jb->seg_start ? jb->seg_start[l] : l;
    *s1 = jb->seg_start ? jb->seg_start[l + 1] : l + 1;
}

/* The rows of segment s: its records, and in the fast scan its blocks' rows before them. */
static inline int64_t segment_rows(const job_t *jb, int64_t s) {
    return jb->rec_count[s] + (jb->blk_addr ? BLOCK_ROWS * jb->blk_count[s] : 0);
}

/* Is pair p in pass `pass` of the list phase: a query's first pair (its best-ranked list) in
 * pass 0, its others in pass 1? */
static inline int in_pass(const job_t *jb, int64_t p, int pass) {
    return (jb->pair_rank[p] == jb->first_rank[jb->pair_q[p]]) == (pass == 0);
}

/* Does the worker's list phase take pair p: of its queries, in its pass? */
static inline int takes(const worker_t *w, int64_t p) {
    const int64_t q = w->job->pair_q[p];
    return q >= w->q0 && q < w->q1 && in_pass(w->job, p, w->pass);
}

/* Second phase, in two passes: the pairs of lists [b0, b1) in pass w->pass, list by list (its
 * codes stay in cache). A pair's table is built once and scanned over each of the list's
 * segments in turn, whose rows are numbered on from the previous segment's. */
static void *list_phase(void *arg) {
    worker_t *w = (worker_t *)arg;
    const job_t *jb = w->job;
    const int64_t dim = jb->dim, size = jb->m * jb->tstride;
    for (int64_t l = w->b0; l < w->b1; l++) {
        const int64_t p1 = jb->pair_start[l + 1];
        int64_t p0 = jb->pair_start[l];
        while (p0 < p1 && !takes(w, p0)) p0++;
        if (p0 == p1) continue;
        int64_t s0, s1;
        entry_segments(jb, l, &s0, &s1);
        const float *cent = jb->centroids + jb->list_no[l] * dim;
        const float *lterm = NULL;
        if (jb->l2 && jb->list_terms) {
            lterm = jb->list_terms + jb->list_no[l] * size;
        } else if (jb->l2) {
            sub_products(cent, 2.0f, jb->norms, INFINITY, jb->codebooks_t, jb->m, jb->dsub,
                         jb->ksub, jb->tstride, w->lterm);
            lterm = w->lterm;
        }
        for (int64_t p = p0; p < p1; p++) {
            if (!takes(w, p)) continue;
            const int64_t q = jb->pair_q[p];
            const float *qv = jb->queries + q * dim;
            const float *qterm = jb->query_terms + q * size;
            const float *t = qterm;
            float bias = 0.0f;
            if (jb->blk_addr) { /* the fast scan: 8-bit tables over blocks and tails */
                /* A pair whose least cost is above its query's bound stops at its base: with
                 * its best-ranked list scanned first, most of a query's pairs do. */
                float base, inv;
                if (w->tables(lterm, qterm, fast_bias(jb->l2, qv, cent, dim), jb->m,
                                heap_bound(&w->heaps[q], jb->cap), w->table, w->lut, &base,
                                &inv))
                    scan_fast(jb, w->sums, w->lut, base, inv, s0, s1, w->presums,
                              jb->pair_rank[p], &w->heaps[q], jb->cap);
                continue;
            }
            if (jb->l2) {
                for (int64_t d = 0; d < dim; d++) bias += (qv[d] - cent[d]) * (qv[d] - cent[d]);
                add_terms(lterm, qterm, size, w->table);
                t = w->table;
            } else {
                for (int64_t d = 0; d < dim; d++) bias -= qv[d] * cent[d];
            }
            int64_t row0 = 0;
            for (int64_t s = s0; s < s1; s++) {
                const uint8_t *base = (const uint8_t *)(uintptr_t)jb->rec_addr[s];
                const int64_t *dead = (const int64_t *)(uintptr_t)jb->dead_addr[s];
                scan_any(base, jb->rec_count[s], jb->stride, jb->m, t, bias, dead,
                         dead ? jb->dead_count[s] : 0, jb->pair_rank[p], row0, &w->heaps[q],
                         jb->cap);
                row0 += jb->rec_count[s];
            }
        }
    }
    return NULL;
}

/* Work of one pair of list entry l: its table's sums and its rows' scan, plus the list's
 * terms if computed here. */
static double pair_work(const job_t *jb, int64_t l) {
    int64_t s0, s1, rows = 0;
    entry_segments(jb, l, &s0, &s1);
    /* a block of 32 rows costs about as much as 32 table entries (ivfpq_fast_tables) */
    for (int64_t s = s0; s < s1; s++) rows += segment_rows(jb, s);
    return (double)(rows + jb->m * (jb->blk_addr ? FAST_KSUB : TSTRIDE / 8));
}

/* Work of a list in a pass: its pairs'. */
static double list_work(const job_t *jb, int64_t l, int pass) {
    int64_t pairs = 0;
    for (int64_t p = jb->pair_start[l]; p < jb->pair_start[l + 1]; p++)
        pairs += in_pass(jb, p, pass);
    return pairs ? (double)pairs * pair_work(jb, l) : 0.0;
}

/* After the first pass: a full heap of a query bounds its later pairs, on every thread. Their
 * candidates come after its worst on a tie of cost (a worse rank), so only a lower cost
 * counts. For queries [q0, q1). */
static void set_limits(const worker_t *ws, int nthreads, int64_t q0, int64_t q1, int64_t cap) {
    for (int64_t q = q0; q < q1; q++) {
        float limit = FLT_MAX;
        for (int t = 0; t < nthreads; t++)
            if (ws[t].heaps[q].n == cap && ws[t].heaps[q].c[0].cost < limit)
                limit = nextafterf(ws[t].heaps[q].c[0].cost, -INFINITY);
        for (int t = 0; t < nthreads; t++) ws[t].heaps[q].limit = limit;
    }
}

/* The slots of a refine frame (int64; a pointer slot holds an address): what makes a scan
 * re-rank its results exactly against the stored vectors (docs/format.md, vector files).
 * R_QUERIES: the queries as given (nq, dim) float32, not rotated. R_ADDR, R_COUNT: per
 * segment (S,) (search_one: per list number, with R_KNOWN (nlist,) uint8 saying which are
 * filled), the address of its first stored-vector row and how many rows it commits; a row
 * is R_SIZE bytes, dim values (float32, float16 when R_HALF) and the u32 CRC-32 of the
 * record's id and values (with R_KNOWN, R_SIZE 0: no list's rows are known yet). R_KOUT 0:
 * each result's exact cost to R_OUT_COST (nq, k) in its place (+inf where there is none);
 * else the best R_KOUT of a query's results by exact cost (equal costs in the scan's order;
 * NaN after all) to R_OUT_COST and R_OUT_ID (nq, kout), id -1 where the cost is not finite.
 * R_BAD: written -1, or the first result q * k + i whose row is bad; R_BAD_KIND then says
 * why: 1 its row is past its segment's rows, 2 it fails its checksum (the outputs are then
 * not all written). */
enum {
    R_QUERIES, R_ADDR, R_COUNT, R_KNOWN, R_SIZE, R_HALF, R_KOUT, R_OUT_COST, R_OUT_ID, R_BAD,
    R_BAD_KIND, R_SLOTS
};
#define BAD_ROW 1
#define BAD_SUM 2

/* Defined with the rest of refine, below. */
static void crc_ready(void);
static int checked_cost(const uint8_t *row, int64_t nbytes, int64_t id, const float *q,
                        int64_t dim, int half, int l2, float *cost);
static void prefetch_row(const uint8_t *row, int64_t nbytes);
/* Candidates ahead whose rows are prefetched (prefetch_row). */
#define REFINE_AHEAD 8

/* An exact cost as a key that orders as the costs do, with -0 as +0 and every NaN after
 * +inf: the results' order is then by key, then by place. */
static inline uint32_t exact_key(float v) {
    uint32_t b;
    if (v != v) return UINT32_MAX;
    if (v == 0.0f) v = 0.0f; /* -0: +0 */
    memcpy(&b, &v, 4);
    return b & 0x80000000u ? ~b : b | 0x80000000u;
}

/* Is exact result i before j (keys key)? By key, then by place. */
static inline int exact_before(const uint32_t *key, int32_t i, int32_t j) {
    return key[i] < key[j] || (key[i] == key[j] && i < j);
}

/* The places [0, n) ordered by exact_before, into idx (tmp: n more), merged bottom up. */
static void sort_exact(const uint32_t *key, int32_t *idx, int32_t *tmp, int64_t n) {
    for (int64_t i = 0; i < n; i++) idx[i] = (int32_t)i;
    for (int64_t w = 1; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            const int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int64_t a = lo, b = mid, o = lo;
            while (a < mid && b < hi)
                tmp[o++] = exact_before(key, idx[b], idx[a]) ? idx[b++] : idx[a++];
            while (a < mid) tmp[o++] = idx[a++];
            while (b < hi) tmp[o++] = idx[b++];
        }
        memcpy(idx, tmp, (size_t)n * sizeof(int32_t));
    }
}

/* Refine the merged results of queries [b0, b1) (the refine frame's contract): each found
 * result's stored-vector row located from its list entry and row, read in order with the
 * rows REFINE_AHEAD on prefetched, checked and scored; then each query's best kout. */
static void refine_results(worker_t *w) {
    const job_t *jb = w->job;
    const int64_t *rf = jb->refine, k = jb->k, dim = jb->dim, kout = rf[R_KOUT];
    const uint64_t *vaddr = (const uint64_t *)(uintptr_t)rf[R_ADDR];
    const int64_t *vcount = (const int64_t *)(uintptr_t)rf[R_COUNT];
    const float *raw = (const float *)(uintptr_t)rf[R_QUERIES];
    const int64_t size = rf[R_SIZE], nbytes = size - 4, n = (w->b1 - w->b0) * k;
    const int half = (int)rf[R_HALF];
    const int64_t f0 = w->b0 * k; /* results f0 + c, c < n: query q's i-th is q * k + i */
    for (int64_t q = w->b0, c = 0; q < w->b1; q++) { /* no division by k a result */
        for (int64_t i = 0; i < k; i++, c++) { /* where its row is: 0 none, 1 past its rows */
            const int64_t f = f0 + c;
            w->raddr[c] = 0;
            if (jb->out_rank[f] < 0) continue;
            int64_t s0, s1, row = jb->out_row[f];
            entry_segments(jb, jb->entry_of[q * jb->nrank + jb->out_rank[f]], &s0, &s1);
            int64_t s = s0;
            for (; s < s1 && row >= segment_rows(jb, s); s++) /* rows count on from one segment */
                row -= segment_rows(jb, s);
            w->raddr[c] = s < s1 && row < vcount[s] ? vaddr[s] + (uint64_t)row * (uint64_t)size
                                                    : 1;
        }
    }
    for (int64_t q = w->b0, c = 0; q < w->b1; q++) {
        for (int64_t i = 0; i < k; i++, c++) {
            if (c + REFINE_AHEAD < n && w->raddr[c + REFINE_AHEAD] > 1)
                prefetch_row((const uint8_t *)(uintptr_t)w->raddr[c + REFINE_AHEAD], nbytes);
            const int64_t f = f0 + c;
            w->rcost[c] = INFINITY;
            if (!w->raddr[c]) continue;
            if (w->raddr[c] == 1) {
                w->bad = f;
                w->bad_kind = BAD_ROW;
                return;
            }
            if (checked_cost((const uint8_t *)(uintptr_t)w->raddr[c], nbytes, jb->out_id[f],
                             raw + q * dim, dim, half, jb->l2, &w->rcost[c])) {
                w->bad = f;
                w->bad_kind = BAD_SUM;
                return;
            }
        }
    }
    float *out_cost = (float *)(uintptr_t)rf[R_OUT_COST];
    int64_t *out_id = (int64_t *)(uintptr_t)rf[R_OUT_ID];
    if (!kout) {
        memcpy(out_cost + f0, w->rcost, (size_t)n * sizeof(float));
        return;
    }
    /* the merge is done with its scratch: idx, tmp and key, k each */
    int32_t *idx = (int32_t *)w->merge, *tmp = idx + k;
    uint32_t *key = (uint32_t *)(tmp + k);
    for (int64_t q = w->b0; q < w->b1; q++) {
        const float *e = w->rcost + (q - w->b0) * k;
        int64_t kept = 0;
        for (int64_t i = 0; i < k; i++) key[i] = exact_key(e[i]);
        if (kout <= 32) { /* the best kout by insertion: most results lose to the worst kept.
                             Result i comes after every kept one of its key (a lower place),
                             so one compare of keys places it: 280 to 80 ns a query of 40
                             results, kout 10 (a C loop over 50 queries of random costs) */
            for (int64_t i = 0; i < k; i++) {
                const uint32_t ki = key[i];
                if (kept == kout && ki >= key[idx[kept - 1]]) continue;
                int64_t at = kept < kout ? kept++ : kout - 1;
                while (at > 0 && ki < key[idx[at - 1]]) {
                    idx[at] = idx[at - 1];
                    at--;
                }
                idx[at] = (int32_t)i;
            }
        } else {
            sort_exact(key, idx, tmp, k);
            kept = kout < k ? kout : k;
        }
        for (int64_t j = 0; j < kout; j++) {
            const int found = j < kept;
            const float cost = found ? e[idx[j]] : INFINITY;
            out_cost[q * kout + j] = cost;
            out_id[q * kout + j] = found && isfinite(cost) ? jb->out_id[q * k + idx[j]] : -1;
        }
    }
}

/* For each of the 16 costs mine[0 .. 16): how many of cost[0 .. n) are below it, to below,
 * and how many equal it, to same. Each cost is held against all 16 at once, without
 * branches and without a sum across lanes. */
HOT static void costs_below(const float *cost, int64_t n, const float *mine, int32_t *below,
                            int32_t *same) {
    f16v at;
    memcpy(&at, mine, sizeof(at));
    i16v lt = {0}, eq = {0};
    for (int64_t j = 0; j < n; j++) {
        const f16v v = (f16v){0} + cost[j];
        lt -= v < at;
        eq -= v == at;
    }
    memcpy(below, &lt, sizeof(lt));
    memcpy(same, &eq, sizeof(eq));
}

/* How many of candidates c[0 .. n) of cost[i]'s cost come before c[i] by (rank, row): the
 * equal costs found 16 at a time (cost padded to whole vectors; no lane past n counts). */
HOT static int64_t ties_before(const float *cost, const cand_t *c, int64_t n, int64_t i) {
    const f16v mine = (f16v){0} + cost[i];
    int64_t at = 0;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        f16v v;
        memcpy(&v, cost + j0, sizeof(v));
        const i16v eq = v == mine;
        uint32_t bits = 0;
        for (int u = 0; u < 16; u++) bits |= (uint32_t)(eq[u] & 1) << u;
        while (bits) {
            const int64_t j = j0 + __builtin_ctz(bits);
            bits &= bits - 1;
            at += j < n && j != i && after(&c[i], &c[j]);
        }
    }
    return at;
}

/* Last phase: the best k of queries [b0, b1) from every thread's heap, by (cost, rank, row),
 * then refined when the scan has a refine frame. */
static void *merge_phase(void *arg) {
    worker_t *w = (worker_t *)arg;
    const job_t *jb = w->job;
    const int64_t k = jb->k;
    const cand_t *c = w->merge;
    float *cost = (float *)(w->merge + (size_t)w->nall * (size_t)jb->cap);
    for (int64_t q = w->b0; q < w->b1; q++) {
        int64_t n = 0;
        for (int t = 0; t < w->nall; t++) {
            const heap_t *h = &w->all[t].heaps[q];
            memcpy(w->merge + n, h->c, (size_t)h->n * sizeof(cand_t));
            n += h->n;
        }
        /* Each candidate's place among them all is how many come before it: the costs below
         * its own, counted for 16 candidates at a time, and among equal costs (rare) those
         * before it by (rank, row). No compare branches, where a heap's pops mispredict about
         * half of theirs: a SIFT10K batch at k=40 went from 0.65-0.68 to 0.56-0.61 ms (best
         * of 300 of Store.search, two builds alternated three times). The costs are padded
         * to whole vectors (+inf), whose lanes past n are read but never counted. */
        const int64_t padded = (n + 15) & ~(int64_t)15;
        for (int64_t i = 0; i < n; i++) cost[i] = c[i].cost;
        for (int64_t i = n; i < padded; i++) cost[i] = INFINITY;
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            int32_t below[16], same[16];
            costs_below(cost, n, cost + i0, below, same);
            for (int64_t i = i0; i < n && i < i0 + 16; i++) {
                int64_t at = below[i - i0];
                if (same[i - i0] > 1) /* others of its cost: those before it by (rank, row) */
                    at += ties_before(cost, c, n, i);
                if (at >= k) continue;
                jb->out_cost[q * k + at] = c[i].cost;
                jb->out_id[q * k + at] = c[i].id;
                jb->out_rank[q * k + at] = c[i].rank;
                jb->out_row[q * k + at] = c[i].row;
            }
        }
    }
    if (jb->refine) refine_results(w);
    return NULL;
}

/* Every phase of the queries [q0, q1) over every list, one after another: their terms, the
 * list phase's two passes, then their merge. No other thread holds a heap of these queries,
 * so none waits for another between the phases. */
static void *batch_phase(void *arg) {
    worker_t *w = (worker_t *)arg;
    w->b0 = w->q0;
    w->b1 = w->q1;
    query_phase(w);
    for (int pass = 0; pass < 2; pass++) {
        w->b0 = 0;
        w->b1 = w->job->nlists;
        w->pass = pass;
        list_phase(w);
        if (pass == 0) set_limits(w->all, w->nall, w->q0, w->q1, w->job->cap);
    }
    w->b0 = w->q0;
    w->b1 = w->q1;
    return merge_phase(w);
}

/*
 * Scan L lists for the (query, list) pairs grouped by list, and write each query's best k
 * (cost, id) to out_cost, out_id (nq, k), best first, and where each is: the probe rank of its
 * list for the query to out_rank and its row in the list to out_row (nq, k). They must come
 * filled with +inf, -1, -1 and -1, which stay where a query has fewer than k candidates.
 * Each heap holds at most cap <= k candidates. list_terms (l2 only) may be NULL: each list's
 * terms are then computed when it is scanned. The queries (at least two a thread), or else
 * the lists, are split into nthreads contiguous runs of about equal work. refine, when not
 * NULL, is a refine frame (R_* slots, per segment): the results are then also re-ranked
 * exactly, as the frame's contract says.
 *
 * A list's records are one segment (seg_start NULL: rec_addr .. dead_count are (L,)) or
 * several (segments seg_start[l] .. seg_start[l+1] of the (S,) arrays: the same list of
 * several stores with one quantizer, scanned with each pair's table built once); a row is
 * numbered within its list's segments taken one after another.
 * Returns 0, or -1 when memory could not be had (nothing is written then).
 */
int ivfpq_scan(int64_t nq, int64_t dim, int64_t m, int64_t ksub, int l2,
               const float *queries, const float *centroids, const float *codebooks_t,
               const float *norms, const float *list_terms, int64_t nlists,
               const int64_t *list_no, const int64_t *seg_start, const uint64_t *rec_addr,
               const int64_t *rec_count, int64_t stride, const uint64_t *dead_addr,
               const int64_t *dead_count, const uint64_t *blk_addr, const int64_t *blk_count,
               const int64_t *pair_start, const int64_t *pair_q,
               const int32_t *pair_rank, int64_t k, int64_t cap, int nthreads,
               float *out_cost, int64_t *out_id, int32_t *out_rank, int64_t *out_row,
               int64_t *refine) {
    job_t jb = {nq, dim, m, ksub, dim / m, stride, cap, l2, queries, centroids, codebooks_t,
                norms, list_terms, list_no, seg_start, rec_addr, rec_count, dead_addr,
                dead_count, pair_start, pair_q, pair_rank, NULL, NULL, blk_addr, blk_count,
                blk_addr ? FAST_KSUB : TSTRIDE, k, out_cost, out_id, out_rank, out_row, refine,
                NULL, 0};
    if (blk_addr && ksub != FAST_KSUB) return -2;
    if (nthreads < 1) nthreads = 1;
    /* split by queries or by lists (below); by lists, a thread without a list only costs
     * heaps */
    const int by_query = nq >= 2 * (int64_t)nthreads;
    if (!by_query && nthreads > nlists) nthreads = nlists < 1 ? 1 : (int)nlists;
    const int64_t size = m * jb.tstride;
    int64_t maxblk = 0; /* the most blocks of a segment: scratch for a pair's every sum */
    for (int64_t g = 0; blk_addr && g < (seg_start ? seg_start[nlists] : nlists); g++)
        if (blk_count[g] > maxblk) maxblk = blk_count[g];
    const size_t presum_rows = blk_addr ? (size_t)(maxblk + 1) * BLOCK_ROWS : 0;
    /* a merge's candidates and their costs (padded to 16), or refine's order of a query's k
     * results (three times k int32) */
    size_t merge_size = (size_t)nthreads * (size_t)cap * sizeof(cand_t) +
                        ((size_t)nthreads * (size_t)cap + 16) * sizeof(float);
    if (refine && merge_size < 3 * (size_t)k * sizeof(int32_t))
        merge_size = 3 * (size_t)k * sizeof(int32_t);
    merge_size = (merge_size + sizeof(cand_t) - 1) / sizeof(cand_t); /* in candidates */
    int64_t nrank = 0;
    for (int64_t p = 0; refine && p < pair_start[nlists]; p++)
        if (pair_rank[p] >= nrank) nrank = (int64_t)pair_rank[p] + 1;
    const size_t nres = refine ? (size_t)nq * (size_t)k : 0, nt = (size_t)nthreads;
    enum { P_WS, P_TIDS, P_POOL, P_HEAPS, P_TABLES, P_LUTS, P_PRESUMS,
           P_QTERMS, P_MERGE, P_FIRST, P_ENTRY, P_RADDR, P_RCOST, P_QWORK, P_PARTS };
    const size_t part[P_PARTS] = {
        nt * sizeof(worker_t), nt * sizeof(pthread_t),
        nt * (size_t)nq * (size_t)cap * sizeof(cand_t), nt * (size_t)nq * sizeof(heap_t),
        nt * (size_t)(2 * size) * sizeof(float), nt * (size_t)(lut_rows(m) * FAST_KSUB),
        nt * presum_rows * sizeof(uint16_t), (size_t)nq * (size_t)size * sizeof(float),
        nt * merge_size * sizeof(cand_t), (size_t)nq * sizeof(int32_t),
        (size_t)nq * (size_t)nrank * sizeof(int32_t), nres * sizeof(uint64_t),
        nres * sizeof(float), (size_t)nq * sizeof(double)};
    size_t at[P_PARTS], have = 0;
    char *block = scratch_take(lay_out(part, at, P_PARTS), &have);
    if (!block) return -1;
    worker_t *ws = (worker_t *)(block + at[P_WS]);
    pthread_t *tids = (pthread_t *)(block + at[P_TIDS]);
    cand_t *pool = (cand_t *)(block + at[P_POOL]);
    heap_t *heaps = (heap_t *)(block + at[P_HEAPS]);
    float *scratch = (float *)(block + at[P_TABLES]);
    uint8_t *luts = (uint8_t *)block + at[P_LUTS];
    uint16_t *presums = (uint16_t *)(block + at[P_PRESUMS]);
    float *qterms = (float *)(block + at[P_QTERMS]);
    cand_t *merge = (cand_t *)(block + at[P_MERGE]);
    int32_t *first = (int32_t *)(block + at[P_FIRST]);
    int32_t *entry_of = (int32_t *)(block + at[P_ENTRY]);
    uint64_t *raddr = (uint64_t *)(block + at[P_RADDR]);
    float *rcost = (float *)(block + at[P_RCOST]);
    double *qwork = (double *)(block + at[P_QWORK]);
    memset(ws, 0, part[P_WS]);
    memset(heaps, 0, part[P_HEAPS]);
    const int level = fast_level();
    const block_sums_fn sums = block_sums_of(level);
    const fast_tables_fn tables = fast_tables_of(level, m);
    if (refine) {
        crc_ready();
        jb.entry_of = entry_of;
        jb.nrank = nrank;
        for (size_t e = 0; e < (size_t)nq * (size_t)nrank; e++) entry_of[e] = -1;
        for (int64_t l = 0; l < nlists; l++)
            for (int64_t p = pair_start[l]; p < pair_start[l + 1]; p++)
                entry_of[pair_q[p] * nrank + pair_rank[p]] = (int32_t)l;
        refine[R_BAD] = -1;
        refine[R_BAD_KIND] = 0;
    }
    jb.query_terms = qterms;
    jb.nlists = nlists;
    jb.first_rank = first;
    for (int64_t q = 0; q < nq; q++) first[q] = INT32_MAX;
    for (int64_t p = 0; p < pair_start[nlists]; p++)
        if (pair_rank[p] < first[pair_q[p]]) first[pair_q[p]] = pair_rank[p];

    for (int t = 0; t < nthreads; t++) {
        worker_t *w = &ws[t];
        w->job = &jb;
        w->heaps = heaps + (size_t)t * (size_t)nq;
        for (int64_t q = 0; q < nq; q++) {
            w->heaps[q].c = pool + ((size_t)t * (size_t)nq + (size_t)q) * (size_t)cap;
            w->heaps[q].limit = FLT_MAX;
        }
        w->table = scratch + (size_t)t * (size_t)(2 * size);
        w->lterm = w->table + size;
        w->lut = luts + (size_t)t * (size_t)(lut_rows(m) * FAST_KSUB);
        w->sums = sums;
        w->tables = tables;
        w->presums = blk_addr ? presums + (size_t)t * presum_rows : NULL;
        w->b0 = nq * t / nthreads;
        w->b1 = nq * (t + 1) / nthreads;
    }
    /* The list phase takes each query's best-ranked list first: its best cap bound every
     * other list's rows (most of a query's best are in its nearest lists), so that far fewer
     * enter a heap. A batch of at least two queries a thread is split into runs of queries
     * of about equal work, each run scanned over every list on one thread, every phase in
     * one go (batch_phase): a query then has one heap, not one on each thread, and the
     * threads wait for each other once. Fewer queries are split by lists, phase by phase. */
    int nmerge = nthreads;
    if (by_query) {
        double total = 0.0, acc = 0.0;
        for (int64_t q = 0; q < nq; q++) qwork[q] = 0.0;
        for (int64_t l = 0; l < nlists; l++) {
            const double each = pair_work(&jb, l);
            for (int64_t p = pair_start[l]; p < pair_start[l + 1]; p++) qwork[pair_q[p]] += each;
        }
        for (int64_t q = 0; q < nq; q++) total += qwork[q];
        int64_t q = 0;
        for (int t = 0; t < nthreads; t++) {
            const double goal = total * (double)(t + 1) / (double)nthreads;
            ws[t].q0 = q;
            while (q < nq && (t == nthreads - 1 || acc < goal)) acc += qwork[q++];
            ws[t].q1 = q;
        }
    } else {
        run_parallel(nthreads, ws, sizeof(worker_t), tids, query_phase); /* cannot fail */
        for (int pass = 0; pass < 2; pass++) {
            double total = 0.0;
            for (int64_t l = 0; l < nlists; l++) total += list_work(&jb, l, pass);
            int64_t l = 0;
            double acc = 0.0;
            for (int t = 0; t < nthreads; t++) {
                const double goal = total * (double)(t + 1) / (double)nthreads;
                ws[t].b0 = l;
                ws[t].pass = pass;
                ws[t].q0 = 0;
                ws[t].q1 = nq;
                while (l < nlists && (t == nthreads - 1 || acc < goal))
                    acc += list_work(&jb, l++, pass);
                ws[t].b1 = l;
            }
            run_parallel(nthreads, ws, sizeof(worker_t), tids, list_phase);
            if (pass == 0) set_limits(ws, nthreads, 0, nq, cap);
        }
        nmerge = nq < nthreads ? (int)nq : nthreads; /* at most one thread a query */
    }
    /* The merge (and refine): each thread a run of queries, its own when split by queries. */
    for (int t = 0; t < nmerge; t++) {
        worker_t *w = &ws[t];
        w->all = ws;
        w->nall = nthreads;
        w->merge = merge + (size_t)t * merge_size;
        w->b0 = by_query ? w->q0 : nq * t / nmerge;
        w->b1 = by_query ? w->q1 : nq * (t + 1) / nmerge;
        w->raddr = raddr + (size_t)w->b0 * (size_t)k;
        w->rcost = rcost + (size_t)w->b0 * (size_t)k;
        w->bad = -1;
    }
    if (by_query)
        run_parallel(nthreads, ws, sizeof(worker_t), tids, batch_phase);
    else if (nmerge > 0)
        run_parallel(nmerge, ws, sizeof(worker_t), tids, merge_phase);
    for (int t = 0; refine && t < nmerge; t++)
        if (ws[t].bad >= 0) { /* the first bad result: threads hold runs of queries in order */
            refine[R_BAD] = ws[t].bad;
            refine[R_BAD_KIND] = ws[t].bad_kind;
            break;
        }
    scratch_give(block, have);
    return 0;
}

/* The fast scan's 8-bit tables of P (query, list) pairs, as ivfpq_scan builds them: queries
 * (P, dim) one per pair, pair_list (P,); out_lut (P, m, 16), out_base and out_inv (P,). For
 * the tests, which score with them in numpy. Returns 0, or -1 without memory. */
int ivfpq_fast_tables(int64_t npairs, int64_t dim, int64_t m, int l2, const float *queries,
                      const int64_t *pair_list, const float *centroids,
                      const float *codebooks_t, const float *norms, const float *list_terms,
                      uint8_t *out_lut, float *out_base, float *out_inv) {
    const int64_t size = m * FAST_KSUB, dsub = dim / m;
    float *buf = malloc((size_t)(3 * size) * sizeof(float));
    uint8_t *lut = malloc((size_t)(lut_rows(m) * FAST_KSUB));
    if (!buf || !lut) {
        free(buf);
        free(lut);
        return -1;
    }
    float *qterm = buf, *lterm = buf + size, *table = buf + 2 * size;
    const fast_tables_fn tables = fast_tables_of(fast_level(), m);
    for (int64_t p = 0; p < npairs; p++) {
        const float *qv = queries + p * dim, *cent = centroids + pair_list[p] * dim;
        sub_products(qv, l2 ? -2.0f : -1.0f, NULL, l2 ? 0.0f : INFINITY, codebooks_t, m, dsub,
                     FAST_KSUB, FAST_KSUB, qterm);
        const float *lt = NULL;
        if (l2 && list_terms) {
            lt = list_terms + pair_list[p] * size;
        } else if (l2) {
            sub_products(cent, 2.0f, norms, INFINITY, codebooks_t, m, dsub, FAST_KSUB,
                         FAST_KSUB, lterm);
            lt = lterm;
        }
        tables(lt, qterm, fast_bias(l2, qv, cent, dim), m, INFINITY, table, lut,
                    out_base + p, out_inv + p);
        memcpy(out_lut + p * m * FAST_KSUB, lut, (size_t)(m * FAST_KSUB));
    }
    free(buf);
    free(lut);
    return 0;
}

/* ---- coarse probe --------------------------------------------------------------------- */

typedef struct {
    int64_t q0, q1, dim, nlist, nprobe;
    int l2;
    const float *queries, *matrix;
    float *scores; /* (PROBE_BLOCK, nlist) scratch */
    float *out_cost;
    int64_t *out_list;
} probe_t;

/* Queries scored together: each row of the matrix is read once for all of them. */
#define PROBE_BLOCK 8

typedef struct {
    float cost;
    int64_t list;
} scored_t;

static int cmp_scored(const void *a, const void *b) {
    const scored_t *x = (const scored_t *)a, *y = (const scored_t *)b;
    if (x->cost != y->cost) return x->cost < y->cost ? -1 : 1;
    return x->list < y->list ? -1 : (x->list > y->list);
}

/* v into least[0 .. nl), the at most cap least values so far, ascending; returns their
 * number now. */
static inline int64_t keep_least(float *least, int64_t nl, int64_t cap, float v) {
    if (nl == cap && !(v < least[nl - 1])) return nl;
    int64_t i = nl < cap ? nl++ : nl - 1;
    while (i > 0 && v < least[i - 1]) {
        least[i] = least[i - 1];
        i--;
    }
    least[i] = v;
    return nl;
}

/* The nprobe best (cost, list) of one row of scores, by (cost, list), best first. Small
 * nprobe: insertion into a sorted run of the scores up to a bound (most fail one compare,
 * most runs of 16 one vector compare); large: a full sort. The bound is the nprobe-th least
 * of the least scores of the row's runs of 16 (nprobe scores are at most it, so the nprobe
 * best are too), or of 8 or 4 when there are fewer than nprobe runs of 16 (at nlist=100,
 * nprobe=16, 630 to 450 ns a query: C loop of 100 random rows, best of 2,000), +inf when
 * the row has fewer than nprobe runs of 4. NaN ranks last, as +inf. */
HOT static void best_lists(const float *row, int64_t nlist, int64_t nprobe, float add,
                           scored_t *tmp, float *out_cost, int64_t *out_list) {
    int64_t n = 0;
    if (nprobe <= 64) {
        float bound = INFINITY;
        float least[64] = {0}; /* the nprobe least run minima so far, ascending */
        int64_t nl = 0;
        const f16v inf = (f16v){0} + INFINITY;
        if (nlist / 16 >= nprobe) { /* runs of 16: 16 runs' minima at once */
            const int64_t runs = nlist / 16;
            for (int64_t r0 = 0; r0 < runs; r0 += 16) {
                f16v v[16], lo;
                for (int64_t r = 0; r < 16; r++) {
                    memcpy(&v[r], row + 16 * (r0 + r < runs ? r0 + r : runs - 1), sizeof(f16v));
                    v[r] = pick(v[r] == v[r], v[r], inf); /* NaN: +inf */
                }
                lo = extreme_rows(v, 0);
                for (int64_t r = 0; r < 16 && r0 + r < runs; r++)
                    nl = keep_least(least, nl, nprobe, lo[r]);
            }
        } else if (nlist / 4 >= nprobe) { /* runs of 8 or 4 (fewer than 256): 16 scores at a
                                             time folded to each run's first lane */
            const int64_t width = nlist / 8 >= nprobe ? 8 : 4, runs = nlist / width;
            const int64_t per = 16 / width; /* runs a vector */
            const i16v swap1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
            const i16v swap2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
            const i16v swap4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
            float mins[256 + 16];
            int64_t r = 0;
            for (; r + per <= runs; r += per) {
                f16v x, y;
                memcpy(&x, row + width * r, sizeof(x));
                x = pick(x == x, x, inf);
                y = __builtin_shuffle(x, swap1);
                x = pick(y < x, y, x);
                y = __builtin_shuffle(x, swap2);
                x = pick(y < x, y, x);
                if (width == 8) {
                    y = __builtin_shuffle(x, swap4);
                    x = pick(y < x, y, x);
                }
                for (int64_t k = 0; k < per; k++) mins[r + k] = x[k * width];
            }
            for (; r < runs; r++) { /* the last runs, fewer than a vector's */
                mins[r] = INFINITY;
                for (int64_t c = width * r; c < width * (r + 1); c++)
                    if (row[c] < mins[r]) mins[r] = row[c]; /* NaN: never less */
            }
            for (r = 0; r < runs; r++) nl = keep_least(least, nl, nprobe, mins[r]);
        }
        if (nl == nprobe) bound = least[nprobe - 1]; /* runs enough for a bound */
        for (int64_t c0 = 0; c0 < nlist; c0 += 16) { /* 16 at a time: those under the limit */
            const float limit = n == nprobe && tmp[n - 1].cost < bound ? tmp[n - 1].cost : bound;
            uint32_t mask = nlist - c0 < 16 ? (1u << (nlist - c0)) - 1 : 0xFFFFu;
            if (nlist - c0 >= 16 && limit < INFINITY) {
                f16v v16;
                memcpy(&v16, row + c0, sizeof(v16));
                const i16v under = v16 <= (f16v){0} + limit; /* NaN: no */
                mask = 0;
                for (int u = 0; u < 16; u++) mask |= (uint32_t)(under[u] & 1) << u;
            }
            while (mask) {
                const int64_t c = c0 + __builtin_ctz(mask);
                mask &= mask - 1;
                float v = row[c];
                if (v != v) v = INFINITY;
                if (v > bound) continue;
                if (n == nprobe && !(v < tmp[n - 1].cost)) continue; /* ties: lower list wins */
                int64_t i = n < nprobe ? n++ : n - 1;
                while (i > 0 && v < tmp[i - 1].cost) {
                    tmp[i] = tmp[i - 1];
                    i--;
                }
                tmp[i].cost = v;
                tmp[i].list = c;
            }
        }
    } else {
        for (int64_t c = 0; c < nlist; c++) {
            tmp[c].cost = row[c] != row[c] ? INFINITY : row[c];
            tmp[c].list = c;
        }
        qsort(tmp, (size_t)nlist, sizeof(scored_t), cmp_scored);
        n = nprobe;
    }
    for (int64_t i = 0; i < n; i++) {
        out_cost[i] = tmp[i].cost + add;
        out_list[i] = tmp[i].list;
    }
}

/* Whether the probe's tiles of 8 queries fit the registers: 16 vectors of 16 sums, which
 * AVX-512 holds (32 registers of 16 floats) and narrower vectors would spill. */
static int wide_tiles(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* scores[b * sstride + 16 * v + i] += queries[b] . matrix[:dim][c0 + 16 * v + i] for NB
 * queries, i < 16, v < NV: NB * NV vectors of sums kept in registers over the dim rows (of
 * nlist columns), each sum taken in row order. */
static inline __attribute__((always_inline)) void probe_tile(
        const float *queries, int64_t dim, const float *matrix, int64_t nlist, float *scores,
        int64_t sstride, int64_t c0, const int NB, const int NV) {
    f16v acc[8][4];
    for (int b = 0; b < NB; b++)
        for (int v = 0; v < NV; v++) memcpy(&acc[b][v], scores + b * sstride + 16 * v, 64);
    for (int64_t d = 0; d < dim; d++) {
        f16v row[4];
        for (int v = 0; v < NV; v++) memcpy(&row[v], matrix + d * nlist + c0 + 16 * v, 64);
        for (int b = 0; b < NB; b++) {
            const float a = queries[b * dim + d];
            for (int v = 0; v < NV; v++) acc[b][v] += a * row[v];
        }
    }
    for (int b = 0; b < NB; b++)
        for (int v = 0; v < NV; v++) memcpy(scores + b * sstride + 16 * v, &acc[b][v], 64);
}

/* scores[b] += queries[b] . matrix[:dim] for nb <= PROBE_BLOCK queries: tiles of columns
 * whose sums stay in registers, then tiles of 16 columns; then, of at least 16 columns, the
 * last few in one tile of 16 that ends at nlist, summed aside from the scores as they were
 * and only its columns no other tile summed copied (nlist 100 leaves 4 columns: one matrix
 * row at a time, they cost as much as the tiles); else those one row at a time. Every sum
 * is taken in row order, whichever way (the same bits). */
HOT static void probe_scores(const float *queries, int64_t nb, int64_t dim, const float *matrix,
                             int64_t nlist, float *scores) {
    float aside[PROBE_BLOCK * 16];
    int64_t c0 = 0;
    const int64_t last = nlist - 16; /* the tile that ends at nlist, when nlist >= 16 */
    if (nlist % 16 && nlist >= 16) { /* aside, before the tiles add to the scores; several
                                         queries a tile, so that their sums run side by side */
        for (int64_t b = 0; b < nb; b++)
            memcpy(aside + b * 16, scores + b * nlist + last, 16 * sizeof(float));
        int64_t b = 0;
        for (; b + PROBE_BLOCK <= nb; b += PROBE_BLOCK)
            probe_tile(queries + b * dim, dim, matrix, nlist, aside + b * 16, 16, last,
                       PROBE_BLOCK, 1);
        for (; b + 4 <= nb; b += 4)
            probe_tile(queries + b * dim, dim, matrix, nlist, aside + b * 16, 16, last, 4, 1);
        for (; b < nb; b++)
            probe_tile(queries + b * dim, dim, matrix, nlist, aside + b * 16, 16, last, 1, 1);
    }
    if (nb < 4) { /* a query alone: 64 columns a tile */
        for (; c0 + 64 <= nlist; c0 += 64)
            for (int64_t b = 0; b < nb; b++)
                probe_tile(queries + b * dim, dim, matrix, nlist, scores + b * nlist + c0,
                           nlist, c0, 1, 4);
    } else { /* 32 columns a tile, for 8 queries, 4, or the one left over */
        const int wide = nb == PROBE_BLOCK && wide_tiles();
        for (; c0 + 32 <= nlist; c0 += 32) {
            int64_t b = 0;
            for (; wide && b + PROBE_BLOCK <= nb; b += PROBE_BLOCK)
                probe_tile(queries, dim, matrix, nlist, scores + c0, nlist, c0, PROBE_BLOCK, 2);
            for (; b + 4 <= nb; b += 4)
                probe_tile(queries + b * dim, dim, matrix, nlist, scores + b * nlist + c0,
                           nlist, c0, 4, 2);
            for (; b < nb; b++)
                probe_tile(queries + b * dim, dim, matrix, nlist, scores + b * nlist + c0,
                           nlist, c0, 1, 2);
        }
    }
    for (; c0 + 16 <= nlist; c0 += 16) /* whole groups of 16 past the tiles */
        for (int64_t b = 0; b < nb; b++)
            probe_tile(queries + b * dim, dim, matrix, nlist, scores + b * nlist + c0, nlist,
                       c0, 1, 1);
    if (c0 < nlist && nlist >= 16) {
        for (int64_t b = 0; b < nb; b++)
            memcpy(scores + b * nlist + c0, aside + b * 16 + (c0 - last),
                   (size_t)(nlist - c0) * sizeof(float));
        return;
    }
    for (int64_t d = 0; d < dim; d++) {
        const float *row = matrix + d * nlist;
        for (int64_t b = 0; b < nb; b++) {
            const float a = queries[b * dim + d];
            float *s = scores + b * nlist;
            for (int64_t c = c0; c < nlist; c++) s[c] += a * row[c];
        }
    }
}

/* The nprobe best lists of nb <= PROBE_BLOCK queries and their coarse costs (ivfpq_probe's
 * contract) to out_cost and out_list (nb, nprobe); scores (nb, nlist) and tmp (nlist) are
 * scratch. */
static void probe_block(const float *queries, int64_t nb, int64_t dim, int l2,
                        const float *matrix, int64_t nlist, int64_t nprobe, float *scores,
                        scored_t *tmp, float *out_cost, int64_t *out_list) {
    for (int64_t b = 0; b < nb; b++) {
        float *s = scores + b * nlist;
        if (l2) memcpy(s, matrix + dim * nlist, (size_t)nlist * sizeof(float));
        else memset(s, 0, (size_t)nlist * sizeof(float));
    }
    probe_scores(queries, nb, dim, matrix, nlist, scores);
    for (int64_t b = 0; b < nb; b++) {
        const float *q = queries + b * dim;
        float norm = 0.0f;
        if (l2)
            for (int64_t d = 0; d < dim; d++) norm += q[d] * q[d];
        best_lists(scores + b * nlist, nlist, nprobe, norm, tmp, out_cost + b * nprobe,
                   out_list + b * nprobe);
    }
}

static void *probe_phase(void *arg) {
    probe_t *pt = (probe_t *)arg;
    const int64_t dim = pt->dim, nlist = pt->nlist;
    scored_t *tmp = malloc((size_t)nlist * sizeof(scored_t));
    if (!tmp) return (void *)1;
    for (int64_t q0 = pt->q0; q0 < pt->q1; q0 += PROBE_BLOCK) {
        const int64_t nb = pt->q1 - q0 < PROBE_BLOCK ? pt->q1 - q0 : PROBE_BLOCK;
        probe_block(pt->queries + q0 * dim, nb, dim, pt->l2, pt->matrix, nlist, pt->nprobe,
                    pt->scores, tmp, pt->out_cost + q0 * pt->nprobe,
                    pt->out_list + q0 * pt->nprobe);
    }
    free(tmp);
    return NULL;
}

/*
 * The nprobe best lists of each query, best first, and their coarse costs (squared l2
 * distance to the centroid, or the negated inner product). matrix is the searcher's probe
 * matrix: (dim + 1, nlist) [-2 C^T; |c|^2] for l2, (dim, nlist) -C^T for ip. Ties go to the
 * lower list number. Returns 0, or -1 when memory could not be had.
 */
int ivfpq_probe(int64_t nq, int64_t dim, int64_t nlist, int l2, const float *queries,
                const float *matrix, int64_t nprobe, int nthreads, float *out_cost,
                int64_t *out_list) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nq) nthreads = nq > 0 ? (int)nq : 1;
    int rc = -1;
    probe_t *ps = calloc((size_t)nthreads, sizeof(probe_t));
    pthread_t *tids = calloc((size_t)nthreads, sizeof(pthread_t));
    size_t have = 0; /* the scores are kept from call to call (scratch_take) */
    float *scores = scratch_take((size_t)nthreads * PROBE_BLOCK * (size_t)nlist * sizeof(float),
                                 &have);
    if (!ps || !tids || !scores) goto done;
    for (int t = 0; t < nthreads; t++) {
        probe_t pt = {nq * t / nthreads, nq * (t + 1) / nthreads, dim, nlist, nprobe, l2,
                      queries, matrix, scores + (size_t)t * PROBE_BLOCK * (size_t)nlist,
                      out_cost, out_list};
        ps[t] = pt;
    }
    rc = run_parallel(nthreads, ps, sizeof(probe_t), tids, probe_phase) ? -1 : 0;
done:
    free(ps);
    free(tids);
    scratch_give(scores, have);
    return rc;
}

/* ---- probe and scan in one call ------------------------------------------------------- */

/*
 * The search of nq queries (nq, dim): their nprobe best lists (ivfpq_probe's, written to
 * out_list (nq, nprobe); a batch's probe on probe_threads) and the best k of their records
 * (ivfpq_scan's, on one thread below thread_min_rows rows summed over the pairs, else on up
 * to nthreads), with the lists' entries taken from a table indexed by list number (known[l]:
 * the entry of list l is filled; rec_count 0 for an empty list). The same results as
 * ivfpq_probe followed by ivfpq_scan over the probed non-empty lists: one query's in probe
 * order, a batch's grouped by list in list order, each list's pairs by query then rank.
 * Returns 0; 1 when a probed list is not known yet (nothing scanned: the caller fills those
 * entries and calls again); -1 when memory could not be had. With a refine frame (per list
 * number: its R_KNOWN must name every probed list too, else 1), the results are refined as
 * ivfpq_scan refines them. Called through ivfpq_search_one's frame and ivfpq_search_batch.
 */
static int search_queries(int64_t nq, int probe_threads, int64_t dim, int64_t m, int64_t ksub,
                          int l2, const float *queries, const float *matrix, int64_t nlist,
                          int64_t nprobe, const float *centroids, const float *codebooks_t,
                          const float *norms, const float *list_terms, const uint8_t *known,
                          const uint64_t *rec_addr, const int64_t *rec_count, int64_t stride,
                          const uint64_t *dead_addr, const int64_t *dead_count,
                          const uint64_t *blk_addr, const int64_t *blk_count, int64_t k,
                          int nthreads, int64_t thread_min_rows, int64_t *out_list,
                          float *out_cost, int64_t *out_id, int32_t *out_rank,
                          int64_t *out_row, int64_t *refine) {
    int rc = -1;
    const int64_t npairs = nq * nprobe;
    /* list entries: one per probed list of one query, at most one per list of a batch */
    const int64_t ne = nq == 1 ? nprobe : (npairs < nlist ? npairs : nlist);
    float *scores = nq == 1 ? malloc((size_t)nlist * sizeof(float)) : NULL;
    scored_t *tmp = nq == 1 ? malloc((size_t)nlist * sizeof(scored_t)) : NULL;
    float *probe_cost = malloc((size_t)npairs * sizeof(float));
    int64_t *lists = malloc(((size_t)ne * 10 + 1 + (size_t)npairs) * sizeof(int64_t));
    int32_t *rank = malloc((size_t)npairs * sizeof(int32_t));
    int64_t *entry = nq == 1 ? NULL : malloc((size_t)nlist * sizeof(int64_t));
    if (!probe_cost || !lists || !rank || (nq == 1 ? !scores || !tmp : !entry)) goto done;
    if (nq == 1) { /* one query: probed here, without the probe's threads */
        probe_block(queries, 1, dim, l2, matrix, nlist, nprobe, scores, tmp, probe_cost,
                    out_list);
    } else if (ivfpq_probe(nq, dim, nlist, l2, queries, matrix, nprobe, probe_threads,
                           probe_cost, out_list)) {
        goto done;
    }
    rc = 1;
    const uint8_t *vknown = refine ? (const uint8_t *)(uintptr_t)refine[R_KNOWN] : NULL;
    /* A frame made before any list's vector rows were known has row size 0, though another
     * thread may have filled some since: to it no list's rows are known. */
    const int vsized = refine && refine[R_SIZE] > 4;
    for (int64_t i = 0; i < npairs; i++)
        if (!known[out_list[i]]) goto done;
    for (int64_t i = 0; i < nq * k; i++) {
        out_cost[i] = INFINITY;
        out_id[i] = -1;
        out_rank[i] = -1;
        out_row[i] = -1;
    }
    int64_t *list_no = lists, *count = lists + ne, *dcount = lists + 2 * ne;
    int64_t *start = lists + 3 * ne, *pq = lists + 4 * ne + 1;
    uint64_t *addr = (uint64_t *)(pq + npairs);
    uint64_t *daddr = addr + ne, *baddr = daddr + ne, *vaddr = baddr + ne;
    int64_t *bcount = (int64_t *)(vaddr + ne), *vcount = bcount + ne;
    int64_t n = 0, total = 0, work = 0;
    start[0] = 0;
#define LIST_ROWS(l) (rec_count[l] + (blk_addr ? BLOCK_ROWS * blk_count[l] : 0))
    if (nq > 1) { /* the pairs of each list: entry[l] counts them, then numbers the entry */
        memset(entry, 0, (size_t)nlist * sizeof(int64_t));
        for (int64_t i = 0; i < npairs; i++) entry[out_list[i]]++;
    }
    for (int64_t i = 0; i < (nq == 1 ? nprobe : nlist); i++) {
        const int64_t l = nq == 1 ? out_list[i] : i;
        const int64_t pairs = nq == 1 ? 1 : entry[l];
        const int64_t rows = pairs ? LIST_ROWS(l) : 0;
        if (nq > 1) entry[l] = -1;
        if (rows <= 0) continue;
        if (vknown && (!vsized || !vknown[l])) goto done; /* rc 1: its vector rows unknown */
        list_no[n] = l;
        addr[n] = rec_addr[l];
        count[n] = rec_count[l];
        daddr[n] = dead_addr[l];
        dcount[n] = dead_count[l];
        if (blk_addr) {
            baddr[n] = blk_addr[l];
            bcount[n] = blk_count[l];
        }
        if (refine) {
            vaddr[n] = ((const uint64_t *)(uintptr_t)refine[R_ADDR])[l];
            vcount[n] = ((const int64_t *)(uintptr_t)refine[R_COUNT])[l];
        }
        if (nq == 1) {
            pq[n] = 0;
            rank[n] = (int32_t)i;
        } else {
            entry[l] = n;
        }
        total += rows;
        work += rows * pairs;
        start[n + 1] = start[n] + pairs;
        n++;
    }
#undef LIST_ROWS
    if (nq > 1) { /* each list's pairs in the order of the queries, then of their ranks:
                     start[e] the cursor of entry e's, then moved back a place */
        for (int64_t i = 0; i < npairs; i++) {
            const int64_t e = entry[out_list[i]];
            if (e < 0) continue;
            pq[start[e]] = i / nprobe;
            rank[start[e]] = (int32_t)(i % nprobe);
            start[e]++;
        }
        for (int64_t e = n; e > 0; e--) start[e] = start[e - 1];
        start[0] = 0;
    }
    int64_t frame[R_SLOTS]; /* the refine frame, with the scanned lists' vector rows */
    if (refine) {
        memcpy(frame, refine, sizeof(frame));
        frame[R_ADDR] = (int64_t)(uintptr_t)vaddr;
        frame[R_COUNT] = (int64_t)(uintptr_t)vcount;
        refine[R_BAD] = -1;
        refine[R_BAD_KIND] = 0;
        if (refine[R_KOUT]) { /* no list to scan: no result */
            float *rcost = (float *)(uintptr_t)refine[R_OUT_COST];
            int64_t *rid = (int64_t *)(uintptr_t)refine[R_OUT_ID];
            for (int64_t i = 0; i < nq * refine[R_KOUT]; i++) {
                rcost[i] = INFINITY;
                rid[i] = -1;
            }
        }
    }
    rc = 0;
    if (n == 0) goto done;
    rc = ivfpq_scan(nq, dim, m, ksub, l2, queries, centroids, codebooks_t, norms, list_terms, n,
                    list_no, NULL, addr, count, stride, daddr, dcount, blk_addr ? baddr : NULL,
                    blk_addr ? bcount : NULL, start, pq, rank, k,
                    total < k ? total : k, work >= thread_min_rows ? nthreads : 1, out_cost,
                    out_id, out_rank, out_row, refine ? frame : NULL);
    if (refine) {
        refine[R_BAD] = frame[R_BAD];
        refine[R_BAD_KIND] = frame[R_BAD_KIND];
    }
done:
    free(scores);
    free(tmp);
    free(probe_cost);
    free(lists);
    free(rank);
    free(entry);
    return rc;
}

/* The slots of ivfpq_search_one's frame: search_queries's scalar arguments and addresses,
 * in this order, as int64 (_kernel.py's FRAME_SLOTS names them too). */
enum {
    F_DIM, F_M, F_KSUB, F_L2, F_MATRIX, F_NLIST, F_NPROBE, F_CENTROIDS, F_CODEBOOKS_T, F_NORMS,
    F_LIST_TERMS, F_KNOWN, F_REC_ADDR, F_REC_COUNT, F_STRIDE, F_DEAD_ADDR, F_DEAD_COUNT,
    F_BLK_ADDR, F_BLK_COUNT, F_K, F_NTHREADS, F_THREAD_MIN_ROWS, F_REFINE, F_SLOTS
};

/*
 * One query's search_queries with its arguments in one frame, so that a call from Python
 * passes one address instead of 30 converted arguments: the F_SLOTS slots, then the query
 * (dim float32, padded to whole slots), then the outputs: lists (nprobe int64), ids (k
 * int64), rows (k int64), costs (k float32) and ranks (k int32). A pointer slot holds an
 * address, 0 for NULL. With F_REFINE not 0, a refine frame follows the outputs in the
 * frame: its R_* slots (per list number; R_QUERIES, R_OUT_COST and R_OUT_ID are written
 * here), the query as given (dim float32, padded to whole slots), then its outputs: costs
 * (R_KOUT float32, padded to whole slots) and ids (R_KOUT int64). No slot holds an address
 * within the frame, so that a frame may be copied and the copy called.
 */
int ivfpq_search_one(int64_t *frame) {
    const int64_t dim = frame[F_DIM], nprobe = frame[F_NPROBE], k = frame[F_K];
#define PTR(T, slot) ((T)(uintptr_t)frame[slot])
    const int64_t q_slots = (dim + 1) / 2;
    const float *query = (const float *)(frame + F_SLOTS);
    int64_t *out_list = frame + F_SLOTS + q_slots;
    int64_t *out_id = out_list + nprobe, *out_row = out_id + k;
    float *out_cost = (float *)(out_row + k);
    int32_t *out_rank = (int32_t *)(out_cost + k);
    int64_t *refine = NULL;
    if (frame[F_REFINE]) {
        refine = out_list + nprobe + 3 * k;
        int64_t *raw = refine + R_SLOTS, *costs = raw + q_slots;
        refine[R_QUERIES] = (int64_t)(uintptr_t)raw;
        refine[R_OUT_COST] = (int64_t)(uintptr_t)costs;
        refine[R_OUT_ID] = (int64_t)(uintptr_t)(costs + (refine[R_KOUT] + 1) / 2);
    }
    return search_queries(1, 1, dim, frame[F_M], frame[F_KSUB], (int)frame[F_L2], query,
                          PTR(const float *, F_MATRIX), frame[F_NLIST], nprobe,
                          PTR(const float *, F_CENTROIDS), PTR(const float *, F_CODEBOOKS_T),
                          PTR(const float *, F_NORMS), PTR(const float *, F_LIST_TERMS),
                          PTR(const uint8_t *, F_KNOWN), PTR(const uint64_t *, F_REC_ADDR),
                          PTR(const int64_t *, F_REC_COUNT), frame[F_STRIDE],
                          PTR(const uint64_t *, F_DEAD_ADDR), PTR(const int64_t *, F_DEAD_COUNT),
                          PTR(const uint64_t *, F_BLK_ADDR), PTR(const int64_t *, F_BLK_COUNT), k,
                          (int)frame[F_NTHREADS], frame[F_THREAD_MIN_ROWS], out_list, out_cost,
                          out_id, out_rank, out_row, refine);
#undef PTR
}

/*
 * A batch's search_queries: nq >= 1 queries (nq, dim), the F_SLOTS slots of a search_one
 * frame in head (its F_REFINE ignored), the probe on probe_threads; outputs out_list (nq,
 * nprobe), out_cost, out_id, out_rank, out_row (nq, k). refine, when not NULL, is a refine
 * frame per list number (R_KNOWN filled) whose R_QUERIES (nq, dim), R_OUT_COST and
 * R_OUT_ID (nq, R_KOUT) are the caller's. Returns as search_queries does.
 */
int ivfpq_search_batch(const int64_t *head, int64_t nq, const float *queries, int probe_threads,
                       int64_t *out_list, float *out_cost, int64_t *out_id, int32_t *out_rank,
                       int64_t *out_row, int64_t *refine) {
#define PTR(T, slot) ((T)(uintptr_t)head[slot])
    if (nq < 1) return -2;
    return search_queries(nq, probe_threads, head[F_DIM], head[F_M], head[F_KSUB],
                          (int)head[F_L2], queries, PTR(const float *, F_MATRIX), head[F_NLIST],
                          head[F_NPROBE], PTR(const float *, F_CENTROIDS),
                          PTR(const float *, F_CODEBOOKS_T), PTR(const float *, F_NORMS),
                          PTR(const float *, F_LIST_TERMS), PTR(const uint8_t *, F_KNOWN),
                          PTR(const uint64_t *, F_REC_ADDR), PTR(const int64_t *, F_REC_COUNT),
                          head[F_STRIDE], PTR(const uint64_t *, F_DEAD_ADDR),
                          PTR(const int64_t *, F_DEAD_COUNT), PTR(const uint64_t *, F_BLK_ADDR),
                          PTR(const int64_t *, F_BLK_COUNT), head[F_K], (int)head[F_NTHREADS],
                          head[F_THREAD_MIN_ROWS], out_list, out_cost, out_id, out_rank,
                          out_row, refine);
#undef PTR
}

/* ---- PQ encoding ------------------------------------------------------------------------ */

typedef struct {
    int64_t i0, i1, dim, m, ksub;
    const float *x, *centroids, *codebooks_t, *norms;
    const int64_t *lists;
    uint8_t *codes;
    float *scratch; /* (ENCODE_BLOCK * dim + ksub,) */
} encode_t;

/* Sub-centroids scored together by the encoder: one vector register of floats at AVX-512
 * (GCC/clang vector extensions: two or four registers on narrower CPUs). */
#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
/* Chunks of LANES scored at once, so their multiply-add chains overlap. */
#define GROUP 4

/* The code of one sub-vector rj (dsub,) for sub-quantizer j (codebook cbj (dsub, ksub), norms
 * nj): the first sub-centroid minimising |C_jc|^2 - 2 rj.C_jc (the squared distance less
 * |rj|^2, as the numpy encoder ranks). Scores LANES sub-centroids per register, GROUP
 * registers at a time, each lane keeping its own first best; the lanes' best then reduce to
 * the lowest index among the smallest scores. */
HOT static int64_t encode_sub(const float *rj, int64_t dsub, int64_t ksub, const float *cbj,
                              const float *nj, float *t) {
    int64_t best = 0;
    if (ksub % (GROUP * LANES) == 0) {
        vf bv, acc[GROUP];
        vi bi, idx, step;
        for (int l = 0; l < LANES; l++) {
            bv[l] = INFINITY;
            bi[l] = l;
            idx[l] = l;
            step[l] = LANES;
        }
        for (int64_t c0 = 0; c0 < ksub; c0 += GROUP * LANES) {
            for (int g = 0; g < GROUP; g++) memcpy(&acc[g], nj + c0 + g * LANES, sizeof(vf));
            for (int64_t d = 0; d < dsub; d++) {
                const float a = -2.0f * rj[d];
                for (int g = 0; g < GROUP; g++) {
                    vf cb;
                    memcpy(&cb, cbj + d * ksub + c0 + g * LANES, sizeof(vf));
                    acc[g] += a * cb;
                }
            }
            for (int g = 0; g < GROUP; g++) { /* each lane keeps its first best: strict */
                const vi take = acc[g] < bv;
                bv = (vf)(((vi)bv & ~take) | ((vi)acc[g] & take));
                bi = (bi & ~take) | (idx & take);
                idx += step;
            }
        }
        int l0 = 0;
        for (int l = 1; l < LANES; l++)
            if (bv[l] < bv[l0] || (bv[l] == bv[l0] && bi[l] < bi[l0])) l0 = l;
        best = bi[l0];
    } else {
        memcpy(t, nj, (size_t)ksub * sizeof(float));
        for (int64_t d = 0; d < dsub; d++) {
            const float a = -2.0f * rj[d];
            for (int64_t c = 0; c < ksub; c++) t[c] += a * cbj[d * ksub + c];
        }
        for (int64_t c = 1; c < ksub; c++)
            if (t[c] < t[best]) best = c;
    }
    return best;
}

/* Sub-vectors scored together by encode_four: each codebook load serves all of them. Eight
 * were no faster than four (docs/benchmarks.md, "Performance II: tried and rejected"). */
#define NV 4

/* encode_sub for NV sub-vectors at once (r[v] at rj + v * rstride), when ksub is a multiple of
 * LANES: the same operations per (sub-vector, sub-centroid) in the same order, so the same
 * codes, with each codebook register loaded once for the NV of them (the loads, not the
 * multiply-adds, bounded encode_sub). */
HOT static void encode_four(const float *rj, int64_t rstride, int64_t dsub, int64_t ksub,
                            const float *cbj, const float *nj, int64_t *best) {
    vf bv[NV];
    vi bi[NV], idx, step;
    float a[NV][64];
    for (int v = 0; v < NV; v++)
        for (int64_t d = 0; d < dsub; d++) a[v][d] = -2.0f * rj[v * rstride + d];
    for (int l = 0; l < LANES; l++) {
        for (int v = 0; v < NV; v++) {
            bv[v][l] = INFINITY;
            bi[v][l] = l;
        }
        idx[l] = l;
        step[l] = LANES;
    }
    for (int64_t c0 = 0; c0 < ksub; c0 += LANES) {
        vf acc[NV];
        for (int v = 0; v < NV; v++) memcpy(&acc[v], nj + c0, sizeof(vf));
        for (int64_t d = 0; d < dsub; d++) {
            vf cb;
            memcpy(&cb, cbj + d * ksub + c0, sizeof(vf));
            for (int v = 0; v < NV; v++) acc[v] += a[v][d] * cb;
        }
        for (int v = 0; v < NV; v++) { /* each lane keeps its first best: strict */
            const vi take = acc[v] < bv[v];
            bv[v] = (vf)(((vi)bv[v] & ~take) | ((vi)acc[v] & take));
            bi[v] = (bi[v] & ~take) | (idx & take);
        }
        idx += step;
    }
    for (int v = 0; v < NV; v++) {
        int l0 = 0;
        for (int l = 1; l < LANES; l++)
            if (bv[v][l] < bv[v][l0] || (bv[v][l] == bv[v][l0] && bi[v][l] < bi[v][l0])) l0 = l;
        best[v] = bi[v][l0];
    }
}

/* Vectors encoded together, sub-quantizer by sub-quantizer, so that each codebook (8 KiB at
 * dsub=8, ksub=256) is read from L2 once per block rather than once per vector (measured on
 * 100k vectors, one thread: 0.24 to 0.19 s). */
#define ENCODE_BLOCK 16

static void *encode_phase(void *arg) {
    encode_t *e = (encode_t *)arg;
    const int64_t dim = e->dim, m = e->m, dsub = dim / m, ksub = e->ksub;
    float *r = e->scratch, *t = e->scratch + ENCODE_BLOCK * dim;
    for (int64_t i0 = e->i0; i0 < e->i1; i0 += ENCODE_BLOCK) {
        const int64_t nb = e->i1 - i0 < ENCODE_BLOCK ? e->i1 - i0 : ENCODE_BLOCK;
        for (int64_t b = 0; b < nb; b++) {
            const float *x = e->x + (i0 + b) * dim, *c = e->centroids + e->lists[i0 + b] * dim;
            for (int64_t d = 0; d < dim; d++) r[b * dim + d] = x[d] - c[d];
        }
        const int four = ksub % LANES == 0 && dsub <= 64;
        for (int64_t j = 0; j < m; j++) {
            const float *cbj = e->codebooks_t + j * dsub * ksub, *nj = e->norms + j * ksub;
            int64_t b = 0;
            if (four)
                for (; b + NV <= nb; b += NV) {
                    int64_t best[NV];
                    encode_four(r + b * dim + j * dsub, dim, dsub, ksub, cbj, nj, best);
                    for (int v = 0; v < NV; v++) e->codes[(i0 + b + v) * m + j] = (uint8_t)best[v];
                }
            for (; b < nb; b++)
                e->codes[(i0 + b) * m + j] = (uint8_t)encode_sub(r + b * dim + j * dsub, dsub,
                                                                 ksub, cbj, nj, t);
        }
    }
    return NULL;
}

/* PQ codes (n, m) of the residuals x[i] - centroids[lists[i]]. Returns 0, or -1 when memory
 * could not be had. */
int ivfpq_encode(int64_t n, int64_t dim, int64_t m, int64_t ksub, const float *x,
                 const int64_t *lists, const float *centroids, const float *codebooks_t,
                 const float *norms, int nthreads, uint8_t *codes) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > n) nthreads = n > 0 ? (int)n : 1;
    int rc = -1;
    encode_t *es = calloc((size_t)nthreads, sizeof(encode_t));
    pthread_t *tids = calloc((size_t)nthreads, sizeof(pthread_t));
    const size_t per = (size_t)(ENCODE_BLOCK * dim + ksub);
    float *scratch = malloc((size_t)nthreads * per * sizeof(float));
    if (!es || !tids || !scratch) goto done;
    for (int t = 0; t < nthreads; t++) {
        encode_t e = {n * t / nthreads, n * (t + 1) / nthreads, dim, m, ksub, x, centroids,
                      codebooks_t, norms, lists, codes,
                      scratch + (size_t)t * per};
        es[t] = e;
    }
    run_parallel(nthreads, es, sizeof(encode_t), tids, encode_phase);
    rc = 0;
done:
    free(es);
    free(tids);
    free(scratch);
    return rc;
}

/* ---- k-means update ------------------------------------------------------------------- */

typedef struct {
    int64_t n, m, dsub, k, c0, c1;
    const float *x;
    const int64_t *labels;
    double *sums;
} sums_t;

/* Columns c0..c1 of x: each value added to its cluster's sum, rows in index order. */
static void *sums_phase(void *arg) {
    const sums_t *s = (const sums_t *)arg;
    const int64_t dim = s->m * s->dsub, dsub = s->dsub;
    for (int64_t i = 0; i < s->n; i++) {
        const float *row = s->x + i * dim;
        const int64_t *lab = s->labels + i * s->m;
        for (int64_t j = s->c0 / dsub; j * dsub < s->c1; j++) {
            const int64_t lo = (s->c0 > j * dsub ? s->c0 : j * dsub) - j * dsub;
            const int64_t hi = (s->c1 < (j + 1) * dsub ? s->c1 : (j + 1) * dsub) - j * dsub;
            double *dst = s->sums + (j * s->k + lab[j]) * dsub;
            const float *src = row + j * dsub;
            for (int64_t t = lo; t < hi; t++) dst[t] += (double)src[t];
        }
    }
    return NULL;
}

/*
 * The k-means update's sums for m sub-spaces of dsub columns each: sums (m, k, dsub) float64
 * (zeroed here) of the rows of x (n, m * dsub) that labels (n, m) put in each cluster, and
 * counts (m, k). Each sum adds its rows in index order in float64, as numpy's weighted
 * bincount does, so the result is the same bits whatever nthreads (threads split columns).
 * Labels must lie in 0..k-1. Returns 0, or -1 when memory could not be had.
 */
int ivfpq_cluster_sums(int64_t n, int64_t m, int64_t dsub, int64_t k, const float *x,
                       const int64_t *labels, int nthreads, double *sums, int64_t *counts) {
    const int64_t dim = m * dsub;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > dim) nthreads = (int)dim;
    memset(sums, 0, (size_t)(m * k * dsub) * sizeof(double));
    memset(counts, 0, (size_t)(m * k) * sizeof(int64_t));
    for (int64_t i = 0; i < n * m; i++) counts[(i % m) * k + labels[i]]++;
    sums_t *ss = calloc((size_t)nthreads, sizeof(sums_t));
    pthread_t *tids = calloc((size_t)nthreads, sizeof(pthread_t));
    int rc = -1;
    if (!ss || !tids) goto done;
    for (int t = 0; t < nthreads; t++) {
        sums_t st = {n, m, dsub, k, dim * t / nthreads, dim * (t + 1) / nthreads, x, labels,
                     sums};
        ss[t] = st;
    }
    run_parallel(nthreads, ss, sizeof(sums_t), tids, sums_phase);
    rc = 0;
done:
    free(ss);
    free(tids);
    return rc;
}

/* CRC-32 (zlib's: reflected polynomial 0xEDB88320, inverted in and out). Runs of 64 bytes
 * and more are folded by carry-less multiplication where the CPU has it (VPCLMULQDQ with
 * AVX-512, else PCLMULQDQ), the rest eight bytes a step from tables ("slicing by 8"); each
 * gives zlib's value (the tests check each against zlib.crc32). Per 516-byte row (dim 128,
 * float32; Kernel.row_checksums over 2,000 rows in cache, best of 2,000 calls): 15 ns by
 * crc_fold512, 22 by crc_fold, 204 by the tables alone. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static int crc_fold_ok;        /* the widest fold the CPU has: 0 none, 1 crc_fold, 2 crc_fold512 */
static int crc_fold_limit = 2; /* the widest fold allowed */

static void crc_init(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int i = 0; i < 8; i++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        crc_table[0][b] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int b = 0; b < 256; b++)
            crc_table[t][b] = (crc_table[t - 1][b] >> 8) ^ crc_table[0][crc_table[t - 1][b] & 0xFF];
#ifdef FAST_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1"))
        crc_fold_ok = __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx512f")
                          ? 2
                          : 1;
#endif
}

#ifdef FAST_SIMD
/*
 * The CRC register (not inverted) after n bytes at p, n >= 64 and a multiple of 16: four
 * 128-bit lanes folded 512 bits a step, then into one lane 128 bits a step, then reduced to
 * 32 bits by Barrett's method (Gopal et al., "Fast CRC Computation for Generic Polynomials
 * Using PCLMULQDQ Instruction", Intel, 2009). The constants are x^e mod P for the bit-reflected
 * polynomial: K1, K2 fold 512 bits (e = 4*128+32 +- 32), K3, K4 128 bits, K5 64 to 32 bits,
 * and P' with mu = floor(x^64 / P) for the reduction.
 */
#define FOLD(x, k, next)                                                                    \
    x = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00),                       \
                                    _mm_clmulepi64_si128(x, k, 0x11)),                      \
                      next)
/* The end of a fold: four lanes into one 128 bits a step, the rest of the run (n bytes at p,
 * a multiple of 16) into it, then 64 bits, 32, and Barrett's reduction. */
static inline __attribute__((always_inline, target("pclmul,sse4.1"))) uint32_t crc_finish(
        __m128i x0, __m128i x1, __m128i x2, __m128i x3, const uint8_t *p, int64_t n) {
    const __m128i k34 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);
    const __m128i pmu = _mm_set_epi64x(0x1f7011641, 0x1db710641);
    const __m128i low32 = _mm_set_epi32(0, 0, 0, -1);
    FOLD(x0, k34, x1);
    FOLD(x0, k34, x2);
    FOLD(x0, k34, x3);
    for (; n >= 16; n -= 16, p += 16) FOLD(x0, k34, _mm_loadu_si128((const __m128i *)p));
    x0 = _mm_xor_si128(_mm_clmulepi64_si128(x0, k34, 0x10), _mm_srli_si128(x0, 8));
    x0 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x0, low32), k5, 0x00),
                       _mm_srli_si128(x0, 4));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x0, low32), pmu, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), pmu, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x0, t), 1);
}

__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(uint32_t crc,
                                                                   const uint8_t *p, int64_t n) {
    const __m128i k12 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
    __m128i x0 = _mm_loadu_si128((const __m128i *)p);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)crc));
    p += 64;
    n -= 64;
    for (; n >= 64; n -= 64, p += 64) {
        FOLD(x0, k12, _mm_loadu_si128((const __m128i *)p));
        FOLD(x1, k12, _mm_loadu_si128((const __m128i *)(p + 16)));
        FOLD(x2, k12, _mm_loadu_si128((const __m128i *)(p + 32)));
        FOLD(x3, k12, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    return crc_finish(x0, x1, x2, x3, p, n);
}

/* crc_fold with its four lanes in one AVX-512 register, each 64 bytes folded by two
 * VPCLMULQDQ (four lanes each) where crc_fold takes eight PCLMULQDQ, which one port runs one
 * a cycle: a 520-byte row's checksum took most of a refined candidate's time. */
__attribute__((target("vpclmulqdq,avx512f,pclmul,sse4.1"))) static uint32_t crc_fold512(
        uint32_t crc, const uint8_t *p, int64_t n) {
    const __m512i k12 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596, 0x154442bd4));
    __m512i x = _mm512_xor_si512(_mm512_loadu_si512((const void *)p),
                                 _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)crc)));
    p += 64;
    n -= 64;
    for (; n >= 64; n -= 64, p += 64)
        x = _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k12, 0x00),
                                      _mm512_clmulepi64_epi128(x, k12, 0x11),
                                      _mm512_loadu_si512((const void *)p), 0x96); /* a^b^c */
    return crc_finish(_mm512_extracti32x4_epi32(x, 0), _mm512_extracti32x4_epi32(x, 1),
                      _mm512_extracti32x4_epi32(x, 2), _mm512_extracti32x4_epi32(x, 3), p, n);
}
#undef FOLD
#endif

/* The fold row checksums use: the widest the CPU has of at most `limit` (2 crc_fold512, 1
 * crc_fold, 0 only the tables; -1 keeps the limit). For the tests that compare them. */
int ivfpq_crc_fold(int limit) {
    pthread_once(&crc_once, crc_init);
    if (limit >= 0) crc_fold_limit = limit;
    return crc_fold_ok < crc_fold_limit ? crc_fold_ok : crc_fold_limit;
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, int64_t n) {
    crc = ~crc;
#ifdef FAST_SIMD
    const int fold = crc_fold_ok < crc_fold_limit ? crc_fold_ok : crc_fold_limit;
    if (n >= 64 && fold) {
        const int64_t run = n & ~(int64_t)15;
        crc = fold == 2 ? crc_fold512(crc, p, run) : crc_fold(crc, p, run);
        p += run;
        n -= run;
    }
#endif
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^
              crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24] ^
              crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    return ~crc;
}

/* The checksum of each of n stored-vector rows (docs/format.md, vector files): the CRC-32 of
 * the record's id (8 little-endian bytes) followed by the first nbytes bytes of its row
 * (rows of row_size bytes from `rows`), to out[i]. */
void ivfpq_row_crcs(int64_t n, const uint8_t *rows, int64_t row_size, int64_t nbytes,
                    const int64_t *ids, uint32_t *out) {
    pthread_once(&crc_once, crc_init);
    for (int64_t i = 0; i < n; i++) {
        uint8_t id[8];
        memcpy(id, &ids[i], 8); /* little-endian: checked at the top of this file */
        out[i] = crc_update(crc_update(0, id, 8), rows + i * row_size, nbytes);
    }
}

/* An IEEE 754 binary16 value as a float (exact: every half is a float). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits;
    float out;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        out = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &out, 4);
        bits |= sign;
    } else if (exp == 31) { /* inf or NaN */
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&out, &bits, 4);
    return out;
}

/* Sixteen values of a stored row from p: float32, or float16 when half. */
static inline __attribute__((always_inline)) f16v row_values(const uint8_t *p, int half) {
    f16v v;
    if (half) {
        uint16_t h[16];
        memcpy(h, p, sizeof(h));
        for (int u = 0; u < 16; u++) v[u] = half_to_float(h[u]);
    } else {
        memcpy(&v, p, sizeof(v));
    }
    return v;
}

/* row_cost's sums with half and l2 known when inlined: the whole runs of 16 values as
 * vectors, the last (dim % 16) values one at a time into the first lanes. */
static inline __attribute__((always_inline)) float row_sums(const uint8_t *row, const float *q,
                                                            int64_t dim, int half, int l2) {
    const int64_t width = half ? 2 : 4;
    f16v acc = {0.0f};
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        const f16v v = row_values(row + width * d, half);
        f16v qv;
        memcpy(&qv, q + d, sizeof(qv));
        if (l2)
            acc += (v - qv) * (v - qv);
        else
            acc += -(v * qv);
    }
    if (d < dim) {
        float v[16];
        for (int64_t u = 0; u < dim - d; u++) {
            if (half) {
                uint16_t h;
                memcpy(&h, row + 2 * (d + u), 2);
                v[u] = half_to_float(h);
            } else {
                memcpy(&v[u], row + 4 * (d + u), 4);
            }
            acc[u] += l2 ? (v[u] - q[d + u]) * (v[u] - q[d + u]) : -(v[u] * q[d + u]);
        }
    }
    /* pairwise, by halves: lane u of 8 is acc[u] + acc[u + 8], and so on (in registers where
     * the compiler has __builtin_shufflevector: lane by lane, acc went through memory) */
#if defined(__clang__) || __GNUC__ >= 12
    const f8v a8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
    const f4v a4 = __builtin_shufflevector(a8, a8, 0, 1, 2, 3) +
                   __builtin_shufflevector(a8, a8, 4, 5, 6, 7);
    return (a4[0] + a4[2]) + (a4[1] + a4[3]);
#else
    for (int h = 8; h >= 1; h /= 2)
        for (int u = 0; u < h; u++) acc[u] += acc[u + h];
    return acc[0];
#endif
}

/* A stored row's exact cost against query q: the squared l2 distance, or the negated inner
 * product, summed in 16 interleaved partial sums (lane u takes values u, u + 16, ...) and
 * then pairwise. */
HOT static float row_cost(const uint8_t *row, const float *q, int64_t dim, int half, int l2) {
    if (half) return l2 ? row_sums(row, q, dim, 1, 1) : row_sums(row, q, dim, 1, 0);
    return l2 ? row_sums(row, q, dim, 0, 1) : row_sums(row, q, dim, 0, 0);
}

typedef struct {
    int64_t c0, c1, dim, bad;
    int half, l2;
    const float *queries;
    const int64_t *qidx, *ids;
    const uint64_t *addr;
    float *out_cost;
} refine_t;

static void crc_ready(void) { pthread_once(&crc_once, crc_init); }

/* Fetch a stored-vector row (nbytes of values, then its checksum) into the cache ahead of
 * use: rows are scattered over the vector files, and each is several cache lines read whole
 * (its checksum), so the loads of the next REFINE_AHEAD overlap the work on this one. */
static void prefetch_row(const uint8_t *row, int64_t nbytes) {
    for (int64_t o = 0; o < nbytes + 4; o += 64) __builtin_prefetch(row + o);
    __builtin_prefetch(row + nbytes + 3);
}

/* A stored-vector row's exact cost against q, to *cost; 1 (and no cost) when the row fails
 * its checksum for record `id`, else 0. */
static int checked_cost(const uint8_t *row, int64_t nbytes, int64_t id, const float *q,
                        int64_t dim, int half, int l2, float *cost) {
    uint8_t idb[8];
    uint32_t stored;
    memcpy(idb, &id, 8); /* little-endian: checked at the top of this file */
    memcpy(&stored, row + nbytes, 4);
    if (crc_update(crc_update(0, idb, 8), row, nbytes) != stored) return 1;
    *cost = row_cost(row, q, dim, half, l2);
    return 0;
}

static void *refine_phase(void *arg) {
    refine_t *rt = (refine_t *)arg;
    const int64_t nbytes = rt->dim * (rt->half ? 2 : 4);
    for (int64_t c = rt->c0; c < rt->c1; c++) {
        if (c + REFINE_AHEAD < rt->c1)
            prefetch_row((const uint8_t *)(uintptr_t)rt->addr[c + REFINE_AHEAD], nbytes);
        if (checked_cost((const uint8_t *)(uintptr_t)rt->addr[c], nbytes, rt->ids[c],
                         rt->queries + rt->qidx[c] * rt->dim, rt->dim, rt->half, rt->l2,
                         &rt->out_cost[c])) {
            rt->bad = c;
            break;
        }
    }
    return NULL;
}

/* Candidates a refine thread takes at least: fewer are not worth a thread's start. */
#define REFINE_PER_THREAD 512

/*
 * Exact costs of n refine candidates (docs/format.md, vector files): candidate c's row is at
 * address addr[c] (dim values, float32 when half is 0, float16 when 1, then its u32 CRC-32 of
 * the record's id ids[c] and the values). Its cost against query qidx[c] of queries (nq, dim)
 * goes to out_cost[c] (row_cost's). On up to nthreads threads, each a contiguous run of the
 * candidates. Returns 0, or 1 + the first candidate whose row fails its CRC (costs of later
 * candidates are then not all written). -1 when memory could not be had.
 */
int64_t ivfpq_refine_costs(int64_t n, int64_t dim, int half, int l2, const float *queries,
                           const int64_t *qidx, const uint64_t *addr, const int64_t *ids,
                           int nthreads, float *out_cost) {
    crc_ready();
    if (nthreads > n / REFINE_PER_THREAD) nthreads = (int)(n / REFINE_PER_THREAD);
    if (nthreads < 1) nthreads = 1;
    refine_t *rs = calloc((size_t)nthreads, sizeof(refine_t));
    pthread_t *tids = calloc((size_t)nthreads, sizeof(pthread_t));
    int64_t rc = -1;
    if (!rs || !tids) goto done;
    for (int t = 0; t < nthreads; t++) {
        refine_t rt = {n * t / nthreads, n * (t + 1) / nthreads, dim, -1, half, l2, queries,
                       qidx, ids, addr, out_cost};
        rs[t] = rt;
    }
    run_parallel(nthreads, rs, sizeof(refine_t), tids, refine_phase); /* cannot fail */
    rc = 0;
    for (int t = 0; t < nthreads; t++)
        if (rs[t].bad >= 0) {
            rc = rs[t].bad + 1;
            break;
        }
done:
    free(rs);
    free(tids);
    return rc;
}

int ivfpq_scan_abi(void) { return IVFPQ_SCAN_ABI; }

/* An importable module with no functions: it only lets _kernel.py find this library. */
static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "_scan", "IVF-PQ scan kernel (called through ctypes).", -1,
    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&scan_module); }
