/* ARM NEON kernels (AArch64). Uses SDOT (vdotq_s32) when compiled with dotprod support
 * (-march=armv8.2-a+dotprod or later), widening multiplies otherwise. Same layouts and exact
 * arithmetic as the scalar twin: codes are decoded to c+1 in {0,1,2}, dotted with q, and the
 * caller subtracts the token's rowsum. */
#include "bt_internal.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>

/* ------------------------------------------------------------------------- quantisation */

static inline float load1(const void *x, int dtype, int64_t k) {
    if (dtype == BT_DT_F32) return ((const float *)x)[k];
    uint16_t h = ((const uint16_t *)x)[k];
    return dtype == BT_DT_BF16 ? bt_bf16_to_float(h) : bt_half_to_float(h);
}

static inline float32x4_t load4(const void *x, int dtype, int64_t k) {
    if (dtype == BT_DT_F32) return vld1q_f32((const float *)x + k);
    uint16x4_t h = vld1_u16((const uint16_t *)x + k);
    if (dtype == BT_DT_BF16) return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

static void quantize_row_neon(const void *x, int dtype, int64_t K, int8_t *q, int64_t Kpad, float *s,
                              int32_t *rowsum) {
    float32x4_t m = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) m = vmaxq_f32(m, vabsq_f32(load4(x, dtype, k)));
    float amax = vmaxvq_f32(m);
    for (; k < K; k++) {
        float v = fabsf(load1(x, dtype, k));
        if (v > amax) amax = v;
    }
    if (!(amax >= 1e-5f)) amax = 1e-5f;
    const float r = 1.0f / amax;
    const float sc = r * 127.0f;
    const float32x4_t sv = vdupq_n_f32(sc);
    int32x4_t sum = vdupq_n_s32(0);
    k = 0;
    for (; k + 8 <= K; k += 8) {
        int32x4_t i0 = vcvtq_s32_f32(vrndnq_f32(vmulq_f32(load4(x, dtype, k), sv)));
        int32x4_t i1 = vcvtq_s32_f32(vrndnq_f32(vmulq_f32(load4(x, dtype, k + 4), sv)));
        i0 = vminq_s32(vmaxq_s32(i0, vdupq_n_s32(-128)), vdupq_n_s32(127));
        i1 = vminq_s32(vmaxq_s32(i1, vdupq_n_s32(-128)), vdupq_n_s32(127));
        sum = vaddq_s32(sum, vaddq_s32(i0, i1));
        int16x8_t h = vcombine_s16(vmovn_s32(i0), vmovn_s32(i1));
        vst1_s8(q + k, vmovn_s16(h));
    }
    int32_t total = vaddvq_s32(sum);
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

/* ------------------------------------------------------------------------- dot products */

static inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    int16x8_t hi = vmull_high_s8(a, b);
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

/* 32 codes+1 of field i of a 2bit block half (16 bytes) */
static inline int8x16_t field2(uint8x16_t w, int i) {
    switch (i) {
    case 0:
        return vreinterpretq_s8_u8(vandq_u8(w, vdupq_n_u8(3)));
    case 1:
        return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(w, 2), vdupq_n_u8(3)));
    case 2:
        return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(w, 4), vdupq_n_u8(3)));
    default:
        return vreinterpretq_s8_u8(vshrq_n_u8(w, 6));
    }
}

/* trit = (3 x) >> 8 for the fixed-point byte x (already un-xored) */
static inline int8x16_t trit(uint8x16_t x) {
    uint16x8_t lo = vmull_u8(vget_low_u8(x), vdup_n_u8(3));
    uint16x8_t hi = vmull_high_u8(x, vdupq_n_u8(3));
    return vreinterpretq_s8_u8(vcombine_u8(vshrn_n_u16(lo, 8), vshrn_n_u16(hi, 8)));
}

/* one 32-byte block of one row dotted with the matching activations */
static inline int32x4_t block_dot(int fmt, const uint8_t *p, const int8_t *q, int32x4_t acc) {
    for (int h = 0; h < 2; h++) {
        uint8x16_t w = vld1q_u8(p + 16 * h);
        if (fmt == BT_FMT_2BIT_R4) {
            for (int i = 0; i < 4; i++) acc = dot16(acc, field2(w, i), vld1q_s8(q + 32 * i + 16 * h));
        } else {
            uint8x16_t x = veorq_u8(w, vdupq_n_u8(0x80));
            for (int i = 0; i < 5; i++) {
                acc = dot16(acc, trit(x), vld1q_s8(q + 32 * i + 16 * h));
                x = vmulq_u8(x, vdupq_n_u8(3));
            }
        }
    }
    return acc;
}

static void gemv_neon(const bt_mm *a, int64_t row0, int64_t row1) {
    const int blk = a->fmt == BT_FMT_2BIT_R4 ? BT_BLOCK_2B : BT_BLOCK_1P6;
    const int64_t nb = a->Kp / blk;
    for (int64_t t = 0; t < a->T; t++) {
        const int8_t *q = a->q + t * a->ldq;
        for (int64_t g = row0 / BT_GROUP; g * BT_GROUP < row1; g++) {
            const uint8_t *p = bt_group_ptr(a, g);
            int64_t n0 = g * BT_GROUP;
            int64_t gr = a->N - n0 < BT_GROUP ? a->N - n0 : BT_GROUP;
            int32x4_t acc[BT_GROUP];
            for (int r = 0; r < BT_GROUP; r++) acc[r] = vdupq_n_s32(0);
            for (int64_t b = 0; b < nb; b++) {
                __builtin_prefetch(p + 2048);
                for (int64_t r = 0; r < gr; r++) acc[r] = block_dot(a->fmt, p + 32 * r, q + b * blk, acc[r]);
                p += 32 * gr;
            }
            for (int64_t r = 0; r < gr; r++) bt_store(a, t, n0 + r, vaddvq_s32(acc[r]));
        }
    }
}

static void decode_neon(const bt_mm *a, int64_t row0, int64_t nrows, uint8_t *dst) {
    const int is2 = a->fmt == BT_FMT_2BIT_R4;
    const int blk = is2 ? BT_BLOCK_2B : BT_BLOCK_1P6;
    const int64_t nb = a->Kp / blk;
    for (int64_t r = 0; r < nrows; r++) {
        int64_t n = row0 + r;
        int64_t g = n / BT_GROUP, rg = n % BT_GROUP;
        int64_t gr = a->N - g * BT_GROUP < BT_GROUP ? a->N - g * BT_GROUP : BT_GROUP;
        const uint8_t *p = bt_group_ptr(a, g);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src = p + (b * gr + rg) * 32;
            uint8_t *d = dst + r * a->Kp + b * blk;
            for (int h = 0; h < 2; h++) {
                uint8x16_t w = vld1q_u8(src + 16 * h);
                if (is2) {
                    for (int i = 0; i < 4; i++) vst1q_s8((int8_t *)d + 32 * i + 16 * h, field2(w, i));
                } else {
                    uint8x16_t x = veorq_u8(w, vdupq_n_u8(0x80));
                    for (int i = 0; i < 5; i++) {
                        vst1q_s8((int8_t *)d + 32 * i + 16 * h, trit(x));
                        x = vmulq_u8(x, vdupq_n_u8(3));
                    }
                }
            }
        }
    }
}

/* 2 rows x 2 tokens register blocking */
static void gemm_decoded_neon(const bt_mm *a, int64_t row0, int64_t nrows, const uint8_t *D, int64_t t0,
                              int64_t t1) {
    const int64_t Kp = a->Kp;
    for (int64_t t = t0; t < t1; t += 2) {
        int tn = t1 - t < 2 ? 1 : 2;
        const int8_t *q0 = a->q + t * a->ldq;
        const int8_t *q1 = tn == 2 ? q0 + a->ldq : q0;
        for (int64_t r = 0; r < nrows; r += 2) {
            int rn = nrows - r < 2 ? 1 : 2;
            const int8_t *d0 = (const int8_t *)D + r * Kp;
            const int8_t *d1 = rn == 2 ? d0 + Kp : d0;
            int32x4_t a00 = vdupq_n_s32(0), a01 = a00, a10 = a00, a11 = a00;
            for (int64_t k = 0; k < Kp; k += 16) {
                int8x16_t w0 = vld1q_s8(d0 + k), w1 = vld1q_s8(d1 + k);
                int8x16_t x0 = vld1q_s8(q0 + k), x1 = vld1q_s8(q1 + k);
                a00 = dot16(a00, w0, x0);
                a01 = dot16(a01, w0, x1);
                a10 = dot16(a10, w1, x0);
                a11 = dot16(a11, w1, x1);
            }
            bt_store(a, t, row0 + r, vaddvq_s32(a00));
            if (tn == 2) bt_store(a, t + 1, row0 + r, vaddvq_s32(a01));
            if (rn == 2) {
                bt_store(a, t, row0 + r + 1, vaddvq_s32(a10));
                if (tn == 2) bt_store(a, t + 1, row0 + r + 1, vaddvq_s32(a11));
            }
        }
    }
}

static uint64_t stream_read_neon(const uint8_t *p, int64_t n, int64_t prefetch) {
    uint8x16_t x0 = vdupq_n_u8(0), x1 = x0, x2 = x0, x3 = x0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        if (prefetch > 0) __builtin_prefetch(p + i + prefetch);
        x0 = veorq_u8(x0, vld1q_u8(p + i));
        x1 = veorq_u8(x1, vld1q_u8(p + i + 16));
        x2 = veorq_u8(x2, vld1q_u8(p + i + 32));
        x3 = veorq_u8(x3, vld1q_u8(p + i + 48));
    }
    uint64x2_t v = vreinterpretq_u64_u8(veorq_u8(veorq_u8(x0, x1), veorq_u8(x2, x3)));
    uint64_t h = vgetq_lane_u64(v, 0) ^ vgetq_lane_u64(v, 1);
    for (; i < n; i++) h ^= p[i];
    return h;
}

const bt_kernels bt_kernels_neon = {
#if defined(__ARM_FEATURE_DOTPROD)
    "neon-dotprod",
#else
    "neon",
#endif
    quantize_row_neon, gemv_neon, decode_neon, gemm_decoded_neon, stream_read_neon,
    bt_lut_gemv_scalar, NULL, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, /* 1.67bit-lut: portable C (not tuned for NEON yet) */
};

#else
typedef int bt_neon_unused; /* keep ISO C happy: no empty translation unit */
#endif
