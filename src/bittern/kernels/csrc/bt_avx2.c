/* AVX2 kernels (x86-64). Compiled with target attributes so the library builds without -march=native;
 * bt_api.c only selects them when the CPU reports AVX2 and FMA.
 *
 * Products use _mm256_maddubs_epi16(codes + 1 in {0,1,2} as unsigned, q as signed): each int16 lane
 * is at most 2*2*128 = 512 in magnitude, so int16 partial sums of up to 64 such products are exact;
 * they are widened to int32 with _mm256_madd_epi16(., 1) at least every BT_WIDEN_SLICES products.
 * The caller subtracts the token's rowsum: sum (c+1) q - sum q = sum c q.
 */
#include "bt_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

#ifndef BT_PREFETCH
#define BT_PREFETCH 2048 /* bytes of weights prefetched ahead of the GEMV stream */
#endif
#ifndef BT_GEMV_WIDEN
#define BT_GEMV_WIDEN 16 /* 2bit GEMV: blocks (4 products each) per int16 accumulation, <= 64 products */
#endif
#ifndef BT_PF_HINT
#define BT_PF_HINT _MM_HINT_T0
#endif
#ifndef BT_PF_LINES
#define BT_PF_LINES 2
#endif
#ifndef BT_PF_FAR
/* a second prefetch of the *-r4 weight streams, into L2 this far ahead: one thread, 2bit-r4 GEMV from
 * DRAM, three alternating rounds of four 2B4T shapes: +2-4% at 8 KB (91 -> 94% of the core's rate),
 * 16 and 32 KB less; neutral on two threads; the same in the lookup GEMV was not faster (session 10) */
#define BT_PF_FAR 8192
#endif
#if BT_PREFETCH > 0
#define PREFETCH_128(p)                                                                                        \
    do {                                                                                                       \
        _mm_prefetch((const char *)(p) + BT_PREFETCH, BT_PF_HINT);                                             \
        if (BT_PF_LINES > 1) _mm_prefetch((const char *)(p) + BT_PREFETCH + 64, BT_PF_HINT);                   \
        if (BT_PF_FAR > 0) {                                                                                   \
            _mm_prefetch((const char *)(p) + BT_PF_FAR, _MM_HINT_T1);                                          \
            _mm_prefetch((const char *)(p) + BT_PF_FAR + 64, _MM_HINT_T1);                                     \
        }                                                                                                      \
    } while (0)
#else
#define PREFETCH_128(p) ((void)0)
#endif

/* ------------------------------------------------------------------------------------------------
 * activation quantisation
 */

AVX2_INLINE __m256 load8(const void *x, int dtype, int64_t k) {
    if (dtype == BT_DT_F32) return _mm256_loadu_ps((const float *)x + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + k));
    if (dtype == BT_DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline float load1(const void *x, int dtype, int64_t k) {
    if (dtype == BT_DT_F32) return ((const float *)x)[k];
    uint16_t h = ((const uint16_t *)x)[k];
    return dtype == BT_DT_BF16 ? bt_bf16_to_float(h) : bt_half_to_float(h);
}

AVX2_INLINE void quantize_row_t(const void *x, const int dtype, int64_t K, int8_t *q, int64_t Kpad, float *s,
                                int32_t *rowsum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        m0 = _mm256_max_ps(m0, _mm256_and_ps(load8(x, dtype, k), absmask));
        m1 = _mm256_max_ps(m1, _mm256_and_ps(load8(x, dtype, k + 8), absmask));
    }
    for (; k + 8 <= K; k += 8) m0 = _mm256_max_ps(m0, _mm256_and_ps(load8(x, dtype, k), absmask));
    m0 = _mm256_max_ps(m0, m1);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float amax = _mm_cvtss_f32(h);
    for (; k < K; k++) {
        float v = fabsf(load1(x, dtype, k));
        if (v > amax) amax = v;
    }
    if (!(amax >= 1e-5f)) amax = 1e-5f;
    const float r = 1.0f / amax;
    const float sc = r * 127.0f; /* torch: 127.0 / t == t.reciprocal() * 127 */
    const __m256 sv = _mm256_set1_ps(sc);
    const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i sum = _mm256_setzero_si256();
    k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i i0, i1, i2, i3;
#define QCONV(i, off)                                                                                          \
    i = _mm256_cvtps_epi32(                                                                                    \
        _mm256_round_ps(_mm256_mul_ps(load8(x, dtype, k + off), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); \
    i = _mm256_min_epi32(_mm256_max_epi32(i, lo), hi);
        QCONV(i0, 0)
        QCONV(i1, 8)
        QCONV(i2, 16)
        QCONV(i3, 24)
#undef QCONV
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(p, perm));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    int32_t total = _mm_cvtsi128_si32(s4);
    for (; k < K; k++) {
        float v = nearbyintf(load1(x, dtype, k) * sc);
        if (v > 127.0f) v = 127.0f;
        if (v < -128.0f) v = -128.0f;
        q[k] = (int8_t)v;
        total += q[k];
    }
    if (Kpad > K) memset(q + K, 0, (size_t)(Kpad - K));
    *s = sc;
    *rowsum = total;
}

AVX2 static void quantize_row_avx2(const void *x, int dtype, int64_t K, int8_t *q, int64_t Kpad, float *s,
                                   int32_t *rowsum) {
    if (dtype == BT_DT_F32)
        quantize_row_t(x, BT_DT_F32, K, q, Kpad, s, rowsum);
    else if (dtype == BT_DT_BF16)
        quantize_row_t(x, BT_DT_BF16, K, q, Kpad, s, rowsum);
    else
        quantize_row_t(x, BT_DT_F16, K, q, Kpad, s, rowsum);
}

/* ------------------------------------------------------------------------------------------------
 * helpers
 */

/* horizontal sums of four int32 vectors -> [sum a, sum b, sum c, sum d] */
AVX2_INLINE __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

AVX2_INLINE int32_t hsum1(__m256i a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Hides a constant from the optimiser, which would otherwise rewrite x > c as min/compare-equal pairs. */
#define OPAQUE(v) __asm__("" : "+x"(v))

/* 1.6bit: the five trit vectors (code+1 in {0,1,2}) of one 32-byte block.
 * B = b ^ 0x80 with b the fixed-point byte; (B * 3^i) mod 256 = (b * 3^i mod 256) ^ 0x80, so the trit
 * floor(3 x / 256) = [x >= 86] + [x >= 171] becomes two signed compares against -43 and 42. */
#define TRITS_DECL                                                                                             \
    __m256i c_lo = _mm256_set1_epi8(-43);                                                                      \
    __m256i c_hi = _mm256_set1_epi8(42);                                                                       \
    OPAQUE(c_lo);                                                                                              \
    OPAQUE(c_hi);
AVX2_INLINE __m256i trit_of(__m256i X, __m256i c_lo, __m256i c_hi) {
    return _mm256_abs_epi8(_mm256_add_epi8(_mm256_cmpgt_epi8(X, c_lo), _mm256_cmpgt_epi8(X, c_hi)));
}
AVX2_INLINE __m256i times3(__m256i x) { return _mm256_add_epi8(x, _mm256_add_epi8(x, x)); }

/* ------------------------------------------------------------------------------------------------
 * GEMV, 2bit-r4: one row group (4 rows), one token; weights read strictly sequentially.
 */

AVX2_INLINE void gemv2b_group4(const uint8_t *p, int64_t nb, const int8_t *q, int32_t out[4]) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int64_t b = 0;
    while (b < nb) {
        int64_t bend = b + BT_GEMV_WIDEN < nb ? b + BT_GEMV_WIDEN : nb; /* 16 blocks * 4 products: see BT_WIDEN_SLICES */
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (; b < bend; b++) {
            PREFETCH_128(p);
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(q + 128 * b));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(q + 128 * b + 32));
            const __m256i a2 = _mm256_loadu_si256((const __m256i *)(q + 128 * b + 64));
            const __m256i a3 = _mm256_loadu_si256((const __m256i *)(q + 128 * b + 96));
#define ROW(r, s)                                                                                              \
    {                                                                                                          \
        const __m256i w = _mm256_loadu_si256((const __m256i *)(p + 32 * r));                                   \
        __m256i t = _mm256_maddubs_epi16(_mm256_and_si256(w, m3), a0);                                         \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 2), m3), a1));      \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m3), a2));      \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 6), m3), a3));      \
        s = _mm256_add_epi16(s, t);                                                                            \
    }
            ROW(0, s0)
            ROW(1, s1)
            ROW(2, s2)
            ROW(3, s3)
#undef ROW
            p += 128;
        }
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(s0, ones));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(s1, ones));
        acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(s2, ones));
        acc3 = _mm256_add_epi32(acc3, _mm256_madd_epi16(s3, ones));
    }
    _mm_storeu_si128((__m128i *)out, hsum4(acc0, acc1, acc2, acc3));
}

/* a short last group (1..3 rows) */
AVX2_INLINE int32_t dot2b_row(const uint8_t *p, int64_t stride, int64_t nb, const int8_t *q) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; b++, p += stride) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)p);
        __m256i t = _mm256_maddubs_epi16(_mm256_and_si256(w, m3), _mm256_loadu_si256((const __m256i *)(q + 128 * b)));
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 2), m3),
                                                     _mm256_loadu_si256((const __m256i *)(q + 128 * b + 32))));
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m3),
                                                     _mm256_loadu_si256((const __m256i *)(q + 128 * b + 64))));
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 6), m3),
                                                     _mm256_loadu_si256((const __m256i *)(q + 128 * b + 96))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(t, ones));
    }
    return hsum1(acc);
}

/* ------------------------------------------------------------------------------------------------
 * GEMV, 1.6bit-r4
 */

AVX2_INLINE void gemv1p6_group4(const uint8_t *p, int64_t nb, const int8_t *q, int32_t out[4]) {
    TRITS_DECL
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int64_t b = 0;
    while (b < nb) {
        int64_t bend = b + 8 < nb ? b + 8 : nb; /* 8 blocks * 5 products * 512 = 20480: int16 exact */
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (; b < bend; b++) {
            PREFETCH_128(p);
            const int8_t *qb = q + 160 * b;
#define ROW(r, s)                                                                                              \
    {                                                                                                          \
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(p + 32 * r));                                  \
        const __m256i x1 = times3(x0), x2 = times3(x1), x3 = times3(x2), x4 = times3(x3);                      \
        __m256i t = _mm256_maddubs_epi16(trit_of(x0, c_lo, c_hi), _mm256_loadu_si256((const __m256i *)qb));    \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(trit_of(x1, c_lo, c_hi),                                   \
                                                     _mm256_loadu_si256((const __m256i *)(qb + 32))));          \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(trit_of(x2, c_lo, c_hi),                                   \
                                                     _mm256_loadu_si256((const __m256i *)(qb + 64))));          \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(trit_of(x3, c_lo, c_hi),                                   \
                                                     _mm256_loadu_si256((const __m256i *)(qb + 96))));          \
        t = _mm256_add_epi16(t, _mm256_maddubs_epi16(trit_of(x4, c_lo, c_hi),                                   \
                                                     _mm256_loadu_si256((const __m256i *)(qb + 128))));         \
        s = _mm256_add_epi16(s, t);                                                                            \
    }
            ROW(0, s0)
            ROW(1, s1)
            ROW(2, s2)
            ROW(3, s3)
#undef ROW
            p += 128;
        }
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(s0, ones));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(s1, ones));
        acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(s2, ones));
        acc3 = _mm256_add_epi32(acc3, _mm256_madd_epi16(s3, ones));
    }
    _mm_storeu_si128((__m128i *)out, hsum4(acc0, acc1, acc2, acc3));
}

AVX2_INLINE int32_t dot1p6_row(const uint8_t *p, int64_t stride, int64_t nb, const int8_t *q) {
    TRITS_DECL
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; b++, p += stride) {
        const int8_t *qb = q + 160 * b;
        __m256i x = _mm256_loadu_si256((const __m256i *)p);
        __m256i t = _mm256_setzero_si256();
        for (int i = 0; i < 5; i++) {
            t = _mm256_add_epi16(t, _mm256_maddubs_epi16(trit_of(x, c_lo, c_hi),
                                                         _mm256_loadu_si256((const __m256i *)(qb + 32 * i))));
            x = times3(x);
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(t, ones));
    }
    return hsum1(acc);
}

/* Small batches (2-4 tokens per tile): one row at a time (its 32-byte blocks are 32*gr apart; the
 * group is re-read from L1 for the other rows), each weight vector decoded once and multiplied with
 * every token of the tile. Activations are memory operands. */
AVX2_INLINE void gemv_row_multi(const int is2, const uint8_t *p, int64_t stride, int64_t nb, const int8_t *q,
                                int64_t ldq, const int TT, int32_t *out) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    TRITS_DECL
    const int blk = is2 ? BT_BLOCK_2B : BT_BLOCK_1P6;
    __m256i acc[4];
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) acc[t] = _mm256_setzero_si256();
    int64_t b = 0;
    while (b < nb) {
        int64_t bend = b + 8 < nb ? b + 8 : nb; /* 8 blocks * 5 products * 512 <= 20480: int16 exact */
        __m256i s[4];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) s[t] = _mm256_setzero_si256();
        for (; b < bend; b++, p += stride) {
            PREFETCH_128(p);
            const __m256i w = _mm256_loadu_si256((const __m256i *)p);
            const int8_t *qb = q + blk * b;
            if (is2) {
                const __m256i f0 = _mm256_and_si256(w, m3);
                const __m256i f1 = _mm256_and_si256(_mm256_srli_epi16(w, 2), m3);
                const __m256i f2 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m3);
                const __m256i f3 = _mm256_and_si256(_mm256_srli_epi16(w, 6), m3);
#pragma GCC unroll 4
                for (int t = 0; t < TT; t++) {
                    const int8_t *qt = qb + t * ldq;
                    __m256i u = _mm256_maddubs_epi16(f0, _mm256_loadu_si256((const __m256i *)qt));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(f1, _mm256_loadu_si256((const __m256i *)(qt + 32))));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(f2, _mm256_loadu_si256((const __m256i *)(qt + 64))));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(f3, _mm256_loadu_si256((const __m256i *)(qt + 96))));
                    s[t] = _mm256_add_epi16(s[t], u);
                }
            } else {
                const __m256i x1 = times3(w), x2 = times3(x1), x3 = times3(x2), x4 = times3(x3);
                const __m256i d0 = trit_of(w, c_lo, c_hi), d1 = trit_of(x1, c_lo, c_hi), d2 = trit_of(x2, c_lo, c_hi);
                const __m256i d3 = trit_of(x3, c_lo, c_hi), d4 = trit_of(x4, c_lo, c_hi);
#pragma GCC unroll 4
                for (int t = 0; t < TT; t++) {
                    const int8_t *qt = qb + t * ldq;
                    __m256i u = _mm256_maddubs_epi16(d0, _mm256_loadu_si256((const __m256i *)qt));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(d1, _mm256_loadu_si256((const __m256i *)(qt + 32))));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(d2, _mm256_loadu_si256((const __m256i *)(qt + 64))));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(d3, _mm256_loadu_si256((const __m256i *)(qt + 96))));
                    u = _mm256_add_epi16(u, _mm256_maddubs_epi16(d4, _mm256_loadu_si256((const __m256i *)(qt + 128))));
                    s[t] = _mm256_add_epi16(s[t], u);
                }
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s[t], ones));
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; t++) out[t] = hsum1(acc[t]);
}

#define ROW_MULTI_DEF(tt)                                                                                      \
    AVX2 static void gemv_row_multi_##tt(int is2, const uint8_t *p, int64_t stride, int64_t nb, const int8_t *q, \
                                         int64_t ldq, int32_t *out) {                                          \
        if (is2)                                                                                               \
            gemv_row_multi(1, p, stride, nb, q, ldq, tt, out);                                                 \
        else                                                                                                   \
            gemv_row_multi(0, p, stride, nb, q, ldq, tt, out);                                                 \
    }
ROW_MULTI_DEF(2)
ROW_MULTI_DEF(3)
ROW_MULTI_DEF(4)
typedef void (*row_multi_fn)(int, const uint8_t *, int64_t, int64_t, const int8_t *, int64_t, int32_t *);
static const row_multi_fn ROW_MULTI[5] = {0, 0, gemv_row_multi_2, gemv_row_multi_3, gemv_row_multi_4};

AVX2 static void gemv_avx2(const bt_mm *a, int64_t row0, int64_t row1) {
    const int is2 = a->fmt == BT_FMT_2BIT_R4;
    const int64_t nb = a->Kp / (is2 ? BT_BLOCK_2B : BT_BLOCK_1P6);
    for (int64_t g = row0 / BT_GROUP; g * BT_GROUP < row1; g++) {
        const uint8_t *p = bt_group_ptr(a, g);
        const int64_t n0 = g * BT_GROUP;
        const int64_t gr = a->N - n0 < BT_GROUP ? a->N - n0 : BT_GROUP;
        for (int64_t t = 0; t < a->T;) {
            const int tt = a->T - t < 4 ? (int)(a->T - t) : 4;
            const int8_t *q = a->q + t * a->ldq;
            if (tt == 1) {
                int32_t acc[4];
                if (gr == BT_GROUP) {
                    if (is2)
                        gemv2b_group4(p, nb, q, acc);
                    else
                        gemv1p6_group4(p, nb, q, acc);
                } else {
                    for (int64_t r = 0; r < gr; r++)
                        acc[r] = is2 ? dot2b_row(p + 32 * r, 32 * gr, nb, q) : dot1p6_row(p + 32 * r, 32 * gr, nb, q);
                }
                for (int64_t r = 0; r < gr; r++) bt_store(a, t, n0 + r, acc[r]);
            } else {
                int32_t acc[4];
                for (int64_t r = 0; r < gr; r++) {
                    ROW_MULTI[tt](is2, p + 32 * r, 32 * gr, nb, q, a->ldq, acc);
                    for (int j = 0; j < tt; j++) bt_store(a, t + j, n0 + r, acc[j]);
                }
            }
            t += tt;
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * GEMV, 1.67bit-lut (layout in bt_lut.c): two 32-row groups at a time, one token.
 *
 * Tables: per triple 32 bytes, the low bytes of the 16 int16 partial sums, then the high bytes; each
 * half is broadcast to both 128-bit lanes on load (the index vector holds 32 rows of one triple).
 * Per pair of triples: two nibble index vectors, sign masks by and/compare of the broadcast sign words,
 * four lookups, xor, and int16 sums of the low/high bytes unpacked per row. Rows in the int16 sums:
 * E = rows 0-7 | 16-23, O = rows 8-15 | 24-31. |value| <= 385 per triple (-v - 1 for v = 384), 8 per
 * block and lane: int16 holds 10 blocks (30800).
 * Measured on Zen 3 (one core): ~15 GB/s of packed weights from L2, 10-12 GB/s from DRAM, i.e. about
 * the same weights per second as the 2bit-r4 GEMV with 17% fewer bytes. A variant that widens the low
 * bytes with maddubs instead of unpacking (fewer shuffle-port ops) and one with tables stored twice
 * (no broadcast) were not faster.
 */
#define BT_LUT_WIDEN 10
#ifndef BT_LUT_TOKENS
#define BT_LUT_TOKENS 1 /* several tokens share each group's index and sign decoding (0: token by token) */
#endif
#ifndef BT_LUT_PREFETCH
#define BT_LUT_PREFETCH 2048
#endif

AVX2 static void lut_tables_avx2(const int8_t *q, int64_t Kp, uint8_t *tab) {
    /* entry i of a triple (a0, a1, a2) is c0 a0 + c1 a1 + c2 a2 with the canonical codes of index i */
    const __m256i C0 = _mm256_setr_epi16(0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0);
    const __m256i C1 = _mm256_setr_epi16(0, 0, 1, 1, 1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0);
    const __m256i C2 = _mm256_setr_epi16(0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0);
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10,
                                           12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t j = 0; j < Kp / 3; j++) {
        const __m256i a0 = _mm256_set1_epi16(q[3 * j]), a1 = _mm256_set1_epi16(q[3 * j + 1]);
        const __m256i a2 = _mm256_set1_epi16(q[3 * j + 2]);
        const __m256i v = _mm256_add_epi16(_mm256_add_epi16(_mm256_sign_epi16(a0, C0), _mm256_sign_epi16(a1, C1)),
                                           _mm256_sign_epi16(a2, C2));
        /* lanes: [lo 0-7, hi 0-7 | lo 8-15, hi 8-15] -> [lo 0-15 | hi 0-15] */
        _mm256_storeu_si256((__m256i *)(tab + 32 * j), _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xd8));
    }
}

/* One pair of triples (k) of one 32-row group at P: indices, sign masks, lookups in the table vectors
 * T0..T3 (low/high bytes of triples 2k and 2k+1), xor, int16 sums into E (rows 0-7 | 16-23) and O. */
#define LUT_ONE(P, E, O)                                                                                        \
    {                                                                                                          \
        const int32_t *sw = (const int32_t *)(const void *)(P + 128);                                          \
        const __m256i x = _mm256_loadu_si256((const __m256i *)(P + 32 * k));                                   \
        const __m256i i0 = _mm256_and_si256(x, m15);                                                           \
        const __m256i i1 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m15);                                     \
        const __m256i m0 = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(sw[2 * k]), bits), bits);       \
        const __m256i m1 = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(sw[2 * k + 1]), bits), bits);   \
        const __m256i l0 = _mm256_xor_si256(_mm256_shuffle_epi8(T0, i0), m0);                                  \
        const __m256i h0 = _mm256_xor_si256(_mm256_shuffle_epi8(T1, i0), m0);                                  \
        const __m256i l1 = _mm256_xor_si256(_mm256_shuffle_epi8(T2, i1), m1);                                  \
        const __m256i h1 = _mm256_xor_si256(_mm256_shuffle_epi8(T3, i1), m1);                                  \
        E = _mm256_add_epi16(E, _mm256_add_epi16(_mm256_unpacklo_epi8(l0, h0), _mm256_unpacklo_epi8(l1, h1)));  \
        O = _mm256_add_epi16(O, _mm256_add_epi16(_mm256_unpackhi_epi8(l0, h0), _mm256_unpackhi_epi8(l1, h1)));  \
    }

/* Two full groups at once: each table vector is loaded once for 64 rows (measured on one core: ~16
 * instead of ~13-14 GB/s from L2). Their blocks are interleaved in memory (pa and pb = pa + 160 advance by
 * stride = 320), so the pair is one sequential stream: with the groups in separate regions (two streams)
 * the pair ran 3-5% slower from DRAM than one group at a time; interleaved it is 4-7% faster than one
 * group at a time on one and two threads (same-process A/B runs, 2B4T gate/up shape from DRAM) and as
 * fast as before from L2. ca, cb: the groups' int16 counts. two = 0: group a alone (the callers pass a
 * constant, so each form is compiled without the other's work). */
AVX2_INLINE void gemv_lut_group2(const uint8_t *pa, const uint8_t *pb, int64_t stride, const uint8_t *ca,
                                 const uint8_t *cb, int64_t nb, const uint8_t *tab, int32_t outa[32], int32_t outb[32],
                                 const int two) {
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i bits = _mm256_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32,
                                          32, 64, 64, 64, 64, -128, -128, -128, -128);
    const __m256i zero = _mm256_setzero_si256();
    __m256i sa[4] = {zero, zero, zero, zero}, sb[4] = {zero, zero, zero, zero};
    for (int64_t b0 = 0; b0 < nb; b0 += BT_LUT_WIDEN) {
        const int64_t b1 = b0 + BT_LUT_WIDEN < nb ? b0 + BT_LUT_WIDEN : nb;
        __m256i Ea = zero, Oa = zero, Eb = zero, Ob = zero;
        for (int64_t b = b0; b < b1; b++) {
#if BT_LUT_PREFETCH > 0
            _mm_prefetch((const char *)pa + BT_LUT_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)pa + BT_LUT_PREFETCH + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)pa + BT_LUT_PREFETCH + 128, _MM_HINT_T0);
            if (two) {
                _mm_prefetch((const char *)pb + BT_LUT_PREFETCH, _MM_HINT_T0);
                _mm_prefetch((const char *)pb + BT_LUT_PREFETCH + 64, _MM_HINT_T0);
                _mm_prefetch((const char *)pb + BT_LUT_PREFETCH + 128, _MM_HINT_T0);
            }
#endif
            const uint8_t *t = tab + 256 * b;
#pragma GCC unroll 1 /* unrolled, GCC interleaves the pairs and spills */
            for (int k = 0; k < 4; k++) {
                const uint8_t *tk = t + 64 * k;
                const __m256i T0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tk));
                const __m256i T1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tk + 16)));
                const __m256i T2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tk + 32)));
                const __m256i T3 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tk + 48)));
                LUT_ONE(pa, Ea, Oa)
                if (two) LUT_ONE(pb, Eb, Ob)
            }
            pa += stride;
            pb += stride;
        }
        sa[0] = _mm256_add_epi32(sa[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(Ea)));
        sa[1] = _mm256_add_epi32(sa[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(Oa)));
        sa[2] = _mm256_add_epi32(sa[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(Ea, 1)));
        sa[3] = _mm256_add_epi32(sa[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(Oa, 1)));
        sb[0] = _mm256_add_epi32(sb[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(Eb)));
        sb[1] = _mm256_add_epi32(sb[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(Ob)));
        sb[2] = _mm256_add_epi32(sb[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(Eb, 1)));
        sb[3] = _mm256_add_epi32(sb[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(Ob, 1)));
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_si256((__m256i *)(outa + 8 * i),
                            _mm256_add_epi32(sa[i], _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(ca + 16 * i)))));
        if (two)
            _mm256_storeu_si256((__m256i *)(outb + 8 * i),
                                _mm256_add_epi32(sb[i], _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(cb + 16 * i)))));
    }
}

/* Several tokens (TT <= 3, a constant at every call) of one full 32-row group: the indices and sign masks
 * of each pair of triples are decoded once and looked up in every token's tables (tab + t * per);
 * out[t][r]: raw sums with the group's counts added, as gemv_lut_group2. Per token and pair of triples
 * this leaves 16 of LUT_ONE's 23 vector ops. */
AVX2_INLINE void gemv_lut_tokens(const uint8_t *pa, int64_t stride, const uint8_t *ca, int64_t nb, const uint8_t *tab,
                                 size_t per, const int TT, int32_t out[][BT_LUT_ROWS]) {
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i bits = _mm256_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32,
                                          32, 64, 64, 64, 64, -128, -128, -128, -128);
    const __m256i zero = _mm256_setzero_si256();
    __m256i s32[3][4];
    for (int t = 0; t < TT; t++)
        for (int i = 0; i < 4; i++) s32[t][i] = zero;
    for (int64_t b0 = 0; b0 < nb; b0 += BT_LUT_WIDEN) {
        const int64_t b1 = b0 + BT_LUT_WIDEN < nb ? b0 + BT_LUT_WIDEN : nb;
        __m256i E[3], O[3];
        for (int t = 0; t < TT; t++) E[t] = O[t] = zero;
        for (int64_t b = b0; b < b1; b++, pa += stride) {
#if BT_LUT_PREFETCH > 0
            _mm_prefetch((const char *)pa + BT_LUT_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)pa + BT_LUT_PREFETCH + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)pa + BT_LUT_PREFETCH + 128, _MM_HINT_T0);
#endif
            const int32_t *sw = (const int32_t *)(const void *)(pa + 128);
#pragma GCC unroll 1
            for (int k = 0; k < 4; k++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(pa + 32 * k));
                const __m256i i0 = _mm256_and_si256(x, m15);
                const __m256i i1 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m15);
                const __m256i m0 = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(sw[2 * k]), bits), bits);
                const __m256i m1 = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(sw[2 * k + 1]), bits), bits);
#pragma GCC unroll 3
                for (int t = 0; t < TT; t++) {
                    const uint8_t *tk = tab + per * (size_t)t + 256 * b + 64 * k;
                    const __m256i T0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tk));
                    const __m256i T1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tk + 16)));
                    const __m256i T2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tk + 32)));
                    const __m256i T3 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tk + 48)));
                    const __m256i l0 = _mm256_xor_si256(_mm256_shuffle_epi8(T0, i0), m0);
                    const __m256i h0 = _mm256_xor_si256(_mm256_shuffle_epi8(T1, i0), m0);
                    const __m256i l1 = _mm256_xor_si256(_mm256_shuffle_epi8(T2, i1), m1);
                    const __m256i h1 = _mm256_xor_si256(_mm256_shuffle_epi8(T3, i1), m1);
                    E[t] = _mm256_add_epi16(E[t], _mm256_add_epi16(_mm256_unpacklo_epi8(l0, h0), _mm256_unpacklo_epi8(l1, h1)));
                    O[t] = _mm256_add_epi16(O[t], _mm256_add_epi16(_mm256_unpackhi_epi8(l0, h0), _mm256_unpackhi_epi8(l1, h1)));
                }
            }
        }
        for (int t = 0; t < TT; t++) {
            s32[t][0] = _mm256_add_epi32(s32[t][0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(E[t])));
            s32[t][1] = _mm256_add_epi32(s32[t][1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(O[t])));
            s32[t][2] = _mm256_add_epi32(s32[t][2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(E[t], 1)));
            s32[t][3] = _mm256_add_epi32(s32[t][3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(O[t], 1)));
        }
    }
    for (int t = 0; t < TT; t++)
        for (int i = 0; i < 4; i++)
            _mm256_storeu_si256((__m256i *)(out[t] + 8 * i),
                                _mm256_add_epi32(s32[t][i], _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(ca + 16 * i)))));
}

#define LUT_TOKENS_DEF(tt)                                                                                     \
    AVX2 static void gemv_lut_tokens_##tt(const uint8_t *pa, int64_t stride, const uint8_t *ca, int64_t nb,    \
                                          const uint8_t *tab, size_t per, int32_t out[][BT_LUT_ROWS]) {        \
        gemv_lut_tokens(pa, stride, ca, nb, tab, per, tt, out);                                                \
    }
LUT_TOKENS_DEF(2)
LUT_TOKENS_DEF(3)

/* GEMM panel decode of one block of a full group (32 rows x 24 columns), first step: the 24 column vectors
 * (32 rows each: digit c of triple j from a 16-entry table of the canonical codes, 2 - digit where the
 * sign mask is set). */
AVX2_INLINE void lut_block_columns(const uint8_t *blk, __m256i V[24]) {
    const __m256i m15 = _mm256_set1_epi8(15), two = _mm256_set1_epi8(2);
    const __m256i bits = _mm256_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32,
                                          32, 64, 64, 64, 64, -128, -128, -128, -128);
    /* codes + 1 of the canonical index, digit c (indices 14, 15: zero codes) */
    const __m256i dt0 = _mm256_setr_epi8(1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                         2, 2, 2, 1, 1);
    const __m256i dt1 = _mm256_setr_epi8(1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1,
                                         2, 2, 2, 1, 1);
    const __m256i dt2 = _mm256_setr_epi8(1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 1, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2,
                                         0, 1, 2, 1, 1);
    const int32_t *sw = (const int32_t *)(const void *)(blk + 128);
    for (int k = 0; k < 4; k++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(blk + 32 * k));
        for (int h = 0; h < 2; h++) {
            const int j = 2 * k + h;
            const __m256i idx = h ? _mm256_and_si256(_mm256_srli_epi16(x, 4), m15) : _mm256_and_si256(x, m15);
            const __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(sw[j]), bits), bits);
            const __m256i d0 = _mm256_shuffle_epi8(dt0, idx), d1 = _mm256_shuffle_epi8(dt1, idx);
            const __m256i d2 = _mm256_shuffle_epi8(dt2, idx);
            V[3 * j] = _mm256_blendv_epi8(d0, _mm256_sub_epi8(two, d0), m);
            V[3 * j + 1] = _mm256_blendv_epi8(d1, _mm256_sub_epi8(two, d1), m);
            V[3 * j + 2] = _mm256_blendv_epi8(d2, _mm256_sub_epi8(two, d2), m);
        }
    }
}

/* One block to rows in tmp (row r at tmp + 32 r, 24 bytes): the column vectors are transposed by in-lane
 * unpacks (bytes, words, dwords, qwords), which leave row r in lane 0 and row r + 16 in lane 1. */
AVX2 static void lut_decode_block_avx2(const uint8_t *blk, uint8_t *tmp) {
    __m256i V[32];
    lut_block_columns(blk, V);
    for (int c = 24; c < 32; c++) V[c] = _mm256_setzero_si256();
    for (int set = 0; set < 2; set++) { /* columns 16 set .. 16 set + 15 */
        const __m256i *W = V + 16 * set;
        __m256i S1[2][8], S2[4][4], S3[8][2];
        for (int i = 0; i < 8; i++) {
            S1[0][i] = _mm256_unpacklo_epi8(W[2 * i], W[2 * i + 1]); /* rows 0-7, columns 2i, 2i+1 */
            S1[1][i] = _mm256_unpackhi_epi8(W[2 * i], W[2 * i + 1]); /* rows 8-15 */
        }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++) {
                S2[2 * h][i] = _mm256_unpacklo_epi16(S1[h][2 * i], S1[h][2 * i + 1]);     /* rows 8h+0..3 */
                S2[2 * h + 1][i] = _mm256_unpackhi_epi16(S1[h][2 * i], S1[h][2 * i + 1]); /* rows 8h+4..7 */
            }
        for (int q = 0; q < 4; q++)
            for (int i = 0; i < 2; i++) {
                S3[2 * q][i] = _mm256_unpacklo_epi32(S2[q][2 * i], S2[q][2 * i + 1]);     /* rows 4q, 4q+1 */
                S3[2 * q + 1][i] = _mm256_unpackhi_epi32(S2[q][2 * i], S2[q][2 * i + 1]); /* rows 4q+2, 4q+3 */
            }
        for (int e = 0; e < 8; e++) {
            const __m256i r0 = _mm256_unpacklo_epi64(S3[e][0], S3[e][1]); /* row 2e | row 2e + 16 */
            const __m256i r1 = _mm256_unpackhi_epi64(S3[e][0], S3[e][1]); /* row 2e + 1 | row 2e + 17 */
            if (set == 0) {
                _mm_storeu_si128((__m128i *)(tmp + 32 * (2 * e)), _mm256_castsi256_si128(r0));
                _mm_storeu_si128((__m128i *)(tmp + 32 * (2 * e + 16)), _mm256_extracti128_si256(r0, 1));
                _mm_storeu_si128((__m128i *)(tmp + 32 * (2 * e + 1)), _mm256_castsi256_si128(r1));
                _mm_storeu_si128((__m128i *)(tmp + 32 * (2 * e + 17)), _mm256_extracti128_si256(r1, 1));
            } else { /* columns 16..23 (the low 8 bytes) */
                _mm_storel_epi64((__m128i *)(tmp + 32 * (2 * e) + 16), _mm256_castsi256_si128(r0));
                _mm_storel_epi64((__m128i *)(tmp + 32 * (2 * e + 16) + 16), _mm256_extracti128_si256(r0, 1));
                _mm_storel_epi64((__m128i *)(tmp + 32 * (2 * e + 1) + 16), _mm256_castsi256_si128(r1));
                _mm_storel_epi64((__m128i *)(tmp + 32 * (2 * e + 17) + 16), _mm256_extracti128_si256(r1, 1));
            }
        }
    }
}

AVX2 static void gemv_lut_avx2(const bt_mm *a, int64_t row0, int64_t row1) {
    const int64_t nb = a->Kp / BT_BLOCK_LUT, full = a->N / BT_LUT_ROWS;
    const size_t per = (size_t)(a->Kp / 3) * 32;
    int32_t acc[BT_LUT_ROWS], acc2[BT_LUT_ROWS];
    for (int64_t g = row0 / BT_LUT_ROWS; g * BT_LUT_ROWS < row1; g++) {
        const int64_t n0 = g * BT_LUT_ROWS;
        if (g < full) {
            /* g and g + 1 share a region (g even, both full) and g + 1 is ours too: one interleaved stream */
            const uint8_t *pa = bt_lut_block0(a, g), *ca = bt_lut_counts(a, g);
            const int64_t stride = bt_lut_block_stride(a, g);
            const int two = !(g & 1) && stride == 320 && (g + 1) * BT_LUT_ROWS < row1;
            if (a->T > 1 && BT_LUT_TOKENS) { /* several tokens: each group once per 2-3 tokens */
                int32_t o[3][BT_LUT_ROWS];
                for (int h = 0; h <= two; h++) {
                    const uint8_t *ph = pa + 160 * h, *ch = ca + 64 * h;
                    for (int64_t t = 0; t < a->T;) {
                        const int tt = a->T - t == 2 || a->T - t == 4 ? 2 : 3 < a->T - t ? 3 : (int)(a->T - t);
                        if (tt == 1)
                            gemv_lut_group2(ph, ph, stride, ch, ch, nb, a->lut + per * (size_t)t, o[0], acc2, 0);
                        else if (tt == 2)
                            gemv_lut_tokens_2(ph, stride, ch, nb, a->lut + per * (size_t)t, per, o);
                        else
                            gemv_lut_tokens_3(ph, stride, ch, nb, a->lut + per * (size_t)t, per, o);
                        for (int i = 0; i < tt; i++)
                            for (int r = 0; r < BT_LUT_ROWS; r++)
                                bt_store(a, t + i, n0 + BT_LUT_ROWS * h + r, o[i][r] + a->rowsum[t + i]);
                        t += tt;
                    }
                }
                g += two;
                continue;
            }
            for (int64_t t = 0; t < a->T; t++) {
                if (two)
                    gemv_lut_group2(pa, pa + 160, stride, ca, ca + 64, nb, a->lut + per * (size_t)t, acc, acc2, 1);
                else
                    gemv_lut_group2(pa, pa, stride, ca, ca, nb, a->lut + per * (size_t)t, acc, acc2, 0);
                for (int r = 0; r < BT_LUT_ROWS; r++) bt_store(a, t, n0 + r, acc[r] + a->rowsum[t]);
                if (two)
                    for (int r = 0; r < BT_LUT_ROWS; r++) bt_store(a, t, n0 + BT_LUT_ROWS + r, acc2[r] + a->rowsum[t]);
            }
            g += two;
            continue;
        }
        for (int64_t t = 0; t < a->T; t++) /* the short last group: portable path */
            for (int64_t n = n0; n < a->N; n++) bt_store(a, t, n, bt_lut_dot_row(a, n, a->q + t * a->ldq) + a->rowsum[t]);
    }
}

/* Rows ra, ra + 1 (lane 0: low and high 8 bytes of x) and ra + 16, ra + 17 (lane 1) of a group, one 8-byte
 * piece each, to the pair-interleaved panel (ra even: the rows of a pair share a slice, the second at +32). */
AVX2_INLINE void lut_put_pieces(__m256i x, uint8_t *dst, int64_t width, int ra, int64_t off) {
    uint8_t *p = dst + (ra >> 1) * 2 * width + off, *p16 = p + 16 * width;
    const __m128i lo = _mm256_castsi256_si128(x), hi = _mm256_extracti128_si256(x, 1);
    _mm_storel_epi64((__m128i *)p, lo);
    _mm_storeh_pd((double *)(void *)(p + 32), _mm_castsi128_pd(lo));
    _mm_storel_epi64((__m128i *)p16, hi);
    _mm_storeh_pd((double *)(void *)(p16 + 32), _mm_castsi128_pd(hi));
}

/* A full group's nb blocks (block b at blk + b * stride) straight into the pair-interleaved GEMM panel, the
 * group's row 0 at dst (an even panel row): the transposes stop at 8-byte row pieces (dwords), stored where
 * the panel wants them (piece c of block b holds columns 24 b + 8 c .. + 7, never across a 32-column
 * slice), so no row copy is needed; columns 16-23 take a transpose of 8 columns only. */
AVX2 static void lut_decode_group_avx2(const uint8_t *blk, int64_t stride, int64_t nb, uint8_t *dst, int64_t width) {
    for (int64_t b = 0; b < nb; b++, blk += stride) {
        __m256i V[24];
        lut_block_columns(blk, V);
        int64_t off[3];
        for (int c = 0; c < 3; c++) {
            const int64_t k = 24 * b + 8 * c;
            off[c] = (k >> 5) * 64 + (k & 31);
        }
        { /* columns 0-15 */
            __m256i S1[2][8], S2[4][4];
            for (int i = 0; i < 8; i++) {
                S1[0][i] = _mm256_unpacklo_epi8(V[2 * i], V[2 * i + 1]); /* rows 0-7, columns 2i, 2i+1 */
                S1[1][i] = _mm256_unpackhi_epi8(V[2 * i], V[2 * i + 1]); /* rows 8-15 */
            }
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 4; i++) { /* columns 4i .. 4i+3 */
                    S2[2 * h][i] = _mm256_unpacklo_epi16(S1[h][2 * i], S1[h][2 * i + 1]);     /* rows 8h+0..3 */
                    S2[2 * h + 1][i] = _mm256_unpackhi_epi16(S1[h][2 * i], S1[h][2 * i + 1]); /* rows 8h+4..7 */
                }
            for (int q = 0; q < 4; q++)
                for (int i = 0; i < 2; i++) { /* columns 8i .. 8i+7 of rows 4q .. 4q+3 */
                    lut_put_pieces(_mm256_unpacklo_epi32(S2[q][2 * i], S2[q][2 * i + 1]), dst, width, 4 * q, off[i]);
                    lut_put_pieces(_mm256_unpackhi_epi32(S2[q][2 * i], S2[q][2 * i + 1]), dst, width, 4 * q + 2, off[i]);
                }
        }
        { /* columns 16-23 */
            __m256i S1[2][4], S2[4][2];
            for (int i = 0; i < 4; i++) {
                S1[0][i] = _mm256_unpacklo_epi8(V[16 + 2 * i], V[17 + 2 * i]);
                S1[1][i] = _mm256_unpackhi_epi8(V[16 + 2 * i], V[17 + 2 * i]);
            }
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 2; i++) {
                    S2[2 * h][i] = _mm256_unpacklo_epi16(S1[h][2 * i], S1[h][2 * i + 1]);
                    S2[2 * h + 1][i] = _mm256_unpackhi_epi16(S1[h][2 * i], S1[h][2 * i + 1]);
                }
            for (int q = 0; q < 4; q++) {
                lut_put_pieces(_mm256_unpacklo_epi32(S2[q][0], S2[q][1]), dst, width, 4 * q, off[2]);
                lut_put_pieces(_mm256_unpackhi_epi32(S2[q][0], S2[q][1]), dst, width, 4 * q + 2, off[2]);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * GEMM: decode a panel of rows to bytes once, then a register-blocked RM x TN microkernel reuses every
 * loaded weight vector for TN tokens and every activation vector for RM rows.
 */

/* The decoded panel (code + 1 per byte) is stored pair-interleaved so the microkernel reads one
 * sequential stream per row pair: rows 2p and 2p+1 alternate 32-byte slices, [p][slice][2][32];
 * when nrows is odd the last row is stored alone, [slice][32]. */
BT_INLINE uint8_t *dslot(uint8_t *dst, int64_t r, int64_t nrows, int64_t Kp, int64_t slice) {
    if ((nrows & 1) && r == nrows - 1) return dst + r * Kp + 32 * slice;
    return dst + (r >> 1) * 2 * Kp + 64 * slice + 32 * (r & 1);
}

AVX2 static void decode_avx2(const bt_mm *a, int64_t row0, int64_t nrows, uint8_t *dst) {
    const int is2 = a->fmt == BT_FMT_2BIT_R4;
    const int blk = is2 ? BT_BLOCK_2B : BT_BLOCK_1P6;
    const int nf = blk / 32; /* slices per block */
    const int64_t nb = a->Kp / blk;
    const __m256i m3 = _mm256_set1_epi8(3);
    TRITS_DECL
    for (int64_t r = 0; r < nrows;) {
        int64_t n = row0 + r;
        int64_t g = n / BT_GROUP, rg = n % BT_GROUP;
        int64_t gr = a->N - g * BT_GROUP < BT_GROUP ? a->N - g * BT_GROUP : BT_GROUP;
        int64_t rows_here = gr - rg < nrows - r ? gr - rg : nrows - r;
        const uint8_t *p = bt_group_ptr(a, g);
        for (int64_t b = 0; b < nb; b++) {
            for (int64_t i = 0; i < rows_here; i++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(p + (b * gr + rg + i) * 32));
                uint8_t *d = dslot(dst, r + i, nrows, a->Kp, b * nf);
                const int64_t ss = ((nrows & 1) && r + i == nrows - 1) ? 32 : 64; /* slice stride */
                if (is2) {
                    _mm256_storeu_si256((__m256i *)d, _mm256_and_si256(w, m3));
                    _mm256_storeu_si256((__m256i *)(d + ss), _mm256_and_si256(_mm256_srli_epi16(w, 2), m3));
                    _mm256_storeu_si256((__m256i *)(d + 2 * ss), _mm256_and_si256(_mm256_srli_epi16(w, 4), m3));
                    _mm256_storeu_si256((__m256i *)(d + 3 * ss), _mm256_and_si256(_mm256_srli_epi16(w, 6), m3));
                } else {
                    __m256i x = w;
                    for (int j = 0; j < 5; j++) {
                        _mm256_storeu_si256((__m256i *)(d + ss * j), trit_of(x, c_lo, c_hi));
                        x = times3(x);
                    }
                }
            }
        }
        r += rows_here;
    }
}

/* Generic RM x TN microkernel (RM <= 2, TN <= 4; edges of a panel): out[r][t] = sum_k D[r][k] * Q[t][k]
 * over nsl slices of 32 columns; row r's slice s is at D + r * ldd + s * sst. */
AVX2_INLINE void microkernel(const uint8_t *D, int64_t ldd, int64_t sst, const int8_t *Q, int64_t ldq, int64_t nsl,
                             const int RM, const int TN, int32_t *out /* [RM][TN] */) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc32[2 * 4];
#pragma GCC unroll 8
    for (int i = 0; i < RM * TN; i++) acc32[i] = _mm256_setzero_si256();
    for (int64_t s0 = 0; s0 < nsl; s0 += BT_WIDEN_SLICES) {
        int64_t s1 = s0 + BT_WIDEN_SLICES < nsl ? s0 + BT_WIDEN_SLICES : nsl;
        __m256i acc[2 * 4];
#pragma GCC unroll 8
        for (int i = 0; i < RM * TN; i++) acc[i] = _mm256_setzero_si256();
        for (int64_t s = s0; s < s1; s++) {
#pragma GCC unroll 2
            for (int r = 0; r < RM; r++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(D + r * ldd + sst * s));
#pragma GCC unroll 4
                for (int t = 0; t < TN; t++)
                    acc[r * TN + t] = _mm256_add_epi16(
                        acc[r * TN + t], _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(Q + t * ldq + 32 * s))));
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < RM * TN; i++) acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(acc[i], ones));
    }
#pragma GCC unroll 8
    for (int i = 0; i < RM * TN; i++) out[i] = hsum1(acc32[i]);
}

#define MK_DEF(rm, tn)                                                                                         \
    AVX2 static void mk_##rm##_##tn(const uint8_t *D, int64_t ldd, int64_t sst, const int8_t *Q, int64_t ldq,  \
                                    int64_t nsl, int32_t *out) {                                               \
        microkernel(D, ldd, sst, Q, ldq, nsl, rm, tn, out);                                                    \
    }
typedef void (*mk_fn)(const uint8_t *, int64_t, int64_t, const int8_t *, int64_t, int64_t, int32_t *);
MK_DEF(1, 1) MK_DEF(1, 2) MK_DEF(1, 3) MK_DEF(1, 4) MK_DEF(2, 1) MK_DEF(2, 2) MK_DEF(2, 3)
static const mk_fn MK_EDGE[3][5] = {{0, 0, 0, 0, 0},
                                    {0, mk_1_1, mk_1_2, mk_1_3, mk_1_4},
                                    {0, mk_2_1, mk_2_2, mk_2_3, 0}};

/* The main microkernel: 2 rows x 4 tokens, 8 maddubs + 8 adds per 6 loads (32 columns); out[2 t + r] is
 * row r's sum for token t (the pair of a token is adjacent, as in the token-major accumulators).
 * GCC spills accumulators in the C version of the loop (kept below for other compilers), so with GNU C
 * it is assembly with fixed registers: ymm8-15 accumulate int16 sums, ymm4-7 hold the activations of the
 * 4 tokens and ymm0/1 the weights of the 2 rows for one 32-column slice. Every BT_WIDEN_SLICES slices the
 * sums are widened (madd with ones) into int32 partial sums kept in memory; the last period reduces
 * the 8 int32 vectors horizontally and writes out[r*4 + t] directly. AT&T operand order throughout
 * (vpmaddubsw signed_src, unsigned_src, dst). In isolation the loop runs at ~160 G MAC/s here. */
#define MK_RM 2
#define MK_TN 4
#if defined(__GNUC__) && !defined(BT_NO_ASM)
__attribute__((noinline)) AVX2 static void mk_2_4(const uint8_t *D, const int8_t *Q, int64_t ldq, int64_t nsl, int32_t *out) {
    __m256i acc32[8];
    const uint8_t *d0 = D, *d1 = D + 32; /* pair-interleaved: slice s of row 0 at 64 s, row 1 at 64 s + 32 */
    const int8_t *q0 = Q, *q1 = Q + ldq, *q2 = Q + 2 * ldq, *q3 = Q + 3 * ldq;
    for (int64_t s0 = 0; s0 < nsl; s0 += BT_WIDEN_SLICES) {
        const int64_t s1 = s0 + BT_WIDEN_SLICES < nsl ? s0 + BT_WIDEN_SLICES : nsl;
        const int64_t first = s0 == 0, last = s1 >= nsl;
        int64_t o = 32 * s0;
        const int64_t end = 32 * s1;
        __asm__ volatile(
            "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"
            "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
            "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"
            "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
            "vpxor %%xmm12, %%xmm12, %%xmm12\n\t"
            "vpxor %%xmm13, %%xmm13, %%xmm13\n\t"
            "vpxor %%xmm14, %%xmm14, %%xmm14\n\t"
            "vpxor %%xmm15, %%xmm15, %%xmm15\n\t"
            ".p2align 5\n\t"
            "1:\n\t"
            "vmovdqu (%[q0],%[o]), %%ymm4\n\t"
            "vmovdqu (%[q1],%[o]), %%ymm5\n\t"
            "vmovdqu (%[q2],%[o]), %%ymm6\n\t"
            "vmovdqu (%[q3],%[o]), %%ymm7\n\t"
            "vmovdqu (%[d0],%[o],2), %%ymm0\n\t"
            "vmovdqu (%[d1],%[o],2), %%ymm1\n\t"
            "vpmaddubsw %%ymm4, %%ymm0, %%ymm2\n\t"
            "vpmaddubsw %%ymm5, %%ymm0, %%ymm3\n\t"
            "vpaddw %%ymm2, %%ymm8, %%ymm8\n\t"
            "vpaddw %%ymm3, %%ymm9, %%ymm9\n\t"
            "vpmaddubsw %%ymm6, %%ymm0, %%ymm2\n\t"
            "vpmaddubsw %%ymm7, %%ymm0, %%ymm3\n\t"
            "vpaddw %%ymm2, %%ymm10, %%ymm10\n\t"
            "vpaddw %%ymm3, %%ymm11, %%ymm11\n\t"
            "vpmaddubsw %%ymm4, %%ymm1, %%ymm2\n\t"
            "vpmaddubsw %%ymm5, %%ymm1, %%ymm3\n\t"
            "vpaddw %%ymm2, %%ymm12, %%ymm12\n\t"
            "vpaddw %%ymm3, %%ymm13, %%ymm13\n\t"
            "vpmaddubsw %%ymm6, %%ymm1, %%ymm2\n\t"
            "vpmaddubsw %%ymm7, %%ymm1, %%ymm3\n\t"
            "vpaddw %%ymm2, %%ymm14, %%ymm14\n\t"
            "vpaddw %%ymm3, %%ymm15, %%ymm15\n\t"
            "add $32, %[o]\n\t"
            "cmp %[end], %[o]\n\t"
            "jl 1b\n\t"
            /* widen: int16 pairs -> int32 */
            "vpcmpeqw %%ymm0, %%ymm0, %%ymm0\n\t"
            "vpsrlw $15, %%ymm0, %%ymm0\n\t"
            "vpmaddwd %%ymm0, %%ymm8, %%ymm8\n\t"
            "vpmaddwd %%ymm0, %%ymm9, %%ymm9\n\t"
            "vpmaddwd %%ymm0, %%ymm10, %%ymm10\n\t"
            "vpmaddwd %%ymm0, %%ymm11, %%ymm11\n\t"
            "vpmaddwd %%ymm0, %%ymm12, %%ymm12\n\t"
            "vpmaddwd %%ymm0, %%ymm13, %%ymm13\n\t"
            "vpmaddwd %%ymm0, %%ymm14, %%ymm14\n\t"
            "vpmaddwd %%ymm0, %%ymm15, %%ymm15\n\t"
            "test %[first], %[first]\n\t"
            "jnz 4f\n\t"
            "vpaddd 0(%[acc]), %%ymm8, %%ymm8\n\t"
            "vpaddd 32(%[acc]), %%ymm9, %%ymm9\n\t"
            "vpaddd 64(%[acc]), %%ymm10, %%ymm10\n\t"
            "vpaddd 96(%[acc]), %%ymm11, %%ymm11\n\t"
            "vpaddd 128(%[acc]), %%ymm12, %%ymm12\n\t"
            "vpaddd 160(%[acc]), %%ymm13, %%ymm13\n\t"
            "vpaddd 192(%[acc]), %%ymm14, %%ymm14\n\t"
            "vpaddd 224(%[acc]), %%ymm15, %%ymm15\n\t"
            "4:\n\t"
            "test %[last], %[last]\n\t"
            "jnz 5f\n\t"
            "vmovdqu %%ymm8, 0(%[acc])\n\t"
            "vmovdqu %%ymm9, 32(%[acc])\n\t"
            "vmovdqu %%ymm10, 64(%[acc])\n\t"
            "vmovdqu %%ymm11, 96(%[acc])\n\t"
            "vmovdqu %%ymm12, 128(%[acc])\n\t"
            "vmovdqu %%ymm13, 160(%[acc])\n\t"
            "vmovdqu %%ymm14, 192(%[acc])\n\t"
            "vmovdqu %%ymm15, 224(%[acc])\n\t"
            "jmp 6f\n\t"
            /* horizontal sums of the 8 vectors -> out[0..7] */
            "5:\n\t"
            "vphaddd %%ymm12, %%ymm8, %%ymm8\n\t"
            "vphaddd %%ymm13, %%ymm9, %%ymm9\n\t"
            "vphaddd %%ymm14, %%ymm10, %%ymm10\n\t"
            "vphaddd %%ymm15, %%ymm11, %%ymm11\n\t"
            "vphaddd %%ymm9, %%ymm8, %%ymm8\n\t"
            "vphaddd %%ymm11, %%ymm10, %%ymm10\n\t"
            "vperm2i128 $0x20, %%ymm10, %%ymm8, %%ymm0\n\t"
            "vperm2i128 $0x31, %%ymm10, %%ymm8, %%ymm1\n\t"
            "vpaddd %%ymm1, %%ymm0, %%ymm0\n\t"
            "vmovdqu %%ymm0, (%[out])\n\t"
            "6:\n\t"
            : [o] "+r"(o)
            : [q0] "r"(q0), [q1] "r"(q1), [q2] "r"(q2), [q3] "r"(q3), [d0] "r"(d0), [d1] "r"(d1), [end] "r"(end),
              [acc] "r"(acc32), [out] "r"(out), [first] "r"(first), [last] "r"(last)
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
              "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
    }
}
#else
AVX2 static void mk_2_4(const uint8_t *D, const int8_t *Q, int64_t ldq, int64_t nsl, int32_t *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc32[8];
    for (int i = 0; i < 8; i++) acc32[i] = _mm256_setzero_si256();
    const uint8_t *d0 = D, *d1 = D + 32;
    const int8_t *q0 = Q, *q1 = Q + ldq, *q2 = Q + 2 * ldq, *q3 = Q + 3 * ldq;
    for (int64_t s0 = 0; s0 < nsl; s0 += BT_WIDEN_SLICES) {
        int64_t s1 = s0 + BT_WIDEN_SLICES < nsl ? s0 + BT_WIDEN_SLICES : nsl;
        __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
        __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
        for (int64_t o = 32 * s0; o < 32 * s1; o += 32) {
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(q0 + o));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(q1 + o));
            const __m256i a2 = _mm256_loadu_si256((const __m256i *)(q2 + o));
            const __m256i a3 = _mm256_loadu_si256((const __m256i *)(q3 + o));
            __m256i w = _mm256_loadu_si256((const __m256i *)(d0 + 2 * o));
            c00 = _mm256_add_epi16(c00, _mm256_maddubs_epi16(w, a0));
            c01 = _mm256_add_epi16(c01, _mm256_maddubs_epi16(w, a1));
            c02 = _mm256_add_epi16(c02, _mm256_maddubs_epi16(w, a2));
            c03 = _mm256_add_epi16(c03, _mm256_maddubs_epi16(w, a3));
            w = _mm256_loadu_si256((const __m256i *)(d1 + 2 * o));
            c10 = _mm256_add_epi16(c10, _mm256_maddubs_epi16(w, a0));
            c11 = _mm256_add_epi16(c11, _mm256_maddubs_epi16(w, a1));
            c12 = _mm256_add_epi16(c12, _mm256_maddubs_epi16(w, a2));
            c13 = _mm256_add_epi16(c13, _mm256_maddubs_epi16(w, a3));
        }
        acc32[0] = _mm256_add_epi32(acc32[0], _mm256_madd_epi16(c00, ones));
        acc32[1] = _mm256_add_epi32(acc32[1], _mm256_madd_epi16(c01, ones));
        acc32[2] = _mm256_add_epi32(acc32[2], _mm256_madd_epi16(c02, ones));
        acc32[3] = _mm256_add_epi32(acc32[3], _mm256_madd_epi16(c03, ones));
        acc32[4] = _mm256_add_epi32(acc32[4], _mm256_madd_epi16(c10, ones));
        acc32[5] = _mm256_add_epi32(acc32[5], _mm256_madd_epi16(c11, ones));
        acc32[6] = _mm256_add_epi32(acc32[6], _mm256_madd_epi16(c12, ones));
        acc32[7] = _mm256_add_epi32(acc32[7], _mm256_madd_epi16(c13, ones));
    }
    int32_t r0[4], r1[4];
    _mm_storeu_si128((__m128i *)r0, hsum4(acc32[0], acc32[1], acc32[2], acc32[3]));
    _mm_storeu_si128((__m128i *)r1, hsum4(acc32[4], acc32[5], acc32[6], acc32[7]));
    for (int t = 0; t < 4; t++) {
        out[2 * t] = r0[t];
        out[2 * t + 1] = r1[t];
    }
}
#endif


/* y[t, n0 .. n0+n) from raw accumulators acc[0..n): vectorised bt_store (same float32 arithmetic). */
AVX2_INLINE void store_row_block(const bt_mm *a, int64_t t, int64_t n0, const int32_t *acc, int64_t n) {
    const int32_t rs = a->rowsum[t];
    const __m256i vrs = _mm256_set1_epi32(rs);
    int64_t i = 0;
    if (a->y) {
        const float f = a->f[t];
        const __m256 vf = _mm256_set1_ps(f);
        float *y = a->y + t * a->ldy + n0;
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(acc + i)), vrs);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vf));
        }
        for (; i < n; i++) y[i] = (float)(acc[i] - rs) * f;
    } else {
        int32_t *yi = a->yi + t * a->ldy + n0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_si256((__m256i *)(yi + i), _mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(acc + i)), vrs));
        for (; i < n; i++) yi[i] = acc[i] - rs;
    }
}

static _Thread_local int32_t *tl_acc = NULL;
static _Thread_local size_t tl_acc_cap = 0;

/* K in chunks of at most BT_KC_SLICES slices; per chunk, tokens in tiles of 4 (a tile's activations
 * stay in L1) and row pairs (the chunk of the decoded panel stays in L2 for all tiles; each pair is
 * one sequential stream). int32 partial sums for all tokens x panel rows live in a per-thread buffer,
 * token-major, so the epilogue is a vector loop per token. */
AVX2 static void gemm_decoded_avx2(const bt_mm *a, int64_t row0, int64_t nrows, const uint8_t *D, int64_t t0,
                                   int64_t t1) {
    const int64_t nsl = a->Kp / 32;
    const int64_t nch = (nsl + BT_KC_SLICES - 1) / BT_KC_SLICES;
    const int64_t csl = (nsl + nch - 1) / nch; /* balanced chunks */
    const int64_t npairs = nrows / 2;
    const size_t need = (size_t)((t1 - t0) * nrows);
    if (need > tl_acc_cap) {
        free(tl_acc);
        tl_acc = (int32_t *)malloc(need * sizeof(int32_t));
        tl_acc_cap = tl_acc ? need : 0;
        if (!tl_acc) { /* out of memory: fall back to the generic edge kernels one token at a time */
            int32_t o[1];
            for (int64_t t = t0; t < t1; t++)
                for (int64_t r = 0; r < nrows; r++) {
                    int32_t sum = 0;
                    for (int64_t c0 = 0; c0 < nsl; c0 += csl) {
                        const int64_t cn = nsl - c0 < csl ? nsl - c0 : csl;
                        const uint8_t *Dr = (nrows & 1) && r == nrows - 1 ? D + r * a->Kp + 32 * c0
                                                                          : D + (r >> 1) * 2 * a->Kp + 32 * (r & 1) + 64 * c0;
                        MK_EDGE[1][1](Dr, 0, ((nrows & 1) && r == nrows - 1) ? 32 : 64, a->q + t * a->ldq + 32 * c0,
                                      a->ldq, cn, o);
                        sum += o[0];
                    }
                    bt_store(a, t, row0 + r, sum);
                }
            return;
        }
    }
    int32_t *acc = tl_acc; /* acc[(t - t0) * nrows + r] */
    int32_t out[16];
    for (int64_t c0 = 0; c0 < nsl; c0 += csl) {
        const int64_t cn = nsl - c0 < csl ? nsl - c0 : csl;
        const int first = c0 == 0;
        for (int64_t t = t0; t < t1; t += MK_TN) {
            const int tn = t1 - t < MK_TN ? (int)(t1 - t) : MK_TN;
            const int8_t *Qc = a->q + t * a->ldq + 32 * c0;
            int32_t *At = acc + (t - t0) * nrows;
            for (int64_t p = 0; p < npairs; p++) {
                const uint8_t *Dp = D + p * 2 * a->Kp + 64 * c0;
                if (tn == MK_TN) { /* out: the two rows of token j at 2j, 2j + 1 */
                    mk_2_4(Dp, Qc, a->ldq, cn, out);
                    if (first)
                        for (int j = 0; j < MK_TN; j++) memcpy(At + j * nrows + 2 * p, out + 2 * j, 8);
                    else
                        for (int j = 0; j < MK_TN; j++) {
                            At[j * nrows + 2 * p] += out[2 * j];
                            At[j * nrows + 2 * p + 1] += out[2 * j + 1];
                        }
                    continue;
                }
                MK_EDGE[2][tn](Dp, 32, 64, Qc, a->ldq, cn, out); /* out[i * tn + j]: row i, token j */
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < tn; j++) {
                        int32_t *A = At + j * nrows + 2 * p + i;
                        *A = first ? out[i * tn + j] : *A + out[i * tn + j];
                    }
            }
            if (nrows & 1) { /* lone last row, slices contiguous */
                MK_EDGE[1][tn](D + (nrows - 1) * a->Kp + 32 * c0, 0, 32, Qc, a->ldq, cn, out);
                for (int j = 0; j < tn; j++) {
                    int32_t *A = At + j * nrows + nrows - 1;
                    *A = first ? out[j] : *A + out[j];
                }
            }
        }
    }
    for (int64_t t = t0; t < t1; t++) store_row_block(a, t, row0, acc + (t - t0) * nrows, nrows);
}

/* ------------------------------------------------------------------------------------------------
 * GEMM by tables of token vectors (prefill-sized T; bt_api.c picks it from BITTERN_TABLE_GEMM_MIN_T).
 *
 * The codes of 4 consecutive columns of a row form one of 81 patterns, idx = sum_j (c_j + 1) 3^j. For a
 * tile of 16 tokens and a 32-column chunk, a table holds for each of the chunk's 8 column groups and
 * each pattern the 16 tokens' sums sum_j c_j q[t, k + j] (int16, |.| <= 4 * 128). A row's product with
 * the tile is then one 256-bit add per 4 columns (64 MACs) of the table vector at a precomputed byte
 * offset (uint16 per row and group: (g * 81 + idx) * 32), where the maddubs GEMM needs one maddubs and
 * one add per 32 MACs and tops out at ~160 G MAC/s on one Zen 3 core. The tables (8 x 81 x 32 bytes =
 * 20.7 KB) stay in L1 while every row of a work item passes, which shares their cost. int16 sums are
 * exact for TG_WIDEN chunks (7 x 8 x 512 = 28672 <= 32767), then widen to int32.
 */
#define TG_G 8     /* column groups (of 4) per chunk: one 32-column slice */
#define TG_E 81    /* patterns of 4 ternary codes */
#define TG_TILE 16 /* tokens per table vector (int16 lanes of a 256-bit register) */
#define TG_WIDEN BT_TG_WINDOW
#ifndef BT_TG_PREFETCH
#define BT_TG_PREFETCH 2048 /* bytes of packed weights prefetched ahead of the conversion to offsets */
#endif

/* Offsets of row r and slice s, slices ldo rows apart (bt_tg_ldo: a little more than the item's rows):
 * slice-major, so the product reads each slice's offsets of all rows as one sequential stream. */
BT_INLINE int64_t tg_off_index(int64_t s, int64_t r, int64_t ldo) { return (s * ldo + r) * TG_G; }

/* Pattern offsets of two 32-column slices a and b of one row, from their codes + 1 already paired by
 * maddubs (pa[i] = 4 (c[2i] + 3 c[2i + 1]) for byte pair i, values <= 48 even with a corrupt field 3):
 * a second maddubs with (8, 72) gives 32 idx per 4-column group, the clamp keeps a corrupt group inside its
 * 81 entries, and the group's base is added; 8 uint16 to da and to db. */
AVX2_INLINE void tg_put_pair(__m256i pa, __m256i pb, uint16_t *da, uint16_t *db) {
    const __m256i w872 = _mm256_set1_epi16(0x4808), top = _mm256_set1_epi16(32 * (TG_E - 1));
    const __m256i base = _mm256_setr_epi16(0, 32 * 81, 32 * 162, 32 * 243, 0, 32 * 81, 32 * 162, 32 * 243, 32 * 324,
                                           32 * 405, 32 * 486, 32 * 567, 32 * 324, 32 * 405, 32 * 486, 32 * 567);
    /* lanes after the pack and the second maddubs: [a g0-3, b g0-3 | a g4-7, b g4-7] */
    const __m256i i = _mm256_maddubs_epi16(_mm256_packus_epi16(pa, pb), w872);
    const __m256i o = _mm256_permute4x64_epi64(_mm256_add_epi16(_mm256_min_epi16(i, top), base), 0xd8);
    _mm_storeu_si128((__m128i *)da, _mm256_castsi256_si128(o));
    _mm_storeu_si128((__m128i *)db, _mm256_extracti128_si256(o, 1));
}

/* Panel rows (decoded codes + 1, pair-interleaved as dslot) to the pattern offsets of item rows r0.. (only
 * the rows of a short last 1.67bit-lut group come this way; the rest convert without a panel), two slices
 * at a time (an odd last slice is paired with itself). */
AVX2 static void tg_convert_avx2(const uint8_t *D, int64_t nrows, int64_t Kd, uint16_t *off, int64_t ldo,
                                int64_t r0) {
    const __m256i w412 = _mm256_set1_epi16(0x0c04);
    const int64_t nsl = Kd / 32;
    for (int64_t s = 0; s < nsl; s += 2) {
        const int64_t s2 = s + 1 < nsl ? s + 1 : s;
        for (int64_t r = 0; r < nrows; r++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)dslot((uint8_t *)D, r, nrows, Kd, s));
            const __m256i b = _mm256_loadu_si256((const __m256i *)dslot((uint8_t *)D, r, nrows, Kd, s2));
            tg_put_pair(_mm256_maddubs_epi16(a, w412), _mm256_maddubs_epi16(b, w412), off + tg_off_index(s, r0 + r, ldo),
                        off + tg_off_index(s2, r0 + r, ldo));
        }
    }
}

/* Rows [row0, row0 + nrows) of a *-r4 layout (row0 a multiple of 4) straight to the offsets of item rows
 * r0.. (no byte panel): each 32-byte block of a row gives its 4 (2 bits) or 5 (1.6 bits) slices of codes
 * + 1, converted two at a time (tg_put_pair). 2 bits: fields 0 and 2 are taken as codes (weights 4, 12),
 * fields 1 and 3 in place, i.e. 4 x codes (weights 1, 3), so one shift serves all four. A group's rows
 * are adjacent in the offsets, so each slice's stores fill whole lines. */
AVX2 static void tg_convert_r4_avx2(const bt_mm *a, int64_t row0, int64_t nrows, uint16_t *off, int64_t ldo,
                                   int64_t r0) {
    const int is2 = a->fmt == BT_FMT_2BIT_R4;
    const int nf = is2 ? BT_BLOCK_2B / 32 : BT_BLOCK_1P6 / 32;
    const int64_t nb = a->Kp / (32 * nf);
    const __m256i m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
    const __m256i w412 = _mm256_set1_epi16(0x0c04), w13 = _mm256_set1_epi16(0x0301);
    const int64_t sst = tg_off_index(1, 0, ldo); /* next slice */
    TRITS_DECL
    for (int64_t r = 0; r < nrows;) {
        const int64_t g = (row0 + r) / BT_GROUP;
        const int64_t gr = a->N - g * BT_GROUP < BT_GROUP ? a->N - g * BT_GROUP : BT_GROUP;
        const int64_t rows_here = gr < nrows - r ? gr : nrows - r;
        const uint8_t *p = bt_group_ptr(a, g);
        for (int64_t b = 0; b < nb; b++) {
            for (int64_t i = 0; i < rows_here; i++) {
#if BT_TG_PREFETCH > 0
                if (!(i & 1)) _mm_prefetch((const char *)p + (b * gr + i) * 32 + BT_TG_PREFETCH, _MM_HINT_T0);
#endif
                const __m256i w = _mm256_loadu_si256((const __m256i *)(p + (b * gr + i) * 32));
                uint16_t *dst = off + tg_off_index(nf * b, r0 + r + i, ldo);
                if (is2) {
                    const __m256i w4 = _mm256_srli_epi16(w, 4);
                    tg_put_pair(_mm256_maddubs_epi16(_mm256_and_si256(w, m3), w412),
                                _mm256_maddubs_epi16(_mm256_and_si256(w, m12), w13), dst, dst + sst);
                    tg_put_pair(_mm256_maddubs_epi16(_mm256_and_si256(w4, m3), w412),
                                _mm256_maddubs_epi16(_mm256_and_si256(w4, m12), w13), dst + 2 * sst, dst + 3 * sst);
                } else {
                    __m256i x = w, t[5];
                    for (int j = 0; j < 5; j++) {
                        t[j] = _mm256_maddubs_epi16(trit_of(x, c_lo, c_hi), w412);
                        x = times3(x);
                    }
                    tg_put_pair(t[0], t[1], dst, dst + sst);
                    tg_put_pair(t[2], t[3], dst + 2 * sst, dst + 3 * sst);
                    tg_put_pair(t[4], t[4], dst + 4 * sst, dst + 4 * sst);
                }
            }
        }
        r += rows_here;
    }
}

/* The 6 pattern vectors of one block of a full 1.67bit-lut group (24 columns, 32 rows; Q[q], byte r: the
 * base-3 index sum_j (c_j + 1) 3^j of columns 4q..4q+3 of row r). Every 4 triples t0..t3 (12 columns) hold
 * 3 patterns, each the sum of two functions of a triple's codes: centred on 40 (all codes zero),
 *   pattern 0 = (c0 + 3 c1 + 9 c2)(t0) + 27 c0(t1),  pattern 1 = (c1 + 3 c2)(t1) + 9 (c0 + 3 c1)(t2),
 *   pattern 2 = c2(t2) + 3 (c0 + 3 c1 + 9 c2)(t3),
 * each function looked up by the triple's canonical index (pshufb) and negated with its sign (psignb);
 * the invalid indices 14 and 15 read as zero codes, so no pattern leaves 0..80. */
AVX2_INLINE void lut_block_quads(const uint8_t *blk, __m256i Q[6]) {
    const __m256i m15 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1), c40 = _mm256_set1_epi8(40);
    const __m256i bits = _mm256_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32,
                                          32, 64, 64, 64, 64, -128, -128, -128, -128);
#define LUT_FN(...) _mm256_broadcastsi128_si256(_mm_setr_epi8(__VA_ARGS__))
    /* per canonical index (bt_lut.c, LUT_CODES): c0 + 3 c1 + 9 c2, 27 c0, c1 + 3 c2, 9 (c0 + 3 c1), c2, 3 (c0 + 3 c1 + 9 c2) */
    const __m256i fa = LUT_FN(0, 9, -6, 3, 12, -11, -2, 7, -8, 1, 10, -5, 4, 13, 0, 0);
    const __m256i fb = LUT_FN(0, 0, 0, 0, 0, 27, 27, 27, 27, 27, 27, 27, 27, 27, 0, 0);
    const __m256i fc = LUT_FN(0, 3, -2, 1, 4, -4, -1, 2, -3, 0, 3, -2, 1, 4, 0, 0);
    const __m256i fd = LUT_FN(0, 0, 27, 27, 27, -18, -18, -18, 9, 9, 9, 36, 36, 36, 0, 0);
    const __m256i fe = LUT_FN(0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0);
    const __m256i ff = LUT_FN(0, 27, -18, 9, 36, -33, -6, 21, -24, 3, 30, -15, 12, 39, 0, 0);
#undef LUT_FN
    const int32_t *sw = (const int32_t *)(const void *)(blk + 128);
    __m256i idx[8], sg[8];
    for (int k = 0; k < 4; k++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(blk + 32 * k));
        idx[2 * k] = _mm256_and_si256(x, m15);
        idx[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m15);
    }
    for (int j = 0; j < 8; j++) /* -1 for a negated triple, else +1 */
        sg[j] = _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(sw[j]), bits), bits), one);
#define LUT_F(f, j) _mm256_sign_epi8(_mm256_shuffle_epi8(f, idx[j]), sg[j])
    for (int u = 0; u < 2; u++) {
        const int j = 4 * u;
        Q[3 * u] = _mm256_add_epi8(_mm256_add_epi8(LUT_F(fa, j), LUT_F(fb, j + 1)), c40);
        Q[3 * u + 1] = _mm256_add_epi8(_mm256_add_epi8(LUT_F(fc, j + 1), LUT_F(fd, j + 2)), c40);
        Q[3 * u + 2] = _mm256_add_epi8(_mm256_add_epi8(LUT_F(fe, j + 2), LUT_F(ff, j + 3)), c40);
    }
#undef LUT_F
}

/* A full 1.67bit-lut group (32 rows) straight to pattern offsets, rows r0..r0+31 of the item (no byte
 * panel): 4 blocks (96 columns, 3 slices) at a time give their pattern vectors (lut_block_quads, 32 rows
 * per vector), and every slice's 8 pattern vectors are transposed to rows, widened and stored. Columns
 * past Kp have code 0. */
AVX2 static void tg_convert_lut_avx2(const bt_mm *a, int64_t g, int64_t Kd, uint16_t *off, int64_t ldo, int64_t r0) {
    const int64_t nb = a->Kp / BT_BLOCK_LUT, nsl = Kd / 32, stride = bt_lut_block_stride(a, g);
    const uint8_t *blk = bt_lut_block0(a, g);
    const __m256i c40 = _mm256_set1_epi8(40), zero = _mm256_setzero_si256();
    const __m256i base = _mm256_setr_epi16(0, 81, 162, 243, 324, 405, 486, 567, 0, 81, 162, 243, 324, 405, 486, 567);
    for (int64_t set = 0; 3 * set < nsl; set++) {
        __m256i P[24];
        for (int i = 0; i < 4; i++) {
            const int64_t b = 4 * set + i;
            if (b < nb) {
#if BT_TG_PREFETCH > 0
                const char *pf = (const char *)blk + b * stride + BT_TG_PREFETCH;
                _mm_prefetch(pf, _MM_HINT_T0);
                _mm_prefetch(pf + 64, _MM_HINT_T0);
                _mm_prefetch(pf + 128, _MM_HINT_T0);
#endif
                lut_block_quads(blk + b * stride, P + 6 * i);
            } else
                for (int c = 0; c < 6; c++) P[6 * i + c] = c40;
        }
        for (int sl = 0; sl < 3 && 3 * set + sl < nsl; sl++) {
            const int64_t s = 3 * set + sl;
            const __m256i *G = P + 8 * sl;
            /* 8 x 32 bytes (group, row) -> 32 rows of 8 bytes; lanes hold rows 0-15 and 16-31 */
            __m256i A[4], B[4], C[8], D[8];
            for (int k = 0; k < 4; k++) {
                A[k] = _mm256_unpacklo_epi8(G[2 * k], G[2 * k + 1]); /* rows 0-7: groups (2k, 2k+1) */
                B[k] = _mm256_unpackhi_epi8(G[2 * k], G[2 * k + 1]); /* rows 8-15 */
            }
            for (int h = 0; h < 2; h++) {
                const __m256i *X = h ? B : A;
                C[4 * h] = _mm256_unpacklo_epi16(X[0], X[1]);     /* rows 8h+0..3: groups 0-3 */
                C[4 * h + 1] = _mm256_unpackhi_epi16(X[0], X[1]); /* rows 8h+4..7: groups 0-3 */
                C[4 * h + 2] = _mm256_unpacklo_epi16(X[2], X[3]); /* rows 8h+0..3: groups 4-7 */
                C[4 * h + 3] = _mm256_unpackhi_epi16(X[2], X[3]); /* rows 8h+4..7: groups 4-7 */
                D[4 * h] = _mm256_unpacklo_epi32(C[4 * h], C[4 * h + 2]);         /* rows 8h+0, 1 */
                D[4 * h + 1] = _mm256_unpackhi_epi32(C[4 * h], C[4 * h + 2]);     /* rows 8h+2, 3 */
                D[4 * h + 2] = _mm256_unpacklo_epi32(C[4 * h + 1], C[4 * h + 3]); /* rows 8h+4, 5 */
                D[4 * h + 3] = _mm256_unpackhi_epi32(C[4 * h + 1], C[4 * h + 3]); /* rows 8h+6, 7 */
            }
            for (int i = 0; i < 8; i++) { /* D[i]: rows 2i, 2i + 1 (lane 0) and 16 + 2i, 17 + 2i (lane 1) */
                const __m256i lo = _mm256_slli_epi16(_mm256_add_epi16(_mm256_unpacklo_epi8(D[i], zero), base), 5);
                const __m256i hi = _mm256_slli_epi16(_mm256_add_epi16(_mm256_unpackhi_epi8(D[i], zero), base), 5);
                /* unpack per lane: lo = [row 2i | row 16 + 2i], hi = [row 2i + 1 | row 17 + 2i] */
                _mm256_storeu_si256((__m256i *)(off + tg_off_index(s, r0 + 2 * i, ldo)), _mm256_permute2x128_si256(lo, hi, 0x20));
                _mm256_storeu_si256((__m256i *)(off + tg_off_index(s, r0 + 16 + 2 * i, ldo)),
                                    _mm256_permute2x128_si256(lo, hi, 0x31));
            }
        }
    }
}

/* 16 x 16 int16 transpose in place: x[i] (row i) becomes column i. */
AVX2_INLINE void transpose16_epi16(__m256i x[16]) {
    __m256i t[16], u[16];
    for (int i = 0; i < 8; i++) { /* rows 2i, 2i+1: columns 0-3 | 8-11, 4-7 | 12-15 */
        t[2 * i] = _mm256_unpacklo_epi16(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi16(x[2 * i], x[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* rows 4i..4i+3: columns (0,1 | 8,9), (2,3 | 10,11), (4,5 | ..), (6,7 | ..) */
        u[4 * i] = _mm256_unpacklo_epi32(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi32(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi32(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi32(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++) /* rows 8i..8i+7: t[8i + c] = column c | 8 + c */
        for (int k = 0; k < 4; k++) {
            t[8 * i + 2 * k] = _mm256_unpacklo_epi64(u[8 * i + k], u[8 * i + 4 + k]);
            t[8 * i + 2 * k + 1] = _mm256_unpackhi_epi64(u[8 * i + k], u[8 * i + 4 + k]);
        }
    for (int c = 0; c < 8; c++) {
        x[c] = _mm256_permute2x128_si256(t[c], t[8 + c], 0x20);
        x[8 + c] = _mm256_permute2x128_si256(t[c], t[8 + c], 0x31);
    }
}

/* Tables of one tile (tokens q[0..nt) of stride ldq, zeros for the rest) and the 32 columns at col0:
 * tab[(g * 81 + idx) * 16 + t]. */
AVX2 static void tg_tables(const int8_t *q, int64_t ldq, int64_t nt, int64_t col0, int16_t *tab) {
    __m256i lo[TG_TILE], hi[TG_TILE];
    for (int t = 0; t < TG_TILE; t++) {
        const __m256i x = t < nt ? _mm256_loadu_si256((const __m256i *)(q + t * ldq + col0)) : _mm256_setzero_si256();
        lo[t] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x));
        hi[t] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(x, 1));
    }
    transpose16_epi16(lo); /* lo[c]: column c for the 16 tokens; hi[c]: column 16 + c */
    transpose16_epi16(hi);
    for (int g = 0; g < TG_G; g++) {
        const __m256i *A = g < 4 ? lo + 4 * g : hi + 4 * (g - 4);
        const __m256i a0 = A[0], a1 = A[1], a2 = A[2], a3 = A[3];
        const __m256i zero = _mm256_setzero_si256(), n0 = _mm256_sub_epi16(zero, a0);
        /* v[c0 + 3 c1] = (c0 - 1) a0 + (c1 - 1) a1 */
        const __m256i v[9] = {_mm256_sub_epi16(n0, a1), _mm256_sub_epi16(zero, a1), _mm256_sub_epi16(a0, a1),
                              n0, zero, a0, _mm256_add_epi16(n0, a1), a1, _mm256_add_epi16(a0, a1)};
        __m256i *T = (__m256i *)(tab + (int64_t)g * TG_E * TG_TILE);
        for (int c3 = 0; c3 < 3; c3++) {
            const __m256i b3 = c3 == 0 ? _mm256_sub_epi16(zero, a3) : c3 == 1 ? zero : a3;
            for (int c2 = 0; c2 < 3; c2++) {
                const __m256i b = c2 == 0 ? _mm256_sub_epi16(b3, a2) : c2 == 1 ? b3 : _mm256_add_epi16(b3, a2);
                __m256i *Tb = T + 9 * (c2 + 3 * c3);
                for (int i = 0; i < 9; i++) _mm256_store_si256(Tb + i, _mm256_add_epi16(v[i], b));
            }
        }
    }
}

#define TG_ADD(acc, o) acc = _mm256_add_epi16(acc, _mm256_load_si256((const __m256i *)(tb + (o))))

/* Widens row sums (int16, tokens 0-15) into the int32 pair A[0..1]: added, or stored when init. */
AVX2_INLINE void tg_widen(__m256i x, __m256i *A, const int init) {
    const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(x));
    const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1));
    A[0] = init ? lo : _mm256_add_epi32(A[0], lo);
    A[1] = init ? hi : _mm256_add_epi32(A[1], hi);
}

/* One chunk (row r's offsets at o + r * TG_G) of R rows against the tables tb, adding the rows'
 * sums to acc16[r] (first: to zero; last: widened into A[2r..2r+1] instead, init: stored there). The flags
 * are constants at every call, so each form compiles without the others' work. */
AVX2_INLINE void tg_rows(const char *tb, const uint16_t *o, int64_t R, __m256i *acc16, __m256i *A, const int first,
                         const int last, const int init) {
    int64_t r = 0;
    for (; r + 2 <= R; r += 2, o += 2 * TG_G) {
        uint64_t w[4]; /* four scalar loads (one 32-byte copy would be forwarded from a vector store) */
        for (int i = 0; i < 4; i++) memcpy(&w[i], o + 4 * i, 8);
        __m256i s0 = first ? _mm256_setzero_si256() : acc16[r], s1 = first ? _mm256_setzero_si256() : acc16[r + 1];
        __m256i u0 = _mm256_setzero_si256(), u1 = u0;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const uint64_t x0 = w[h], x1 = w[2 + h];
            TG_ADD(s0, x0 & 0xffff);
            TG_ADD(u0, (x0 >> 16) & 0xffff);
            TG_ADD(s1, x1 & 0xffff);
            TG_ADD(u1, (x1 >> 16) & 0xffff);
            TG_ADD(s0, (x0 >> 32) & 0xffff);
            TG_ADD(u0, x0 >> 48);
            TG_ADD(s1, (x1 >> 32) & 0xffff);
            TG_ADD(u1, x1 >> 48);
        }
        s0 = _mm256_add_epi16(s0, u0);
        s1 = _mm256_add_epi16(s1, u1);
        if (last) {
            tg_widen(s0, A + 2 * r, init);
            tg_widen(s1, A + 2 * r + 2, init);
        } else {
            acc16[r] = s0;
            acc16[r + 1] = s1;
        }
    }
    if (r < R) {
        __m256i s0 = first ? _mm256_setzero_si256() : acc16[r];
        for (int g = 0; g < TG_G; g++) TG_ADD(s0, o[g]);
        if (last)
            tg_widen(s0, A + 2 * r, init);
        else
            acc16[r] = s0;
    }
}

/* the forms of tg_rows (kind: bit 0 first, bit 1 last, bit 2 init) */
#define TG_ROWS_DEF(name, f, l, i)                                                                             \
    AVX2 static void name(const char *tb, const uint16_t *o, int64_t R, __m256i *acc16, __m256i *A) {          \
        tg_rows(tb, o, R, acc16, A, f, l, i);                                                                  \
    }
TG_ROWS_DEF(tg_rows_mid, 0, 0, 0)
TG_ROWS_DEF(tg_rows_first, 1, 0, 0)
TG_ROWS_DEF(tg_rows_last, 0, 1, 0)
TG_ROWS_DEF(tg_rows_last_init, 0, 1, 1)
TG_ROWS_DEF(tg_rows_only, 1, 1, 0)
TG_ROWS_DEF(tg_rows_only_init, 1, 1, 1)
typedef void (*tg_rows_fn)(const char *, const uint16_t *, int64_t, __m256i *, __m256i *);
static const tg_rows_fn TG_ROWS[8] = {tg_rows_mid, tg_rows_first, tg_rows_last, tg_rows_only,
                                      tg_rows_mid, tg_rows_first, tg_rows_last_init, tg_rows_only_init};

/* 8 x 8 float transpose in place: v[i] (row i) becomes column i. */
AVX2_INLINE void transpose8_ps(__m256 v[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        v[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

static _Thread_local void *tl_tg = NULL;
static _Thread_local size_t tl_tg_cap = 0;

/* Tiles [tb0, tb1) of tokens (at most BT_TG_BLOCK_TILES) for rows [row0, row0 + R): every window of
 * TG_WIDEN slices adds into the block's int32 sums acc32, then the outputs are written. */
AVX2 static void tg_token_block(const bt_mm *a, int64_t row0, int64_t R, const uint16_t *off, int64_t ldo, int64_t tb0,
                                int64_t tb1, int16_t *tab, __m256i *acc16, __m256i *acc32) {
    const int64_t nsl = a->Kp / 32;
    for (int64_t s0 = 0; s0 < nsl; s0 += TG_WIDEN) {
        const int64_t s1 = s0 + TG_WIDEN < nsl ? s0 + TG_WIDEN : nsl;
        for (int64_t tt = tb0; tt < tb1; tt++) {
            const int64_t t0 = tt * TG_TILE, nt = a->T - t0 < TG_TILE ? a->T - t0 : TG_TILE;
            __m256i *A = acc32 + 2 * (tt - tb0) * R;
            for (int64_t s = s0; s < s1; s++) {
                tg_tables(a->q + t0 * a->ldq, a->ldq, nt, 32 * s, tab);
                const int kind = (s == s0) | (s == s1 - 1) << 1 | (s0 == 0) << 2;
                TG_ROWS[kind]((const char *)tab, off + tg_off_index(s, 0, ldo), R, acc16, A);
            }
        }
    }
    /* epilogue: y[t, row0 + r] = (float)acc * f[t] (or the raw int32), as bt_store; 8 rows x 8 tokens are
     * transposed in registers so each token's 8 rows go out in one store */
    for (int64_t tt = tb0; tt < tb1; tt++) {
        const int64_t t0 = tt * TG_TILE, nt = a->T - t0 < TG_TILE ? a->T - t0 : TG_TILE;
        const __m256i *A = acc32 + 2 * (tt - tb0) * R;
        float fv[TG_TILE] = {0};
        if (a->y)
            for (int64_t t = 0; t < nt; t++) fv[t] = a->f[t0 + t];
        for (int h = 0; h < 2 && 8 * h < nt; h++) {
            const __m256 fh = _mm256_loadu_ps(fv + 8 * h);
            const int64_t nth = nt - 8 * h < 8 ? nt - 8 * h : 8;
            int64_t r = 0;
            for (; r + 8 <= R; r += 8) {
                __m256 v[8];
                for (int i = 0; i < 8; i++) {
                    const __m256i x = A[2 * (r + i) + h];
                    v[i] = a->y ? _mm256_mul_ps(_mm256_cvtepi32_ps(x), fh) : _mm256_castsi256_ps(x);
                }
                transpose8_ps(v); /* v[t]: rows r..r+7 of token 8h + t */
                for (int64_t t = 0; t < nth; t++) {
                    const int64_t o = (t0 + 8 * h + t) * a->ldy + row0 + r;
                    if (a->y)
                        _mm256_storeu_ps(a->y + o, v[t]);
                    else
                        _mm256_storeu_si256((__m256i *)(a->yi + o), _mm256_castps_si256(v[t]));
                }
            }
            for (; r < R; r++) {
                float v[8];
                const __m256i x = A[2 * r + h];
                _mm256_storeu_ps(v, a->y ? _mm256_mul_ps(_mm256_cvtepi32_ps(x), fh) : _mm256_castsi256_ps(x));
                for (int64_t t = 0; t < nth; t++) {
                    const int64_t o = (t0 + 8 * h + t) * a->ldy + row0 + r;
                    if (a->y)
                        a->y[o] = v[t];
                    else
                        memcpy(a->yi + o, v + t, 4);
                }
            }
        }
    }
}

/* Rows [row0, row0 + R) for every token, from their pattern offsets (slice s of row r at
 * tg_off_index(s, r, ldo), ldo = bt_tg_ldo(R)) over a->Kp columns (a multiple of 32). Returns 0, or -4
 * when out of memory. */
AVX2 static int tg_gemm_avx2(const bt_mm *a, int64_t row0, int64_t R, const uint16_t *off, int64_t ldo) {
    const int64_t ntiles = (a->T + TG_TILE - 1) / TG_TILE;
    const int64_t nblk = ntiles < BT_TG_BLOCK_TILES ? ntiles : BT_TG_BLOCK_TILES;
    const size_t tab_bytes = (size_t)TG_G * TG_E * 32, acc16_bytes = (size_t)R * 32;
    const size_t need = tab_bytes + acc16_bytes + (size_t)(nblk * R) * 64;
    if (need > tl_tg_cap) {
        free(tl_tg);
        tl_tg = aligned_alloc(64, (need + 63) / 64 * 64);
        tl_tg_cap = tl_tg ? need : 0;
        if (!tl_tg) return -4;
    }
    int16_t *tab = (int16_t *)tl_tg;
    __m256i *acc16 = (__m256i *)((char *)tl_tg + tab_bytes);
    __m256i *acc32 = (__m256i *)((char *)tl_tg + tab_bytes + acc16_bytes); /* [tile of the block][row][2] */
    /* tokens in blocks of BT_TG_BLOCK_TILES tiles, so the int32 sums of a block stay in cache while every
     * window widens into them (a 2048-token prompt's sums would otherwise stream from DRAM 12 times) */
    for (int64_t tb0 = 0; tb0 < ntiles; tb0 += BT_TG_BLOCK_TILES)
        tg_token_block(a, row0, R, off, ldo, tb0, tb0 + BT_TG_BLOCK_TILES < ntiles ? tb0 + BT_TG_BLOCK_TILES : ntiles, tab,
                       acc16, acc32);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * memory roofline: a streaming read with AVX2 loads
 */
AVX2 static uint64_t stream_read_avx2(const uint8_t *p, int64_t n, int64_t prefetch) {
    __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0;
    int64_t i = 0;
    if (prefetch > 0) {
        for (; i + 128 <= n; i += 128) {
            _mm_prefetch((const char *)p + i + prefetch, _MM_HINT_T0);
            _mm_prefetch((const char *)p + i + prefetch + 64, _MM_HINT_T0);
            x0 = _mm256_xor_si256(x0, _mm256_loadu_si256((const __m256i *)(p + i)));
            x1 = _mm256_xor_si256(x1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
            x2 = _mm256_xor_si256(x2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
            x3 = _mm256_xor_si256(x3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
        }
    } else {
        for (; i + 128 <= n; i += 128) {
            x0 = _mm256_xor_si256(x0, _mm256_loadu_si256((const __m256i *)(p + i)));
            x1 = _mm256_xor_si256(x1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
            x2 = _mm256_xor_si256(x2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
            x3 = _mm256_xor_si256(x3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
        }
    }
    x0 = _mm256_xor_si256(_mm256_xor_si256(x0, x1), _mm256_xor_si256(x2, x3));
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, x0);
    uint64_t h = v[0] ^ v[1] ^ v[2] ^ v[3];
    for (; i < n; i++) h ^= p[i];
    return h;
}

const bt_kernels bt_kernels_avx2 = {
    "avx2", quantize_row_avx2, gemv_avx2, decode_avx2, gemm_decoded_avx2, stream_read_avx2, gemv_lut_avx2,
    lut_tables_avx2, 32, 1, lut_decode_block_avx2, lut_decode_group_avx2, tg_convert_avx2, tg_gemm_avx2,
    tg_convert_lut_avx2, tg_convert_r4_avx2,
};

#else
typedef int bt_avx2_unused; /* keep ISO C happy: no empty translation unit */
#endif /* x86 */
