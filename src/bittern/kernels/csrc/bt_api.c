/* Public entry points: argument checks, ISA dispatch, work splitting over the thread pool. */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdlib.h>
#include <strings.h>

#include "bt_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#define BT_ABI_VERSION 7

static const bt_kernels *g_kern = &bt_kernels_scalar;
static int g_isa = BT_ISA_SCALAR;
static int g_threads = 1;
/* T <= this: the GEMV kernels (weights streamed once; 2-4 tokens share each decoded weight vector, or
 * for 1.67bit-lut 2-3 tokens each group's decoded indices); larger: a GEMM. Measured on Zen 3 (6912 x 2560
 * from DRAM, 1 and 2 threads, session 10): the GEMV runs at ~100 / ~195 G MAC/s (2bit-r4) and ~90 / ~172
 * (1.67bit-lut) for any T, the GEMM by tables overtakes it at 11-12 tokens (10 for the lookup layout on
 * two threads), the panel GEMM at ~12-16 (2 bits) and ~16 (lookup); for 1.6bit-r4 the panel GEMM wins
 * from 5. (The lookup layout switched at 2 tokens until session 10: its panel GEMM ran at 23 G MAC/s
 * there, a quarter of its GEMV.) Session 11, after the tables' conversion got cheaper: a batched decode
 * step of the 2B4T model (2 threads, ternary products of 30 layers) at 10 tokens 117 ms by GEMV against
 * 108 by tables (2 bits), 120 against 112-113 (lookup); at 9 tokens 103 / 107 and 107 / 113, so the
 * GEMV keeps up to 9. */
static int g_gemv_max_t[3] = {9, 4, 9};
static int64_t g_panel_bytes = 192 * 1024; /* decoded weight panel per thread (fits in L2) */
/* T >= this (and above the GEMV range): the GEMM by tables of token vectors where the ISA has it
 * (see bt_avx2.c), else the panel GEMM. Zen 3, session 10: tables ahead of the panel GEMM by 10-30%
 * at 11-16 tokens, 25-60% from 24; behind by ~5% only where a 16-token tile is mostly empty (17-20). */
static int g_table_gemm_min_t[3] = {10, 11, 10}; /* 1.6bit-r4 (session 11, 6912 x 2560, 1 / 2 threads): the panel
                                                   GEMM ahead at 10 tokens (98 / 196 vs 90 / 180 G MAC/s), even at
                                                   11-12, the tables ahead from 13 */
/* GEMV work item: weight bytes a thread takes at a time (capped at 1/4 of a thread's fair share).
 * Measured on 2 threads: 32 KB items reach ~80-88% of the streaming-read roofline, 128 KB ~88-98%
 * (each new item restarts the prefetch stream); 512 KB a further 1-4% on the 2B4T gate/up shape (six
 * same-process A/B runs, both layouts). */
static int64_t g_item_bytes = 512 * 1024;

int bt_abi_version(void) { return BT_ABI_VERSION; }

/* ---------------------------------------------------------------------------------------- ISA */

static int cpu_has_avx2(void) {
#if defined(BT_HAVE_AVX2_BUILD)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 6) != 6) return 0; /* OS saves XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
#else
    return 0;
#endif
}

int bt_isa_available(int isa) {
    switch (isa) {
    case BT_ISA_AUTO:
    case BT_ISA_SCALAR:
        return 1;
    case BT_ISA_AVX2:
        return cpu_has_avx2();
    case BT_ISA_NEON:
#if defined(BT_HAVE_NEON_BUILD)
        return 1;
#else
        return 0;
#endif
    default:
        return 0;
    }
}

const char *bt_isa_name(int isa) {
    switch (isa) {
    case BT_ISA_AUTO:
        return "auto";
    case BT_ISA_SCALAR:
        return "scalar";
    case BT_ISA_AVX2:
        return "avx2";
    case BT_ISA_NEON:
        return "neon";
    default:
        return "unknown";
    }
}

int bt_set_isa(int isa) {
    if (isa == BT_ISA_AUTO) {
        if (bt_isa_available(BT_ISA_AVX2)) return bt_set_isa(BT_ISA_AVX2);
        if (bt_isa_available(BT_ISA_NEON)) return bt_set_isa(BT_ISA_NEON);
        return bt_set_isa(BT_ISA_SCALAR);
    }
    if (!bt_isa_available(isa)) return -1;
    switch (isa) {
#if defined(BT_HAVE_AVX2_BUILD)
    case BT_ISA_AVX2:
        g_kern = &bt_kernels_avx2;
        break;
#endif
#if defined(BT_HAVE_NEON_BUILD)
    case BT_ISA_NEON:
        g_kern = &bt_kernels_neon;
        break;
#endif
    default:
        g_kern = &bt_kernels_scalar;
        isa = BT_ISA_SCALAR;
    }
    g_isa = isa;
    return 0;
}

int bt_get_isa(void) { return g_isa; }

/* ------------------------------------------------------------------------------------ threads */

int bt_set_threads(int n) {
    if (n <= 0) n = bt_online_cpus();
    if (n > 256) n = 256;
    g_threads = n;
    bt_pool_resize(n);
    return n;
}

int bt_get_threads(void) { return g_threads; }

void bt_release_cores(void) { bt_pool_idle(); }

const char *bt_threading_name(void) { return bt_pool_name(); }

__attribute__((constructor)) static void bt_init(void) {
    const char *e = getenv("BITTERN_KERNEL_ISA");
    int isa = BT_ISA_AUTO;
    if (e && *e) {
        if (!strcasecmp(e, "scalar"))
            isa = BT_ISA_SCALAR;
        else if (!strcasecmp(e, "avx2"))
            isa = BT_ISA_AVX2;
        else if (!strcasecmp(e, "neon"))
            isa = BT_ISA_NEON;
    }
    if (bt_set_isa(isa) != 0) bt_set_isa(BT_ISA_AUTO);
    e = getenv("BITTERN_THREADS");
    g_threads = e && atoi(e) > 0 ? atoi(e) : bt_online_cpus();
    if (g_threads > 256) g_threads = 256;
    e = getenv("BITTERN_GEMV_MAX_T");
    if (e && atoi(e) > 0) g_gemv_max_t[0] = g_gemv_max_t[1] = g_gemv_max_t[2] = atoi(e);
    e = getenv("BITTERN_GEMV_ITEM_KB");
    if (e && atoi(e) > 0) g_item_bytes = (int64_t)atoi(e) * 1024;
    e = getenv("BITTERN_TABLE_GEMM_MIN_T");
    if (e && *e) /* 0: never */
        g_table_gemm_min_t[0] = g_table_gemm_min_t[1] = g_table_gemm_min_t[2] = atoi(e) > 0 ? atoi(e) : 1 << 30;
    e = getenv("BITTERN_PANEL_KB");
    if (e && atoi(e) > 0) g_panel_bytes = (int64_t)atoi(e) * 1024;
}

/* ------------------------------------------------------------------------------------ layouts */

int64_t bt_padded_k(int fmt, int64_t K) {
    int64_t blk = fmt == BT_FMT_2BIT_R4 ? BT_BLOCK_2B : fmt == BT_FMT_1P6BIT_R4 ? BT_BLOCK_1P6 : BT_BLOCK_LUT;
    return (K + blk - 1) / blk * blk;
}

static int64_t row_bytes(int fmt, int64_t Kp) {
    return fmt == BT_FMT_2BIT_R4 ? Kp / 4 : fmt == BT_FMT_1P6BIT_R4 ? Kp / 5 : bt_lut_row_bytes(Kp);
}

/* ------------------------------------------------------------------------------------ quantize */

typedef struct {
    const void *x;
    int dtype;
    int64_t T, K, ldx, ldq;
    int8_t *q;
    float *s;
    int32_t *rowsum;
    const bt_kernels *k;
    int64_t chunk;
    _Atomic int64_t next;
} quant_job;

/* All task functions take work items from a shared counter (see bt_pool.c: a descheduled worker just
 * takes none). */
static void quant_task(void *ctx, int tid, int n) {
    quant_job *j = (quant_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    size_t esz = j->dtype == BT_DT_F32 ? 4 : 2;
    for (;;) {
        int64_t t0 = atomic_fetch_add(&j->next, j->chunk);
        if (t0 >= j->T) break;
        int64_t t1 = t0 + j->chunk < j->T ? t0 + j->chunk : j->T;
        for (int64_t t = t0; t < t1; t++)
            j->k->quantize_row((const char *)j->x + (size_t)(t * j->ldx) * esz, j->dtype, j->K, j->q + t * j->ldq,
                               j->ldq, j->s + t, j->rowsum + t);
    }
}

int bt_quantize(const void *x, int dtype, int64_t T, int64_t K, int64_t ldx, int8_t *q, int64_t ldq, float *s,
                int32_t *rowsum) {
    if (!x || !q || !s || !rowsum || T < 0 || K <= 0 || ldx < K || ldq < K) return -1;
    if (dtype != BT_DT_F32 && dtype != BT_DT_BF16 && dtype != BT_DT_F16) return -2;
    quant_job j = {x, dtype, T, K, ldx, ldq, q, s, rowsum, g_kern, 1, 0};
    int n = g_threads;
    if ((int64_t)n > T) n = (int)T;
    if (T * K < 65536) n = 1; /* not worth waking threads */
    if (n < 1) n = 1;
    j.chunk = (T + 4 * n - 1) / (4 * n);
    atomic_store(&j.next, 0);
    bt_parallel(quant_task, &j, n);
    return 0;
}

/* ------------------------------------------------------------------------------------ matmul */

static _Thread_local uint8_t *tl_buf = NULL;
static _Thread_local size_t tl_cap = 0;

static uint8_t *scratch(size_t bytes) {
    if (bytes > tl_cap) {
        free(tl_buf);
        size_t cap = (bytes + 4095) & ~(size_t)4095;
        tl_buf = (uint8_t *)aligned_alloc(64, cap);
        tl_cap = tl_buf ? cap : 0;
    }
    return tl_buf;
}

typedef struct {
    bt_mm m;
    const bt_kernels *k;
    int64_t group;      /* rows per group: 4, or 32 for GEMV on 1.67bit-lut */
    int64_t ngroups;    /* row groups */
    int64_t chunk;      /* groups per work item */
    int64_t panel_rows; /* GEMM: decoded rows per panel */
    int64_t panel_k;    /* GEMM: decoded panel width (Kp, or for 1.67bit-lut Kp rounded up to 32) */
    int mode;           /* 1 GEMV, 2 panel GEMM, 3 GEMM by tables */
    int nthreads;       /* threads the product is split over */
    _Atomic int64_t next; /* next work item (dynamic schedule: a thread that is descheduled on a
                             busy machine simply takes fewer items) */
    _Atomic int failed;
} mm_job;

/* GEMV of the work item that starts at group g0 */
static void gemv_item(const mm_job *j, int64_t g0) {
    int64_t g1 = g0 + j->chunk < j->ngroups ? g0 + j->chunk : j->ngroups;
    int64_t r1 = g1 * j->group < j->m.N ? g1 * j->group : j->m.N;
    if (j->m.fmt == BT_FMT_1P67BIT_LUT)
        j->k->gemv_lut(&j->m, g0 * j->group, r1);
    else
        j->k->gemv(&j->m, g0 * j->group, r1);
}

static void gemv_task(void *ctx, int tid, int n) {
    mm_job *j = (mm_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    for (;;) {
        int64_t g0 = atomic_fetch_add(&j->next, j->chunk);
        if (g0 >= j->ngroups) break;
        gemv_item(j, g0);
    }
}

static void gemm_task(void *ctx, int tid, int n) {
    mm_job *j = (mm_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    uint8_t *D = NULL;
    const int64_t item_rows = j->chunk * BT_GROUP;
    /* the byte panel: not needed by the tables where the rows convert without it (*-r4 layouts) */
    const int64_t panel_bytes =
        j->mode == 3 && j->m.fmt != BT_FMT_1P67BIT_LUT && j->k->tg_convert_r4 ? 0 : j->panel_rows * j->panel_k;
    for (;;) {
        int64_t g0 = atomic_fetch_add(&j->next, j->chunk);
        if (g0 >= j->ngroups) break;
        /* tables: the item's pattern offsets after the decoded panel */
        if (!D)
            D = scratch((size_t)panel_bytes +
                        (j->mode == 3 ? 2 * (size_t)bt_tg_offsets(bt_tg_ldo(item_rows), j->panel_k) : 0));
        if (!D) {
            atomic_store(&j->failed, 1);
            return;
        }
        int64_t p = g0 * BT_GROUP;
        if (j->mode == 3) {
            bt_mm m = j->m;
            m.Kp = j->panel_k;
            const int64_t R = j->m.N - p < item_rows ? j->m.N - p : item_rows, ldo = bt_tg_ldo(R);
            uint16_t *off = (uint16_t *)(void *)(D + panel_bytes);
            int64_t done = 0; /* rows converted without a byte panel: all *-r4 rows, full 1.67bit-lut groups */
            if (j->m.fmt != BT_FMT_1P67BIT_LUT && j->k->tg_convert_r4) {
                j->k->tg_convert_r4(&j->m, p, R, off, ldo, 0);
                done = R;
            }
            if (j->m.fmt == BT_FMT_1P67BIT_LUT && j->k->tg_convert_lut)
                for (; done + BT_LUT_ROWS <= R && (p + done) / BT_LUT_ROWS < j->m.N / BT_LUT_ROWS; done += BT_LUT_ROWS)
                    j->k->tg_convert_lut(&j->m, (p + done) / BT_LUT_ROWS, j->panel_k, off, ldo, done);
            for (int64_t sub = done; sub < R; sub += j->panel_rows) {
                const int64_t np = R - sub < j->panel_rows ? R - sub : j->panel_rows;
                if (j->m.fmt == BT_FMT_1P67BIT_LUT)
                    bt_lut_decode(&j->m, p + sub, np, D, j->panel_k, j->k->panel_pairs, j->k);
                else
                    j->k->decode(&j->m, p + sub, np, D);
                j->k->tg_convert(D, np, j->panel_k, off, ldo, sub);
            }
            if (j->k->tg_gemm(&m, p, R, off, ldo)) atomic_store(&j->failed, 1);
            continue;
        }
        int64_t np = j->m.N - p < j->panel_rows ? j->m.N - p : j->panel_rows;
        if (j->m.fmt == BT_FMT_1P67BIT_LUT) {
            /* the panel is Kd = Kp rounded up to 32 columns wide (the GEMM works in 32-column slices) */
            bt_mm m = j->m;
            m.Kp = j->panel_k;
            bt_lut_decode(&j->m, p, np, D, j->panel_k, j->k->panel_pairs, j->k);
            j->k->gemm_decoded(&m, p, np, D, 0, j->m.T);
        } else {
            j->k->decode(&j->m, p, np, D);
            j->k->gemm_decoded(&j->m, p, np, D, 0, j->m.T);
        }
    }
}

/* 1.67bit-lut GEMV tables of the caller's activations. Products that share one input (q, k and v;
 * gate and up) would build the same tables, so the last tables are kept per thread together with a
 * copy of the activations they came from, and reused when the new activations are byte-identical. */
static _Thread_local uint8_t *tl_tab = NULL;
static _Thread_local int8_t *tl_tab_q = NULL;
static _Thread_local size_t tl_tab_cap = 0, tl_tab_qcap = 0;
static _Thread_local int64_t tl_tab_T = -1, tl_tab_kp = -1;
static _Thread_local const bt_kernels *tl_tab_kern = NULL;

static const uint8_t *lut_tables_for(const int8_t *q, int64_t ldq, int64_t T, int64_t Kp) {
    const size_t per = (size_t)(Kp / 3) * (size_t)g_kern->lut_table_bytes;
    int same = tl_tab_T == T && tl_tab_kp == Kp && tl_tab_kern == g_kern;
    for (int64_t t = 0; same && t < T; t++) same = !memcmp(tl_tab_q + t * Kp, q + t * ldq, (size_t)Kp);
    if (same) return tl_tab;
    tl_tab_T = -1;
    if (per * (size_t)T > tl_tab_cap) {
        free(tl_tab);
        tl_tab = (uint8_t *)aligned_alloc(64, (per * (size_t)T + 63) / 64 * 64);
        tl_tab_cap = tl_tab ? per * (size_t)T : 0;
        if (!tl_tab) return NULL;
    }
    if ((size_t)(T * Kp) > tl_tab_qcap) {
        free(tl_tab_q);
        tl_tab_q = (int8_t *)malloc((size_t)(T * Kp));
        tl_tab_qcap = tl_tab_q ? (size_t)(T * Kp) : 0;
        if (!tl_tab_q) return NULL;
    }
    for (int64_t t = 0; t < T; t++) {
        g_kern->lut_tables(q + t * ldq, Kp, tl_tab + per * (size_t)t);
        memcpy(tl_tab_q + t * Kp, q + t * ldq, (size_t)Kp);
    }
    tl_tab_T = T;
    tl_tab_kp = Kp;
    tl_tab_kern = g_kern;
    return tl_tab;
}

#define BT_STACK_T 64

/* Checks the arguments of one product and fills j for mode 0 (auto), 1 (GEMV) or 2 (GEMM) on the
 * library's threads; f (T floats) receives gamma / s[t] when y is given. Returns 0 or the error code of
 * bt_matmul_mode. j->chunk is the GEMV work item in groups (or the GEMM panel in groups). */
static int mm_prepare(mm_job *j, int mode, int fmt, const uint8_t *w, int64_t N, int64_t K, const int8_t *q,
                      int64_t ldq, const int32_t *rowsum, const float *s, int64_t T, float gamma, float *y,
                      int32_t *yi, int64_t ldy, float *f) {
    if (fmt != BT_FMT_2BIT_R4 && fmt != BT_FMT_1P6BIT_R4 && fmt != BT_FMT_1P67BIT_LUT) return -2;
    if (mode < 0 || mode > 3) return -1;
    if (!w || !q || !rowsum || (!y && !yi) || (y && !s) || N <= 0 || K <= 0 || T < 0 || ldy < N) return -1;
    int64_t Kp = bt_padded_k(fmt, K);
    if (ldq < Kp) return -3;
    if (fmt == BT_FMT_1P67BIT_LUT && Kp / 3 > 32767) return -1; /* per-row counts are int16 */
    const int64_t Kd = fmt == BT_FMT_1P67BIT_LUT ? (Kp + 31) / 32 * 32 : Kp;
    if (y)
        for (int64_t t = 0; t < T; t++) f[t] = gamma / s[t]; /* float32 division, as quant.rescale */
    memset(j, 0, sizeof(*j));
    j->m.fmt = fmt;
    j->m.w = w;
    j->m.N = N;
    j->m.K = K;
    j->m.Kp = Kp;
    j->m.row_bytes = row_bytes(fmt, Kp);
    j->m.q = q;
    j->m.ldq = ldq;
    j->m.rowsum = rowsum;
    j->m.f = y ? f : NULL;
    j->m.T = T;
    j->m.y = y;
    j->m.yi = yi;
    j->m.ldy = ldy;
    j->k = g_kern;
    j->panel_k = Kd;
    if (mode == 0) mode = T <= g_gemv_max_t[fmt] ? 1 : T >= g_table_gemm_min_t[fmt] ? 3 : 2;
    if (mode == 3 && !(g_kern->tg_gemm && g_kern->panel_pairs)) mode = 2; /* tables only where the ISA has them */
    if (mode >= 2 && ldq < Kd && T > 0) return -3; /* the GEMM reads Kd zero-padded activation columns */
    j->mode = mode;
    j->group = mode == 1 && fmt == BT_FMT_1P67BIT_LUT ? BT_LUT_ROWS : BT_GROUP;
    j->ngroups = (N + j->group - 1) / j->group;
    int n = g_threads;
    if ((int64_t)n > j->ngroups) n = (int)j->ngroups;
    if (n < 1) n = 1;
    j->nthreads = n;
    if (T > 0 && mode == 1 && fmt == BT_FMT_1P67BIT_LUT && g_kern->lut_tables) {
        j->m.lut = lut_tables_for(q, ldq, T, Kp);
        if (!j->m.lut) return -4;
    }
    if (mode == 1) {
        /* work items of ~g_item_bytes of weights (at least 1 group), several per thread */
        int64_t group_bytes = j->group * j->m.row_bytes;
        int64_t c = (g_item_bytes + group_bytes - 1) / group_bytes;
        int64_t fair = (j->ngroups + 4 * n - 1) / (4 * n);
        j->chunk = n == 1 ? j->ngroups : c < fair ? c : fair;
        if (j->chunk < 1) j->chunk = 1;
        /* 1.67bit-lut: the AVX2 GEMV reads two 32-row groups per pass (a lone group costs a full pass),
         * so items hold whole pairs */
        if (fmt == BT_FMT_1P67BIT_LUT && (j->chunk & 1) && j->chunk < j->ngroups) j->chunk++;
    } else if (mode == 3) {
        /* work items of many rows: each thread builds the tables once per item, so one item per thread (the
         * thread's share of rows, at most 4096; measured on 2 threads: 384 vs 347 G MAC/s with two items
         * each at 2560 x 2560, T = 128), in multiples of 32 rows (whole 1.67bit-lut groups). Rows are
         * decoded and converted in panels of panel_rows. */
        int64_t R = (N + n - 1) / n;
        if (R > 4096) R = 4096;
        /* per-thread scratch per row: offsets (Kd / 2 bytes) and int32 sums (64 bytes per 16 tokens of a block
         * of BT_TG_BLOCK_TILES tiles); at most ~16 MB (a 70B-shaped 28672-column product would otherwise take
         * 58 MB per thread; 2B4T shapes stay in one item) */
        const int64_t tiles = (T + 15) / 16 < BT_TG_BLOCK_TILES ? (T + 15) / 16 : BT_TG_BLOCK_TILES;
        const int64_t per_row = Kd / 2 + tiles * 64, cap = ((int64_t)16 << 20) / per_row;
        if (R > cap) R = cap > BT_LUT_ROWS ? cap : BT_LUT_ROWS;
        R = (R + BT_LUT_ROWS - 1) / BT_LUT_ROWS * BT_LUT_ROWS;
        int64_t pr = g_panel_bytes / (Kd < BT_KC_BYTES ? Kd : BT_KC_BYTES) / BT_LUT_ROWS * BT_LUT_ROWS;
        if (pr < BT_LUT_ROWS) pr = BT_LUT_ROWS;
        j->panel_rows = pr < R ? pr : R;
        j->chunk = R / BT_GROUP;
    } else {
        /* one work item per panel of decoded rows (a multiple of the 4-row group); one K chunk of the
         * panel (at most BT_KC_BYTES columns, see the AVX2 GEMM) should fit in L2 */
        int64_t pr = g_panel_bytes / (Kd < BT_KC_BYTES ? Kd : BT_KC_BYTES) / BT_GROUP * BT_GROUP;
        int64_t fair = (N + n - 1) / n; /* small N: still give every thread a panel */
        fair = (fair + BT_GROUP - 1) / BT_GROUP * BT_GROUP;
        if (pr > fair) pr = fair;
        if (pr < BT_GROUP) pr = BT_GROUP;
        if (pr > BT_MAX_PANEL_ROWS) pr = BT_MAX_PANEL_ROWS;
        /* 1.67bit-lut decodes whole 32-row groups: panels of whole groups waste no decoding */
        if (fmt == BT_FMT_1P67BIT_LUT && pr >= BT_LUT_ROWS) pr = pr / BT_LUT_ROWS * BT_LUT_ROWS;
        j->panel_rows = pr;
        j->chunk = pr / BT_GROUP;
    }
    atomic_store(&j->next, 0);
    return 0;
}

int bt_matmul_mode(int mode, int fmt, const uint8_t *w, int64_t N, int64_t K, const int8_t *q, int64_t ldq,
                   const int32_t *rowsum, const float *s, int64_t T, float gamma, float *y, int32_t *yi,
                   int64_t ldy) {
    float fstack[BT_STACK_T];
    float *f = fstack;
    if (y && T > BT_STACK_T) {
        f = (float *)malloc(sizeof(float) * (size_t)T);
        if (!f) return -4;
    }
    mm_job j;
    int rc = mm_prepare(&j, mode, fmt, w, N, K, q, ldq, rowsum, s, T, gamma, y, yi, ldy, f);
    if (!rc && T > 0) bt_parallel(j.mode == 1 ? gemv_task : gemm_task, &j, j.nthreads);
    if (f != fstack) free(f);
    if (rc) return rc;
    return atomic_load(&j.failed) ? -4 : 0;
}

/* ------------------------------------------------------------------------------ several products */

#define BT_MANY_MAX 8
#define BT_MANY_ITEMS 1024

typedef struct {
    mm_job *jobs;
    int16_t item_job[BT_MANY_ITEMS]; /* work item i: product item_job[i], its item item_idx[i] */
    int32_t item_idx[BT_MANY_ITEMS];
    int64_t nitems;
    _Atomic int64_t next;
} many_job;

static void many_task(void *ctx, int tid, int n) {
    many_job *mj = (many_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    for (;;) {
        int64_t i = atomic_fetch_add(&mj->next, 1);
        if (i >= mj->nitems) break;
        const mm_job *j = &mj->jobs[mj->item_job[i]];
        gemv_item(j, (int64_t)mj->item_idx[i] * j->chunk);
    }
}

int bt_matmul_many(int count, const int *fmt, const uint8_t *const *w, const int64_t *N, int64_t K, const int8_t *q,
                   int64_t ldq, const int32_t *rowsum, const float *s, int64_t T, const float *gamma,
                   float *const *y, const int64_t *ldy) {
    if (count <= 0 || count > BT_MANY_MAX || !fmt || !w || !N || !gamma || !y || !ldy || T < 0) return -1;
    if (T > BT_STACK_T) { /* prefill-sized: the GEMM of each product on all threads, one after another */
        for (int i = 0; i < count; i++) {
            int rc = bt_matmul_mode(0, fmt[i], w[i], N[i], K, q, ldq, rowsum, s, T, gamma[i], y[i], NULL, ldy[i]);
            if (rc) return rc;
        }
        return 0;
    }
    mm_job jobs[BT_MANY_MAX];
    float f[BT_MANY_MAX][BT_STACK_T];
    int gemv = 1;
    for (int i = 0; i < count; i++) {
        int rc = mm_prepare(&jobs[i], 0, fmt[i], w[i], N[i], K, q, ldq, rowsum, s, T, gamma[i], y[i], NULL, ldy[i], f[i]);
        if (rc) return rc;
        gemv &= jobs[i].mode == 1;
    }
    if (T == 0) return 0;
    many_job mj;
    mj.jobs = jobs;
    mj.nitems = 0;
    int64_t counts[BT_MANY_MAX], taken[BT_MANY_MAX], total = 0;
    for (int i = 0; i < count; i++) {
        counts[i] = (jobs[i].ngroups + jobs[i].chunk - 1) / jobs[i].chunk;
        taken[i] = 0;
        total += counts[i];
    }
    if (!gemv || g_threads <= 1 || count == 1 || total > BT_MANY_ITEMS) {
        /* GEMM-sized, one thread, or too many items: one product after another, as bt_matmul would */
        for (int i = 0; i < count; i++) {
            bt_parallel(jobs[i].mode == 1 ? gemv_task : gemm_task, &jobs[i], jobs[i].nthreads);
            if (atomic_load(&jobs[i].failed)) return -4;
        }
        return 0;
    }
    /* interleave the products' items in proportion to their counts, so both threads stream from the
     * whole group at once and the small products (k, v) share the dispatch of the big one */
    for (int64_t it = 0; it < total; it++) {
        int best = -1;
        double best_frac = 2.0;
        for (int i = 0; i < count; i++) {
            if (taken[i] >= counts[i]) continue;
            double frac = ((double)taken[i] + 0.5) / (double)counts[i];
            if (frac < best_frac) {
                best_frac = frac;
                best = i;
            }
        }
        mj.item_job[it] = (int16_t)best;
        mj.item_idx[it] = (int32_t)taken[best]++;
    }
    mj.nitems = total;
    atomic_store(&mj.next, 0);
    bt_parallel(many_task, &mj, g_threads);
    return 0;
}

int bt_matmul(int fmt, const uint8_t *w, int64_t N, int64_t K, const int8_t *q, int64_t ldq, const int32_t *rowsum,
              const float *s, int64_t T, float gamma, float *y, int32_t *yi, int64_t ldy) {
    return bt_matmul_mode(0, fmt, w, N, K, q, ldq, rowsum, s, T, gamma, y, yi, ldy);
}

/* ------------------------------------------------------------------------------------ roofline */

typedef struct {
    const uint8_t *p;
    int64_t n, prefetch, chunk;
    const bt_kernels *k;
    _Atomic int64_t next;
    _Atomic uint64_t hash;
} read_job;

/* Same work items as the GEMV (taken from a shared counter), so the roofline read and the kernel
 * share their memory access pattern and threading. */
static void read_task(void *ctx, int tid, int n) {
    read_job *j = (read_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    uint64_t h = 0;
    for (;;) {
        int64_t a = atomic_fetch_add(&j->next, j->chunk);
        if (a >= j->n) break;
        int64_t b = a + j->chunk < j->n ? a + j->chunk : j->n;
        h ^= j->k->stream_read(j->p + a, b - a, j->prefetch);
    }
    atomic_fetch_xor(&j->hash, h);
}

uint64_t bt_stream_read(const uint8_t *p, int64_t nbytes, int64_t prefetch_bytes) {
    read_job j;
    memset(&j, 0, sizeof(j));
    j.p = p;
    j.n = nbytes;
    j.prefetch = prefetch_bytes;
    j.k = g_kern;
    int n = g_threads;
    /* the GEMV's item rule (a multiple of 4 KB, so the checksum of whole 64-bit words is unchanged) */
    int64_t fair = (nbytes + 4 * n - 1) / (4 * n);
    j.chunk = n == 1 ? (nbytes > 0 ? nbytes : 1) : (g_item_bytes < fair ? g_item_bytes : fair);
    j.chunk = (j.chunk + 4095) / 4096 * 4096;
    atomic_store(&j.next, 0);
    atomic_store(&j.hash, 0);
    bt_parallel(read_task, &j, n);
    return atomic_load(&j.hash);
}

/* ------------------------------------------------------------------------------------ benchmark */

#include <time.h>

static double clock_s(int cpu) {
    struct timespec ts;
    clock_gettime(cpu ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Times `rounds` passes over nw weight copies (so the working set can exceed the caches), without any
 * Python in the loop. what bit 0 clear: bt_matmul_mode(mode, ...) on each copy; set: bt_stream_read of the
 * same bytes (prefetch_bytes ahead). what bit 1 set: time with the calling thread's CPU clock instead of
 * the wall clock (single-thread tuning on a busy machine). times[r] receives the seconds per call of round r. */
int bt_bench(int what, int mode, int fmt, const uint8_t *const *ws, int nw, int64_t N, int64_t K, const int8_t *q,
             int64_t ldq, const int32_t *rowsum, const float *s, int64_t T, float gamma, float *y, int64_t ldy,
             int64_t prefetch_bytes, int rounds, double *times) {
    if (nw <= 0 || rounds <= 0 || !times) return -1;
    int64_t nbytes = N * row_bytes(fmt, bt_padded_k(fmt, K));
    volatile uint64_t sink = 0;
    for (int r = 0; r < rounds; r++) {
        double t0 = clock_s(what & 2);
        for (int i = 0; i < nw; i++) {
            if (!(what & 1)) {
                int rc = bt_matmul_mode(mode, fmt, ws[i], N, K, q, ldq, rowsum, s, T, gamma, y, NULL, ldy);
                if (rc) return rc;
            } else {
                sink ^= bt_stream_read(ws[i], nbytes, prefetch_bytes);
            }
        }
        times[r] = (clock_s(what & 2) - t0) / nw;
    }
    (void)sink;
    return 0;
}
