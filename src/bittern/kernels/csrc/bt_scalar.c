/* Portable scalar kernels: the C twin of the reference backend and the fallback on any CPU.
 * Every SIMD path must produce exactly these numbers. */
#include <math.h>

#include "bt_internal.h"

float bt_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float bt_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_x(const void *x, int dtype, int64_t k) {
    switch (dtype) {
    case BT_DT_BF16:
        return bt_bf16_to_float(((const uint16_t *)x)[k]);
    case BT_DT_F16:
        return bt_half_to_float(((const uint16_t *)x)[k]);
    default:
        return ((const float *)x)[k];
    }
}

static void quantize_row_scalar(const void *x, int dtype, int64_t K, int8_t *q, int64_t Kpad, float *s,
                                int32_t *rowsum) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float v = fabsf(load_x(x, dtype, k));
        if (v > amax) amax = v;
    }
    if (!(amax >= 1e-5f)) amax = 1e-5f;
    /* torch evaluates 127.0 / amax as amax.reciprocal() * 127: two float32 roundings */
    float r = 1.0f / amax;
    float sc = r * 127.0f;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = rintf(load_x(x, dtype, k) * sc); /* round half to even (default FP environment) */
        if (v > 127.0f) v = 127.0f;
        if (v < -128.0f) v = -128.0f;
        int8_t c = (int8_t)v;
        q[k] = c;
        sum += c;
    }
    if (Kpad > K) memset(q + K, 0, (size_t)(Kpad - K));
    *s = sc;
    *rowsum = sum;
}

/* ---- decoding one 32-byte block of one row ---- */

static inline void decode_block_2b(const uint8_t *src, uint8_t *dst /* 128 bytes, code+1 */) {
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 32; j++) dst[32 * i + j] = (uint8_t)((src[j] >> (2 * i)) & 3);
}

static inline void decode_block_1p6(const uint8_t *src, uint8_t *dst /* 160 bytes, code+1 */) {
    for (int j = 0; j < 32; j++) {
        uint8_t b = (uint8_t)(src[j] ^ 0x80u);
        for (int i = 0; i < 5; i++) {
            dst[32 * i + j] = (uint8_t)(((unsigned)b * 3u) >> 8);
            b = (uint8_t)(b * 3u);
        }
    }
}

static void decode_scalar(const bt_mm *a, int64_t row0, int64_t nrows, uint8_t *dst) {
    const int blk = a->fmt == BT_FMT_2BIT_R4 ? BT_BLOCK_2B : BT_BLOCK_1P6;
    const int64_t nb = a->Kp / blk;
    for (int64_t r = 0; r < nrows; r++) {
        int64_t n = row0 + r;
        int64_t g = n / BT_GROUP;
        int64_t rg = n % BT_GROUP;
        int64_t gr = a->N - g * BT_GROUP < BT_GROUP ? a->N - g * BT_GROUP : BT_GROUP;
        const uint8_t *p = bt_group_ptr(a, g);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src = p + (b * gr + rg) * 32;
            uint8_t *d = dst + r * a->Kp + b * blk;
            if (a->fmt == BT_FMT_2BIT_R4)
                decode_block_2b(src, d);
            else
                decode_block_1p6(src, d);
        }
    }
}

static void gemm_decoded_scalar(const bt_mm *a, int64_t row0, int64_t nrows, const uint8_t *D, int64_t t0,
                                int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const int8_t *q = a->q + t * a->ldq;
        for (int64_t r = 0; r < nrows; r++) {
            const uint8_t *d = D + r * a->Kp;
            int32_t acc = 0;
            for (int64_t k = 0; k < a->Kp; k++) acc += (int32_t)d[k] * (int32_t)q[k];
            bt_store(a, t, row0 + r, acc);
        }
    }
}

/* GEMV straight from the packed layout, one row group and one token at a time. */
static void gemv_scalar(const bt_mm *a, int64_t row0, int64_t row1) {
    const int blk = a->fmt == BT_FMT_2BIT_R4 ? BT_BLOCK_2B : BT_BLOCK_1P6;
    const int64_t nb = a->Kp / blk;
    uint8_t codes[BT_BLOCK_1P6];
    for (int64_t g = row0 / BT_GROUP; g * BT_GROUP < row1; g++) {
        int64_t gr = a->N - g * BT_GROUP < BT_GROUP ? a->N - g * BT_GROUP : BT_GROUP;
        const uint8_t *p = bt_group_ptr(a, g);
        for (int64_t t = 0; t < a->T; t++) {
            const int8_t *q = a->q + t * a->ldq;
            int32_t acc[BT_GROUP] = {0, 0, 0, 0};
            for (int64_t b = 0; b < nb; b++) {
                for (int64_t r = 0; r < gr; r++) {
                    const uint8_t *src = p + (b * gr + r) * 32;
                    if (a->fmt == BT_FMT_2BIT_R4)
                        decode_block_2b(src, codes);
                    else
                        decode_block_1p6(src, codes);
                    int32_t s = 0;
                    for (int k = 0; k < blk; k++) s += (int32_t)codes[k] * (int32_t)q[b * blk + k];
                    acc[r] += s;
                }
            }
            for (int64_t r = 0; r < gr; r++) bt_store(a, t, g * BT_GROUP + r, acc[r]);
        }
    }
}

static uint64_t stream_read_scalar(const uint8_t *p, int64_t n, int64_t prefetch) {
    BT_UNUSED(prefetch);
    uint64_t x0 = 0, x1 = 0, x2 = 0, x3 = 0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t v[4];
        memcpy(v, p + i, 32);
        x0 ^= v[0];
        x1 ^= v[1];
        x2 ^= v[2];
        x3 ^= v[3];
    }
    for (; i < n; i++) x0 ^= p[i];
    return x0 ^ x1 ^ x2 ^ x3;
}

const bt_kernels bt_kernels_scalar = {
    "scalar", quantize_row_scalar, gemv_scalar, decode_scalar, gemm_decoded_scalar, stream_read_scalar,
    bt_lut_gemv_scalar, NULL, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL,
};
