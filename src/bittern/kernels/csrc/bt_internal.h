/* Internal interfaces shared by the bittern C files: the per-ISA kernel table and the thread pool. */
#ifndef BT_INTERNAL_H
#define BT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bittern.h"

#define BT_GROUP 4          /* rows interleaved per group in the *-r4 layouts */
#define BT_BLOCK_2B 128     /* columns per 32-byte block, 2bit-r4 */
#define BT_BLOCK_1P6 160    /* columns per 32-byte block, 1.6bit-r4 */
#define BT_BLOCK_LUT 24     /* columns per block (8 triples), 1.67bit-lut */
#define BT_LUT_ROWS 32      /* rows per group, 1.67bit-lut */
#define BT_SLICE 32         /* columns per SIMD slice (one 256-bit vector of int8) */
#ifndef BT_WIDEN_SLICES
/* int16 partial sums of maddubs products are widened to int32 at least every 64 products: each
 * product lane is (c+1)*q + (c+1)*q in [-512, 508], so 64 of them stay in [-32768, 32512]. */
#define BT_WIDEN_SLICES 64
#endif
#define BT_MAX_PANEL_ROWS 1024 /* rows of decoded weights per GEMM panel, at most */
#ifndef BT_KC_SLICES
#define BT_KC_SLICES 108 /* GEMM K chunk in 32-column slices: 4 tokens x 3456 columns stay in L1 */
#endif
#define BT_KC_BYTES (32 * BT_KC_SLICES)
#define BT_TG_WINDOW 7 /* table GEMM: 32-column slices summed in int16 (7 x 32 x 128 = 28672 <= 32767) */
#define BT_TG_BLOCK_TILES 8 /* table GEMM: 16-token tiles whose int32 sums are kept at once */

#define BT_UNUSED(x) (void)(x)

#if defined(__GNUC__)
#define BT_INLINE static inline __attribute__((always_inline))
#define BT_RESTRICT __restrict__
#else
#define BT_INLINE static inline
#define BT_RESTRICT
#endif

/* One matrix product: everything a kernel needs to produce rows [row0, row1) of y for all tokens. */
typedef struct {
    int fmt;
    const uint8_t *w;     /* packed weights in the fmt layout */
    int64_t N, K, Kp;     /* rows, logical columns, padded columns of the layout */
    int64_t row_bytes;    /* Kp/4 or Kp/5 */
    const int8_t *q;      /* activations [T, ldq] */
    int64_t ldq;
    const int32_t *rowsum;/* per-token sum of q */
    const float *f;       /* per-token gamma / s[t] (float32) */
    int64_t T;
    float *y;             /* [T, ldy] float out, or NULL */
    int32_t *yi;          /* [T, ldy] raw int32 out when y == NULL */
    int64_t ldy;
    const uint8_t *lut;   /* 1.67bit-lut GEMV: per-token tables (lut_table_bytes per triple), or NULL */
} bt_mm;

/* Writes the output of row n for token t from the raw (offset) accumulator: acc = raw - rowsum[t]. */
BT_INLINE void bt_store(const bt_mm *a, int64_t t, int64_t n, int32_t raw) {
    int32_t acc = raw - a->rowsum[t];
    if (a->y)
        a->y[t * a->ldy + n] = (float)acc * a->f[t];
    else
        a->yi[t * a->ldy + n] = acc;
}

/* Pattern offsets (uint16) of a table-GEMM item of R rows and Kd columns: 8 per row and 32-column slice. */
BT_INLINE int64_t bt_tg_offsets(int64_t R, int64_t Kd) { return R * (Kd / 32) * 8; }

/* Rows between one slice's offsets and the next's for an item of R rows: R rounded up to whole 64-byte
 * lines (4 rows of 16 bytes), then to an odd number of lines. The conversion writes every slice of a row
 * group at once (~80 store streams at 2560 columns); with a slice stride that is a multiple of 4 KB (R a
 * multiple of 256, as items are) all of them fall in one L1 set and evict each other: 6912 x 2560, 16
 * tokens, one Zen 3 core, 145 -> 180 G MAC/s. */
BT_INLINE int64_t bt_tg_ldo(int64_t R) { return 4 * (((R + 3) / 4) | 1); }

/* Address of row group g (rows 4g..4g+3) of a *-r4 layout. */
BT_INLINE const uint8_t *bt_group_ptr(const bt_mm *a, int64_t g) {
    return a->w + g * (int64_t)BT_GROUP * a->row_bytes;
}

typedef struct {
    const char *name;
    /* one token: q[0..Kpad) with zero padding after K; *s and *rowsum */
    void (*quantize_row)(const void *x, int dtype, int64_t K, int8_t *q, int64_t Kpad, float *s, int32_t *rowsum);
    /* GEMV for rows [row0, row1) (row0 a multiple of 4), every token t < T, one token at a time */
    void (*gemv)(const bt_mm *a, int64_t row0, int64_t row1);
    /* decode rows [row0, row0+nrows) to bytes code+1 in {0,1,2}: dst[r * Kp + k] */
    void (*decode)(const bt_mm *a, int64_t row0, int64_t nrows, uint8_t *dst);
    /* GEMM of decoded rows D [nrows, Kp] against tokens [t0, t1); writes y via bt_store */
    void (*gemm_decoded)(const bt_mm *a, int64_t row0, int64_t nrows, const uint8_t *D, int64_t t0, int64_t t1);
    /* streaming read of [p, p+n) */
    uint64_t (*stream_read)(const uint8_t *p, int64_t n, int64_t prefetch);
    /* 1.67bit-lut GEMV for rows [row0, row1) (row0 a multiple of 32), tables in a->lut */
    void (*gemv_lut)(const bt_mm *a, int64_t row0, int64_t row1);
    /* the GEMV's per-token tables for q[0..Kp): lut_table_bytes per triple (0: no tables) */
    void (*lut_tables)(const int8_t *q, int64_t Kp, uint8_t *tab);
    int lut_table_bytes;
    int panel_pairs; /* gemm_decoded reads the pair-interleaved panel (see bt_lut_decode) */
    /* decodes one 160-byte block of a full 32-row group to codes + 1, row r at tmp + 32 r (NULL: portable) */
    void (*lut_decode_block)(const uint8_t *blk, uint8_t *tmp);
    /* decodes all nb blocks of a full group (block b at blk + b * stride) into the pair-interleaved panel,
     * the group's row 0 at dst (an even panel row), rows width bytes long (NULL: per block via tmp) */
    void (*lut_decode_group)(const uint8_t *blk, int64_t stride, int64_t nb, uint8_t *dst, int64_t width);
    /* GEMM by tables of token vectors (NULL: not on this ISA). tg_convert: nrows decoded panel rows
     * (pair-interleaved, Kd wide) to the pattern offsets of rows r0.. of an item of ldo rows (uint16,
     * bt_tg_offsets(ldo, Kd) of them); tg_gemm: rows [row0, row0 + R) of every token from the offsets of
     * an item of ldo rows (bt_tg_ldo(R)), a->Kp = Kd; returns 0 or -4. */
    void (*tg_convert)(const uint8_t *D, int64_t nrows, int64_t Kd, uint16_t *off, int64_t ldo, int64_t r0);
    int (*tg_gemm)(const bt_mm *a, int64_t row0, int64_t R, const uint16_t *off, int64_t ldo);
    /* 1.67bit-lut: full group g (32 rows) to the offsets of item rows r0..r0+31, without a panel (NULL: decode
     * and tg_convert) */
    void (*tg_convert_lut)(const bt_mm *a, int64_t g, int64_t Kd, uint16_t *off, int64_t ldo, int64_t r0);
    /* *-r4 layouts: rows [row0, row0 + nrows) (row0 a multiple of 4) to the offsets of item rows r0.., without a
     * panel (NULL: decode and tg_convert) */
    void (*tg_convert_r4)(const bt_mm *a, int64_t row0, int64_t nrows, uint16_t *off, int64_t ldo, int64_t r0);
} bt_kernels;

extern const bt_kernels bt_kernels_scalar;
#if defined(__x86_64__) || defined(__i386__)
#define BT_HAVE_AVX2_BUILD 1
extern const bt_kernels bt_kernels_avx2;
#endif
#if defined(__aarch64__)
#define BT_HAVE_NEON_BUILD 1
extern const bt_kernels bt_kernels_neon;
#endif

/* ---- 1.67bit-lut (bt_lut.c) ---- */
int64_t bt_lut_row_bytes(int64_t Kp);
const uint8_t *bt_lut_group_ptr(const bt_mm *a, int64_t g);
/* Full group g (g < N / 32): block b at bt_lut_block0(a, g) + b * bt_lut_block_stride(a, g) (groups 2p and
 * 2p + 1 interleave their blocks), the 32 int16 counts at bt_lut_counts(a, g). */
const uint8_t *bt_lut_block0(const bt_mm *a, int64_t g);
int64_t bt_lut_block_stride(const bt_mm *a, int64_t g);
const uint8_t *bt_lut_counts(const bt_mm *a, int64_t g);
int32_t bt_lut_neg_count(const bt_mm *a, int64_t n);
int32_t bt_lut_dot_row(const bt_mm *a, int64_t n, const int8_t *q);
void bt_lut_gemv_scalar(const bt_mm *a, int64_t row0, int64_t row1);
void bt_lut_decode_block(const uint8_t *blk, uint8_t *tmp);
void bt_lut_decode(const bt_mm *a, int64_t row0, int64_t nrows, uint8_t *dst, int64_t width, int pairs,
                   const bt_kernels *k);

/* ---- thread pool ---- */
typedef void (*bt_task_fn)(void *ctx, int tid, int nthreads);
/* Runs fn(ctx, tid, n) for tid in [0, n) on n threads (the caller is tid 0) and waits for all. */
void bt_parallel(bt_task_fn fn, void *ctx, int n);
int bt_online_cpus(void);
const char *bt_pool_name(void);
void bt_pool_resize(int n);
void bt_pool_idle(void);

/* ---- shared scalar helpers (bit-exact definitions) ---- */
float bt_half_to_float(uint16_t h);
float bt_bf16_to_float(uint16_t h);

#endif
