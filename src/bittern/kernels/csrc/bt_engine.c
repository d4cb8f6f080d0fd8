/* The engine's kernels besides the ternary products: the LM head in int8 or 6-bit rows with one float
 * scale per row, and the per-token decode glue (residual + RMSNorm + int8 quantisation, RoPE + KV store
 * + grouped-query attention, gated activation + sub-norm + quantisation).
 *
 * Head arithmetic (both formats): the activations are quantised per token as for the ternary layers
 * (bt_quantize: q, s, rowsum), acc = sum_k q[k] * code[n, k] exact in int32, and
 * y[t, n] = (float)acc * (scale[n] / s[t]).
 *
 * Head layouts (row-major, one row per vocabulary entry, rows read front to back):
 *   BT_HEAD_I8  K bytes per row: int8 codes in [-127, 127], scale = max|w| / 127.
 *   BT_HEAD_I6  Kp = 128 * ceil(K / 128) columns, 96 bytes per 128-column block (three 32-byte vectors
 *               V0..V2); codes in [-31, 31], scale = max|w| / 31, stored as v = code + 32 in [1, 63]
 *               (padding columns hold 32). Column 32 i + j of a block (j = 0..31):
 *               i = 0..2: bits 0-5 of V_i[j];
 *               i = 3:    bits 6-7 of V0[j] = v & 3, of V1[j] = (v >> 2) & 3, of V2[j] = v >> 4.
 *               The kernel multiplies v (unsigned) with q and subtracts 32 * rowsum.
 *   BT_HEAD_I5  Kp = 256 * ceil(K / 256) columns, 160 bytes per 256-column block (five 32-byte vectors
 *               V0..V4); codes in [-15, 15], scale = max|w| / 15, stored as v = code + 16 in [1, 31]
 *               (padding columns hold 16). Column 32 i + j of a block (j = 0..31):
 *               i = 0..4: bits 0-4 of V_i[j] (one and extracts it);
 *               i = 5:    bits 5-7 of V0[j] = v & 7, bits 5-6 of V1[j] = v >> 3;
 *               i = 6:    bits 5-7 of V2[j] = v & 7, bits 5-6 of V3[j] = v >> 3;
 *               i = 7:    bits 5-7 of V4[j] = v & 7, bit 7 of V1[j] = (v >> 3) & 1, bit 7 of V3[j] = v >> 4.
 *               The kernel subtracts 16 * rowsum.
 */
#define _DEFAULT_SOURCE 1 /* madvise, sysconf under -std=c11 */
#include "bt_internal.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BT_ENGINE_X86 1
#endif

enum { BT_KV_F32 = 0, BT_KV_F16 = 1, BT_KV_BF16 = 2, BT_KV_I8 = 3 };

static inline size_t kv_elem_size(int dt) { return dt == BT_KV_F32 ? 4 : dt == BT_KV_I8 ? 1 : 2; }

/* float32 -> IEEE half, round to nearest even (as _cvtss_sh and torch) */
static uint16_t bt_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to infinity */
    if (ax < 0x38800000u) {                                    /* below 2^-14: a subnormal half */
        float v;
        memcpy(&v, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.0f));
    }
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* float32 -> bfloat16, round to nearest even */
static uint16_t bt_float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static int use_avx2(void) { return bt_get_isa() == BT_ISA_AVX2; }

/* ------------------------------------------------------------------------------------------------
 * glue: compiled twice from bt_engine_impl.h
 */

#include "bt_engine_impl.h"
#ifdef BT_ENGINE_X86
#define BT_GLUE_AVX2 1
#include "bt_engine_impl.h"
#undef BT_GLUE_AVX2
#endif

int bt_eng_norm_quant(float *x, const float *delta, const float *w, float eps, int64_t T, int64_t K, float *y_out,
                      int8_t *q, int64_t ldq, float *s, int32_t *rowsum) {
#ifdef BT_ENGINE_X86
    if (use_avx2()) {
        norm_quant_avx2(x, delta, w, eps, T, K, y_out, q, ldq, s, rowsum);
        return 0;
    }
#endif
    norm_quant_generic(x, delta, w, eps, T, K, y_out, q, ldq, s, rowsum);
    return 0;
}

/* Rows of a many-row activation/quantisation (a prefill) on the pool: each row is computed alone, so
 * the result does not depend on the threads. */
typedef struct {
    float *gu;
    int64_t T, F, ldq;
    int act, avx2;
    const float *w;
    float eps;
    int8_t *q;
    float *s;
    int32_t *rowsum;
    _Atomic int64_t next;
} act_quant_job;

static void act_quant_task(void *ctx, int tid, int n) {
    act_quant_job *j = (act_quant_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    for (;;) {
        const int64_t t = atomic_fetch_add(&j->next, 1);
        if (t >= j->T) break;
        float *g = j->gu + t * 2 * j->F;
#ifdef BT_ENGINE_X86
        if (j->avx2) {
            act_quant_avx2(g, 1, j->F, j->act, j->w, j->eps, j->q + t * j->ldq, j->ldq, j->s + t, j->rowsum + t);
            continue;
        }
#endif
        act_quant_generic(g, 1, j->F, j->act, j->w, j->eps, j->q + t * j->ldq, j->ldq, j->s + t, j->rowsum + t);
    }
}

#define BT_ACT_QUANT_PARALLEL_MIN 65536 /* rows x columns: below, one thread */

int bt_eng_act_quant(float *gu, int64_t T, int64_t F, int act, const float *w, float eps, int8_t *q, int64_t ldq,
                     float *s, int32_t *rowsum) {
    int n = bt_get_threads();
    if ((int64_t)n > T) n = (int)T;
    if (n > 1 && T * F >= BT_ACT_QUANT_PARALLEL_MIN) {
        act_quant_job j = {.gu = gu, .T = T, .F = F, .ldq = ldq, .act = act, .avx2 = use_avx2(), .w = w, .eps = eps,
                           .q = q, .s = s, .rowsum = rowsum};
        atomic_store(&j.next, 0);
        bt_parallel(act_quant_task, &j, n);
        return 0;
    }
#ifdef BT_ENGINE_X86
    if (use_avx2()) {
        act_quant_avx2(gu, T, F, act, w, eps, q, ldq, s, rowsum);
        return 0;
    }
#endif
    act_quant_generic(gu, T, F, act, w, eps, q, ldq, s, rowsum);
    return 0;
}

int bt_eng_attend(float *qkv, int64_t H, int64_t KVH, int64_t hd, int64_t pos, const float *cos, const float *sin,
                  void *kc, void *vc, float *ks, float *vs, int dt, int64_t max_len, float *out, float *scores) {
    if (H <= 0 || KVH <= 0 || H % KVH || hd <= 0 || pos < 0 || pos >= max_len || dt < 0 || dt > 3) return -1;
    if (dt == BT_KV_I8 && (!ks || !vs)) return -1;
#ifdef BT_ENGINE_X86
    if (use_avx2()) {
        attend_avx2(qkv, H, KVH, hd, pos, cos, sin, kc, vc, ks, vs, dt, max_len, out, scores);
        return 0;
    }
#endif
    attend_generic(qkv, H, KVH, hd, pos, cos, sin, kc, vc, ks, vs, dt, max_len, out, scores);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * decode: the layer loop (bittern.h documents the argument arrays)
 */

/* Attention of all B rows of a layer in one pool dispatch (AVX2 path). rows[2b], rows[2b+1]: slot and
 * position of row b; the layer's planes start at slot index plane0 = layer * nslots. Batched only when no
 * row needs a position that a later row of its slot writes, i.e. positions rise within every slot (a
 * prefill of one or several sequences, a decode step). Returns 0 when done, 1 when the caller must run
 * the rows one by one, -1 on bad arguments. */
#ifdef BT_ENGINE_X86
static int attend_batched(float *qkv, int64_t ldqkv, int64_t B, const int64_t *rows, int64_t layer, int64_t nslots,
                          int64_t H, int64_t KVH, int64_t hd, const float *cos, const float *sin, char *kbase, char *vbase,
                          char *ksbase, char *vsbase, int64_t plane, int64_t splane, int dt, int64_t max_len, float *out,
                          int64_t ldout) {
    if (B < 2 || !use_avx2()) return 1;
    if (H <= 0 || KVH <= 0 || H % KVH || hd <= 0 || dt < 0 || dt > 3 || nslots <= 0) return -1;
    if (dt == BT_KV_I8 && (!ksbase || !vsbase)) return -1;
    int64_t last_small[64];
    int64_t *last = nslots <= 64 ? last_small : malloc((size_t)nslots * sizeof *last);
    if (!last) return 1;
    for (int64_t s = 0; s < nslots; s++) last[s] = -1;
    int rc = 0;
    for (int64_t b = 0; b < B && rc != -1; b++) {
        const int64_t slot = rows[2 * b], pos = rows[2 * b + 1];
        if (slot < 0 || slot >= nslots || pos < 0 || pos >= max_len) rc = -1;
        else if (pos <= last[slot]) rc = 1; /* a repeated or falling position: row by row */
        else last[slot] = pos;
    }
    if (last != last_small) free(last);
    if (rc) return rc;
    return attend_rows_avx2(qkv, ldqkv, B, rows, layer * nslots, H, KVH, hd, cos, sin, kbase, vbase, ksbase, vsbase,
                            plane, splane, dt, max_len, out, ldout)
               ? 1
               : 0;
}
#endif

static inline float bits_to_float(int64_t v) {
    uint32_t u = (uint32_t)v;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define P_(v) ((void *)(intptr_t)(v))

int bt_eng_decode_layers(const int64_t *bufs, const int64_t *plan, int64_t nlayers, const int64_t *rows, int64_t B) {
    if (!bufs || !plan || !rows || nlayers < 0 || B <= 0) return -1;
    const int64_t h = bufs[BT_DEC_HIDDEN], f = bufs[BT_DEC_FFN], H = bufs[BT_DEC_H], KVH = bufs[BT_DEC_KVH];
    const int64_t hd = bufs[BT_DEC_HD], ldh = bufs[BT_DEC_LDH], ldf = bufs[BT_DEC_LDF], max_len = bufs[BT_DEC_MAXLEN];
    const int64_t kvd = KVH * hd, row_qkv = h + 2 * kvd, plane = bufs[BT_DEC_PLANE], splane = bufs[BT_DEC_SPLANE];
    const float eps = bits_to_float(bufs[BT_DEC_EPS]);
    const int act = (int)bufs[BT_DEC_ACT], dt = (int)bufs[BT_DEC_KVDT];
    float *x = P_(bufs[BT_DEC_X]), *xn = P_(bufs[BT_DEC_XN]), *qkv = P_(bufs[BT_DEC_QKV]), *attn = P_(bufs[BT_DEC_ATTN]);
    float *o = P_(bufs[BT_DEC_O]), *gu = P_(bufs[BT_DEC_GU]), *down = P_(bufs[BT_DEC_DOWN]);
    int8_t *qh = P_(bufs[BT_DEC_QH]), *qf = P_(bufs[BT_DEC_QF]);
    float *s = P_(bufs[BT_DEC_S]), *scores = P_(bufs[BT_DEC_SCORES]);
    int32_t *rs = P_(bufs[BT_DEC_RS]);
    const float *cos = P_(bufs[BT_DEC_COS]), *sin = P_(bufs[BT_DEC_SIN]);
    char *kbase = P_(bufs[BT_DEC_KBASE]), *vbase = P_(bufs[BT_DEC_VBASE]);
    char *ksbase = P_(bufs[BT_DEC_KSBASE]), *vsbase = P_(bufs[BT_DEC_VSBASE]);
    /* per stage: the activations it reads */
    int8_t *const stage_q[4] = {qh, qh, qh, qf};
    const int64_t stage_ldq[4] = {ldh, ldh, ldh, ldf};
    int rc;
    for (int64_t i = 0; i < nlayers; i++) {
        const int64_t *L = plan + i * BT_DEC_LAYER, *mm = L + 8;
        const float *attn_norm = P_(L[0]), *attn_sub_norm = P_(L[1]), *ffn_norm = P_(L[2]), *ffn_sub_norm = P_(L[3]);
        for (int st = 0; st < 4; st++) {
            switch (st) { /* what runs before the stage's products */
            case 0:
                rc = bt_eng_norm_quant(x, i ? down : NULL, attn_norm, eps, B, h, xn, qh, ldh, s, rs);
                break;
            case 1: /* attention: all rows in one dispatch where that gives the same numbers, else row by row */
#ifdef BT_ENGINE_X86
                rc = attend_batched(qkv, row_qkv, B, rows, i, bufs[BT_DEC_SLOTS], H, KVH, hd, cos, sin, kbase, vbase, ksbase,
                                    vsbase, plane, splane, dt, max_len, attn, h);
#else
                rc = 1;
#endif
                if (rc == 1) {
                    rc = 0;
                    for (int64_t b = 0; b < B && !rc; b++) {
                        const int64_t slot = rows[2 * b], pos = rows[2 * b + 1], pl = i * bufs[BT_DEC_SLOTS] + slot;
                        rc = bt_eng_attend(qkv + b * row_qkv, H, KVH, hd, pos, cos + pos * hd, sin + pos * hd,
                                           kbase + pl * plane, vbase + pl * plane, ksbase ? P_(ksbase + pl * splane) : NULL,
                                           vsbase ? P_(vsbase + pl * splane) : NULL, dt, max_len, attn + b * h, scores);
                    }
                }
                if (!rc) rc = bt_eng_norm_quant(attn, NULL, attn_sub_norm, eps, B, h, NULL, qh, ldh, s, rs);
                break;
            case 2:
                rc = bt_eng_norm_quant(x, o, ffn_norm, eps, B, h, xn, qh, ldh, s, rs);
                break;
            default:
                rc = bt_eng_act_quant(gu, B, f, act, ffn_sub_norm, eps, qf, ldf, s, rs);
            }
            if (rc) return rc;
            /* the stage's products (q/k/v, gate/up) in one dispatch */
            if (L[4 + st] < 0 || L[4 + st] > BT_DEC_MAXMM) return -1;
            const int count = (int)L[4 + st];
            int fmts[BT_DEC_MAXMM];
            const uint8_t *ws[BT_DEC_MAXMM];
            int64_t Ns[BT_DEC_MAXMM], ldys[BT_DEC_MAXMM];
            float gammas[BT_DEC_MAXMM], *ys[BT_DEC_MAXMM];
            for (int c = 0; c < count; c++, mm += 7) {
                fmts[c] = (int)mm[0];
                ws[c] = P_(mm[1]);
                Ns[c] = mm[2];
                gammas[c] = bits_to_float(mm[4]);
                ys[c] = P_(mm[5]);
                ldys[c] = mm[6];
                if (mm[3] != mm[3 - 7 * c]) return -1; /* one input: every product of a stage has the same K */
            }
            if (count > 0) {
                rc = bt_matmul_many(count, fmts, ws, Ns, (mm - 7 * count)[3], stage_q[st], stage_ldq[st], rs, s, B,
                                    gammas, ys, ldys);
                if (rc) return rc;
            }
        }
    }
    return 0;
}

#undef P_

/* ------------------------------------------------------------------------------------------------
 * head: layout helpers
 */

int64_t bt_head_row_bytes(int fmt, int64_t K) {
    if (K <= 0) return -1;
    if (fmt == BT_HEAD_I8) return K;
    if (fmt == BT_HEAD_I6) return (K + 127) / 128 * 96;
    if (fmt == BT_HEAD_I5) return (K + 255) / 256 * 160;
    return -2;
}

static inline int head_block_bytes(int fmt) { return fmt == BT_HEAD_I6 ? 96 : 160; }
static inline int head_block_cols(int fmt) { return fmt == BT_HEAD_I6 ? 128 : 256; }
static inline int head_offset(int fmt) { return fmt == BT_HEAD_I6 ? 32 : 16; }

/* Where the bits of v of column 32 i + j of a block live: (vector, shift in the byte, bit count) per
 * piece, low bits first (I6: i = 0..3, I5: i = 0..7; the layouts in the header comment). */
typedef struct {
    int n;
    struct {
        int vec, shift, bits;
    } p[3];
} lowbit_pieces;

static inline lowbit_pieces lowbit_layout(int fmt, int i) {
    static const lowbit_pieces I6[4] = {
        {1, {{0, 0, 6}}}, {1, {{1, 0, 6}}}, {1, {{2, 0, 6}}}, {3, {{0, 6, 2}, {1, 6, 2}, {2, 6, 2}}},
    };
    static const lowbit_pieces I5[8] = {
        {1, {{0, 0, 5}}},          {1, {{1, 0, 5}}},          {1, {{2, 0, 5}}},
        {1, {{3, 0, 5}}},          {1, {{4, 0, 5}}},          {2, {{0, 5, 3}, {1, 5, 2}}},
        {2, {{2, 5, 3}, {3, 5, 2}}}, {3, {{4, 5, 3}, {1, 7, 1}, {3, 7, 1}}},
    };
    return fmt == BT_HEAD_I6 ? I6[i] : I5[i];
}

/* code of column k of a 6-bit (I6) or 5-bit (I5) row */
static inline int lowbit_get(int fmt, const uint8_t *row, int64_t k) {
    const int cols = head_block_cols(fmt);
    const uint8_t *blk = row + (k / cols) * head_block_bytes(fmt);
    int r = (int)(k % cols), j = r % 32, v = 0, at = 0;
    lowbit_pieces L = lowbit_layout(fmt, r / 32);
    for (int x = 0; x < L.n; x++) {
        v |= ((blk[32 * L.p[x].vec + j] >> L.p[x].shift) & ((1 << L.p[x].bits) - 1)) << at;
        at += L.p[x].bits;
    }
    return v - head_offset(fmt);
}

static inline float load_src(const void *src, int dt, int64_t i) {
    if (dt == BT_DT_F32) return ((const float *)src)[i];
    if (dt == BT_DT_BF16) return bt_bf16_to_float(((const uint16_t *)src)[i]);
    return bt_half_to_float(((const uint16_t *)src)[i]);
}


int bt_head_rows(int fmt, const uint8_t *w, const float *scale, int64_t rows, int64_t K, const int64_t *ids, int64_t n,
                 float *out) {
    int64_t rb = bt_head_row_bytes(fmt, K);
    if (!w || !scale || !ids || !out || rb < 0 || n < 0) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= rows) return -3;
        const uint8_t *row = w + ids[i] * rb;
        float sc = scale[ids[i]];
        for (int64_t k = 0; k < K; k++)
            out[i * K + k] = (float)(fmt == BT_HEAD_I8 ? (int8_t)row[k] : lowbit_get(fmt, row, k)) * sc;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * head: products
 */

typedef struct {
    int fmt;
    const uint8_t *w;
    const float *scale;
    int64_t N, K, rb;
    const int8_t *q;
    int64_t ldq;
    const int32_t *rowsum;
    const float *s;
    int64_t T;
    float *y;
    int64_t ldy;
    int64_t chunk;
    _Atomic int64_t next;
    int avx2;
} head_job;

static inline void head_store(const head_job *j, int64_t t, int64_t n, int32_t acc) {
    j->y[t * j->ldy + n] = (float)acc * (j->scale[n] / j->s[t]);
}

static void head_rows_generic(const head_job *j, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = j->w + n * j->rb;
        for (int64_t t = 0; t < j->T; t++) {
            const int8_t *q = j->q + t * j->ldq;
            int32_t acc = 0;
            if (j->fmt == BT_HEAD_I8)
                for (int64_t k = 0; k < j->K; k++) acc += (int32_t)q[k] * (int32_t)(int8_t)row[k];
            else
                for (int64_t k = 0; k < j->K; k++) acc += (int32_t)q[k] * lowbit_get(j->fmt, row, k);
            head_store(j, t, n, acc);
        }
    }
}

#ifdef BT_ENGINE_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c"))) static
#define AVX2_INL static inline __attribute__((always_inline, target("avx2,fma,f16c")))

AVX2_INL int32_t hsum_epi32(__m256i a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* int8 rows: |q| (unsigned, up to 128) times w with q's sign: pairs stay within int16 (2*128*127) */
AVX2_FN void head_i8_rows_avx2(const head_job *j, int64_t n0, int64_t n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t K = j->K, K32 = K / 32 * 32;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = (const int8_t *)(j->w + n * j->rb);
        for (int64_t t0 = 0; t0 < j->T; t0 += 4) {
            const int tt = j->T - t0 < 4 ? (int)(j->T - t0) : 4;
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int64_t k = 0; k < K32; k += 32) {
                _mm_prefetch((const char *)row + k + 2048, _MM_HINT_T0);
                const __m256i w = _mm256_loadu_si256((const __m256i *)(row + k));
                for (int t = 0; t < tt; t++) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(j->q + (t0 + t) * j->ldq + k));
                    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(w, a));
                    acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones));
                }
            }
            for (int t = 0; t < tt; t++) {
                const int8_t *q = j->q + (t0 + t) * j->ldq;
                int32_t s = hsum_epi32(acc[t]);
                for (int64_t k = K32; k < K; k++) s += (int32_t)q[k] * (int32_t)row[k];
                head_store(j, t0 + t, n, s);
            }
        }
    }
}

/* acc[t] += the products of one 128-column block of unsigned codes v0..v3 (columns 0-31, ..., 96-127) with
 * tokens t0 .. t0 + tt - 1; codes <= 63: a pair is within 2*63*128 = 16128, two pairs within int16 */
AVX2_INL void lowbit_block_tokens(const head_job *j, int64_t t0, int tt, int64_t b, __m256i v0, __m256i v1, __m256i v2,
                                  __m256i v3, __m256i acc[4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int t = 0; t < tt; t++) {
        const int8_t *qb = j->q + (t0 + t) * j->ldq + 128 * b;
        __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(v0, _mm256_loadu_si256((const __m256i *)qb)),
                                      _mm256_maddubs_epi16(v1, _mm256_loadu_si256((const __m256i *)(qb + 32))));
        __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(v2, _mm256_loadu_si256((const __m256i *)(qb + 64))),
                                      _mm256_maddubs_epi16(v3, _mm256_loadu_si256((const __m256i *)(qb + 96))));
        acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones)));
    }
}

#ifndef BT_HEAD_PREFETCH
#define BT_HEAD_PREFETCH 2048 /* bytes of head rows prefetched ahead of the 5/6-bit stream */
#endif
#ifndef BT_HEAD_PF_HINT
#define BT_HEAD_PF_HINT _MM_HINT_T0
#endif
typedef void (*lowbit_block_fn)(const head_job *j, const uint8_t *p, int64_t b, int64_t t0, int tt, __m256i acc[4]);

/* Rows [n0, n1) of a 6- or 5-bit head, up to four tokens per pass over a row; block() adds one block's
 * products to acc (inlined: the callers pass a constant) and acc - offset * rowsum is the product. */
/* One pass over a row's blocks for tokens t0 .. t0 + tt - 1. The callers pass tt = 1 and 4 as constants:
 * the token loop then unrolls and acc stays in registers (with a run-time tt GCC keeps acc on the stack
 * and every block waits on a store-to-load forward of the accumulator: one token ran at ~14 cycles per
 * 96-byte block, compute-bound below the one-core read rate). */
AVX2_INL void lowbit_row_pass(const head_job *j, const uint8_t *row, int64_t nb, int bytes, int64_t t0, int tt,
                              lowbit_block_fn block, __m256i acc[4]) {
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + bytes * b;
        _mm_prefetch((const char *)p + BT_HEAD_PREFETCH, BT_HEAD_PF_HINT);
        _mm_prefetch((const char *)p + BT_HEAD_PREFETCH + 64, BT_HEAD_PF_HINT);
        if (bytes > 128) _mm_prefetch((const char *)p + BT_HEAD_PREFETCH + 128, BT_HEAD_PF_HINT);
        block(j, p, b, t0, tt, acc);
    }
}

AVX2_INL void lowbit_rows(const head_job *j, int64_t n0, int64_t n1, int bytes, int off, lowbit_block_fn block) {
    const int64_t nb = j->rb / bytes;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = j->w + n * j->rb;
        for (int64_t t0 = 0; t0 < j->T; t0 += 4) {
            const int tt = j->T - t0 < 4 ? (int)(j->T - t0) : 4;
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            if (tt == 1)
                lowbit_row_pass(j, row, nb, bytes, t0, 1, block, acc);
            else if (tt == 4)
                lowbit_row_pass(j, row, nb, bytes, t0, 4, block, acc);
            else
                lowbit_row_pass(j, row, nb, bytes, t0, tt, block, acc);
            for (int t = 0; t < tt; t++) head_store(j, t0 + t, n, hsum_epi32(acc[t]) - off * j->rowsum[t0 + t]);
        }
    }
}

/* 6-bit block (128 columns, layout in the header comment): three ands and one shift/and/or merge of
 * the top bits give the four vectors of v. */
AVX2_INL void i6_block(const head_job *j, const uint8_t *p, int64_t b, int64_t t0, int tt, __m256i acc[4]) {
    const __m256i m63 = _mm256_set1_epi8(63), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
    const __m256i m48 = _mm256_set1_epi8(48);
    const __m256i V0 = _mm256_loadu_si256((const __m256i *)p);
    const __m256i V1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    const __m256i V2 = _mm256_loadu_si256((const __m256i *)(p + 64));
    const __m256i v3 = _mm256_or_si256(
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(V0, 6), m3), _mm256_and_si256(_mm256_srli_epi16(V1, 4), m12)),
        _mm256_and_si256(_mm256_srli_epi16(V2, 2), m48));
    lowbit_block_tokens(j, t0, tt, b, _mm256_and_si256(V0, m63), _mm256_and_si256(V1, m63), _mm256_and_si256(V2, m63),
                        v3, acc);
}

/* 5-bit block (256 columns): the eight vectors of v are five ands and three shift/and/or merges of the
 * top bits. A 128-column half of one token sums four maddubs in int16 (4 * 2 * 31 * 128 = 31744). */
AVX2_INL void i5_block(const head_job *j, const uint8_t *p, int64_t b, int64_t t0, int tt, __m256i acc[4]) {
    const __m256i m31 = _mm256_set1_epi8(31), m7 = _mm256_set1_epi8(7), m24 = _mm256_set1_epi8(24);
    const __m256i m8 = _mm256_set1_epi8(8), m16 = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
    const __m256i V0 = _mm256_loadu_si256((const __m256i *)p);
    const __m256i V1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    const __m256i V2 = _mm256_loadu_si256((const __m256i *)(p + 64));
    const __m256i V3 = _mm256_loadu_si256((const __m256i *)(p + 96));
    const __m256i V4 = _mm256_loadu_si256((const __m256i *)(p + 128));
    const __m256i v[8] = {
        _mm256_and_si256(V0, m31),
        _mm256_and_si256(V1, m31),
        _mm256_and_si256(V2, m31),
        _mm256_and_si256(V3, m31),
        _mm256_and_si256(V4, m31),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(V0, 5), m7), _mm256_and_si256(_mm256_srli_epi16(V1, 2), m24)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(V2, 5), m7), _mm256_and_si256(_mm256_srli_epi16(V3, 2), m24)),
        _mm256_or_si256(
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(V4, 5), m7), _mm256_and_si256(_mm256_srli_epi16(V1, 4), m8)),
            _mm256_and_si256(_mm256_srli_epi16(V3, 3), m16)),
    };
    for (int t = 0; t < tt; t++) {
        const int8_t *qb = j->q + (t0 + t) * j->ldq + 256 * b;
        __m256i h[2];
        for (int half = 0; half < 2; half++) {
            const __m256i *vv = v + 4 * half;
            const int8_t *qh = qb + 128 * half;
            h[half] = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(vv[0], _mm256_loadu_si256((const __m256i *)qh)),
                                 _mm256_maddubs_epi16(vv[1], _mm256_loadu_si256((const __m256i *)(qh + 32)))),
                _mm256_add_epi16(_mm256_maddubs_epi16(vv[2], _mm256_loadu_si256((const __m256i *)(qh + 64))),
                                 _mm256_maddubs_epi16(vv[3], _mm256_loadu_si256((const __m256i *)(qh + 96)))));
        }
        acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(h[0], ones), _mm256_madd_epi16(h[1], ones)));
    }
}

AVX2_FN void head_i6_rows_avx2(const head_job *j, int64_t n0, int64_t n1) { lowbit_rows(j, n0, n1, 96, 32, i6_block); }

AVX2_FN void head_i5_rows_avx2(const head_job *j, int64_t n0, int64_t n1) { lowbit_rows(j, n0, n1, 160, 16, i5_block); }
#endif

/* ------------------------------------------------------------------------------------------------
 * head: quantisation. Rows go to the pool in chunks; each row is computed alone (absmax scale, then
 * code = clamp(nearbyint(w / scale))), so the table does not depend on the threads or the ISA.
 */

/* one row's absmax scale and int8 codes; -5: NaN or Inf in the row */
static int head_row_codes_generic(const char *row, int dtype, int64_t cols, float qmax, int8_t *codes, float *scale) {
    float amax = 0.0f;
    for (int64_t k = 0; k < cols; k++) {
        float a = fabsf(load_src(row, dtype, k));
        if (!(a <= 3.4028235e38f)) return -5;
        amax = a > amax ? a : amax;
    }
    if (amax < 1e-8f) amax = 1e-8f;
    const float sc = amax / qmax;
    for (int64_t k = 0; k < cols; k++) {
        float v = nearbyintf(load_src(row, dtype, k) / sc);
        codes[k] = (int8_t)(int)(v > qmax ? qmax : (v < -qmax ? -qmax : v));
    }
    *scale = sc;
    return 0;
}

#ifdef BT_ENGINE_X86
/* the same numbers 8 columns at a time (division and round-to-nearest-even as above) */
AVX2_FN int head_row_codes_avx2(const char *row, int dtype, int64_t cols, float qmax, int8_t *codes, float *scale) {
    const int dt = dtype == BT_DT_F32 ? BT_KV_F32 : dtype == BT_DT_F16 ? BT_KV_F16 : BT_KV_BF16;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.4028235e38f);
    const int64_t c8 = cols / 8 * 8;
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < c8; k += 8) {
        const __m256 a = _mm256_and_ps(load8_kv_avx2(row, dt, k), absmask);
        if (_mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ)) != 0xff) return -5;
        vmax = _mm256_max_ps(vmax, a);
    }
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (int64_t k = c8; k < cols; k++) {
        float a = fabsf(load_src(row, dtype, k));
        if (!(a <= 3.4028235e38f)) return -5;
        amax = a > amax ? a : amax;
    }
    if (amax < 1e-8f) amax = 1e-8f;
    const float sc = amax / qmax;
    const __m256 vsc = _mm256_set1_ps(sc), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
    for (int64_t k = 0; k < c8; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(load8_kv_avx2(row, dt, k), vsc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64((__m128i *)(codes + k), _mm_packs_epi16(w, w));
    }
    for (int64_t k = c8; k < cols; k++) {
        float v = nearbyintf(load_src(row, dtype, k) / sc);
        codes[k] = (int8_t)(int)(v > qmax ? qmax : (v < -qmax ? -qmax : v));
    }
    *scale = sc;
    return 0;
}
#endif

/* a row's codes into its stored bytes (int8: as they are; 5/6-bit: v = code + offset packed per block as
 * the header comment lays out, padding columns code 0) */
static void head_store_codes(int fmt, const int8_t *codes, int64_t cols, int64_t rb, uint8_t *out) {
    if (fmt == BT_HEAD_I8) {
        memcpy(out, codes, (size_t)cols);
        return;
    }
    const int bc = head_block_cols(fmt), bb = head_block_bytes(fmt), off = head_offset(fmt);
    uint8_t v[256];
    for (int64_t blk = 0; blk < rb / bb; blk++) {
        for (int i = 0; i < bc; i++) {
            const int64_t k = blk * bc + i;
            v[i] = (uint8_t)(off + (k < cols ? codes[k] : 0));
        }
        uint8_t *b = out + blk * bb;
        memset(b, 0, (size_t)bb);
        for (int i = 0; i < bc / 32; i++) {
            const lowbit_pieces L = lowbit_layout(fmt, i);
            int at = 0;
            for (int x = 0; x < L.n; x++) {
                uint8_t *dst = b + 32 * L.p[x].vec;
                const int m = (1 << L.p[x].bits) - 1, sh = L.p[x].shift;
                for (int j = 0; j < 32; j++) dst[j] = (uint8_t)(dst[j] | (((v[32 * i + j] >> at) & m) << sh));
                at += L.p[x].bits;
            }
        }
    }
}

typedef struct {
    const char *src;
    int dtype, fmt, avx2;
    float qmax;
    int64_t cols, rb, r1, chunk;
    size_t es;
    uint8_t *codes;
    float *scales;
    _Atomic int64_t next;
    _Atomic int err;
} head_quant_job;

static void head_quant_task(void *ctx, int tid, int n) {
    head_quant_job *j = (head_quant_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    int8_t *tmp = (int8_t *)malloc((size_t)j->cols);
    if (!tmp) {
        atomic_store(&j->err, -4);
        return;
    }
    for (;;) {
        const int64_t a = atomic_fetch_add(&j->next, j->chunk);
        if (a >= j->r1 || atomic_load(&j->err)) break;
        const int64_t b = a + j->chunk < j->r1 ? a + j->chunk : j->r1;
        for (int64_t r = a; r < b; r++) {
            const char *row = j->src + (size_t)r * (size_t)j->cols * j->es;
            int rc;
#ifdef BT_ENGINE_X86
            if (j->avx2)
                rc = head_row_codes_avx2(row, j->dtype, j->cols, j->qmax, tmp, j->scales + r);
            else
#endif
                rc = head_row_codes_generic(row, j->dtype, j->cols, j->qmax, tmp, j->scales + r);
            if (rc) {
                atomic_store(&j->err, rc);
                break;
            }
            head_store_codes(j->fmt, tmp, j->cols, j->rb, j->codes + r * j->rb);
        }
    }
    free(tmp);
}

/* Rows per window: after each window the source pages it covered are dropped (release) */
#define BT_HEAD_QUANT_WINDOW 4096

int bt_head_quantize(const void *src, int dtype, int64_t rows, int64_t cols, int fmt, uint8_t *codes, float *scales,
                     int release) {
    int64_t rb = bt_head_row_bytes(fmt, cols);
    if (!src || !codes || !scales || rows <= 0 || rb < 0 || dtype < 0 || dtype > 2) return -1;
    head_quant_job j = {.src = (const char *)src, .dtype = dtype, .fmt = fmt, .avx2 = use_avx2(), .cols = cols,
                        .rb = rb, .chunk = 64, .es = dtype == BT_DT_F32 ? 4 : 2, .codes = codes, .scales = scales,
                        .qmax = fmt == BT_HEAD_I8 ? 127.0f : fmt == BT_HEAD_I6 ? 31.0f : 15.0f};
    atomic_store(&j.err, 0);
    int n = bt_get_threads();
    if (n < 1) n = 1;
    const long page = sysconf(_SC_PAGESIZE);
    uintptr_t done = ((uintptr_t)src + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
    for (int64_t w0 = 0; w0 < rows; w0 += BT_HEAD_QUANT_WINDOW) {
        j.r1 = w0 + BT_HEAD_QUANT_WINDOW < rows ? w0 + BT_HEAD_QUANT_WINDOW : rows;
        atomic_store(&j.next, w0);
        bt_parallel(head_quant_task, &j, n);
        const int err = atomic_load(&j.err);
        if (err) return err;
        if (release) {
            const uintptr_t end = (uintptr_t)(j.src + (size_t)j.r1 * (size_t)cols * j.es);
            /* the last page only at the end: the mapping is private, dropping re-reads the file */
            const uintptr_t upto = j.r1 == rows ? end : end & ~(uintptr_t)(page - 1);
            if (upto > done) {
                madvise((void *)done, (size_t)(upto - done), MADV_DONTNEED);
                done = upto;
            }
        }
    }
    return 0;
}

static void head_task(void *ctx, int tid, int n) {
    head_job *j = (head_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    for (;;) {
        int64_t a = atomic_fetch_add(&j->next, j->chunk);
        if (a >= j->N) break;
        int64_t b = a + j->chunk < j->N ? a + j->chunk : j->N;
#ifdef BT_ENGINE_X86
        if (j->avx2) {
            if (j->fmt == BT_HEAD_I8)
                head_i8_rows_avx2(j, a, b);
            else if (j->fmt == BT_HEAD_I6)
                head_i6_rows_avx2(j, a, b);
            else
                head_i5_rows_avx2(j, a, b);
            continue;
        }
#endif
        head_rows_generic(j, a, b);
    }
}

/* Work item of the head product. Each new item restarts a thread's weight stream; for the ~200-330 MB
 * head of a 2B4T-sized vocabulary, 2 MB items streamed 4-11% faster than 128 KB ones on two threads
 * (three same-process A/B runs; 8 MB items lost it again to the uneven tail). */
#ifndef BT_HEAD_ITEM_BYTES
#define BT_HEAD_ITEM_BYTES (2 * 1024 * 1024)
#endif

int bt_head_matmul(int fmt, const uint8_t *w, const float *scale, int64_t N, int64_t K, const int8_t *q, int64_t ldq,
                   const int32_t *rowsum, const float *s, int64_t T, float *y, int64_t ldy) {
    int64_t rb = bt_head_row_bytes(fmt, K);
    if (rb == -2) return -2;
    if (!w || !scale || !q || !rowsum || !s || !y || N <= 0 || rb < 0 || T < 0 || ldy < N) return -1;
    if (ldq < (fmt == BT_HEAD_I8 ? K : rb / head_block_bytes(fmt) * head_block_cols(fmt))) return -3;
    if (T == 0) return 0;
    head_job j = {.fmt = fmt, .w = w, .scale = scale, .N = N, .K = K, .rb = rb, .q = q, .ldq = ldq, .rowsum = rowsum,
                  .s = s, .T = T, .y = y, .ldy = ldy, .avx2 = use_avx2()};
    int n = bt_get_threads();
    if (n < 1) n = 1;
    if ((int64_t)n > N) n = (int)N;
    /* work items of ~BT_HEAD_ITEM_BYTES of rows, at least 4 per thread so a descheduled thread takes fewer */
    int64_t c = (BT_HEAD_ITEM_BYTES + rb - 1) / rb;
    int64_t fair = (N + 4 * (int64_t)n - 1) / (4 * (int64_t)n);
    j.chunk = n == 1 ? N : (c < fair ? c : fair);
    if (j.chunk < 1) j.chunk = 1;
    atomic_store(&j.next, 0);
    bt_parallel(head_task, &j, n);
    return 0;
}
