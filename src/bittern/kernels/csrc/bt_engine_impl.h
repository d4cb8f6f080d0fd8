/* The engine's per-token glue, written once and compiled twice by bt_engine.c: a portable build and
 * an AVX2/FMA/F16C build (BT_GLUE_AVX2 defined; functions get the target attribute and a _avx2
 * suffix). Float arithmetic follows the torch path's order (sums left to right, no FMA contraction). */

#ifdef BT_GLUE_AVX2
#define GLUE_FN(name) __attribute__((target("avx2,fma,f16c"))) static name##_avx2
#define GLUE_INL(name) static inline __attribute__((always_inline, target("avx2,fma,f16c"))) name##_avx2
#define G(name) name##_avx2
#else
#define GLUE_FN(name) static name##_generic
#define GLUE_INL(name) static inline name##_generic
#define G(name) name##_generic
#endif

GLUE_INL(float load_kv)(const void *base, int dt, int64_t i) {
    if (dt == BT_KV_F32) return ((const float *)base)[i];
    if (dt == BT_KV_I8) return (float)((const int8_t *)base)[i]; /* the code; the caller applies the scale */
#ifdef BT_GLUE_AVX2
    if (dt == BT_KV_F16) return _cvtsh_ss(((const uint16_t *)base)[i]);
#else
    if (dt == BT_KV_F16) return bt_half_to_float(((const uint16_t *)base)[i]);
#endif
    return bt_bf16_to_float(((const uint16_t *)base)[i]);
}

GLUE_INL(void store_kv)(void *base, int dt, int64_t i, float v) {
    if (dt == BT_KV_F32)
        ((float *)base)[i] = v;
#ifdef BT_GLUE_AVX2
    else if (dt == BT_KV_F16)
        ((uint16_t *)base)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    else if (dt == BT_KV_F16)
        ((uint16_t *)base)[i] = bt_float_to_half(v);
#endif
    else
        ((uint16_t *)base)[i] = bt_float_to_bf16(v);
}

/* int8 quantisation of y[K] into q (as bittern.quant, through the library's quantiser): returns s */
GLUE_INL(float quant_row)(const float *y, int64_t K, int8_t *q, int64_t ldq, int32_t *rowsum) {
    float s = 0.0f;
    bt_quantize(y, BT_DT_F32, 1, K, K, q, ldq, &s, rowsum);
    return s;
}

/* sum of squares of x[K] */
GLUE_INL(float sumsq)(const float *x, int64_t K) {
    int64_t k = 0;
    float ss = 0.0f;
#ifdef BT_GLUE_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
        a0 = _mm256_fmadd_ps(x0, x0, a0);
        a1 = _mm256_fmadd_ps(x1, x1, a1);
        a2 = _mm256_fmadd_ps(x2, x2, a2);
        a3 = _mm256_fmadd_ps(x3, x3, a3);
    }
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
    ss = _mm_cvtss_f32(r);
#endif
    for (; k < K; k++) ss += x[k] * x[k];
    return ss;
}

GLUE_FN(void norm_quant)(float *x, const float *delta, const float *w, float eps, int64_t T, int64_t K, float *y_out,
                         int8_t *q, int64_t ldq, float *s, int32_t *rowsum) {
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * K;
        if (delta)
            for (int64_t k = 0; k < K; k++) xr[k] += delta[t * K + k];
        float *yr = y_out ? y_out + t * K : xr;
        if (w) {
            float r = 1.0f / sqrtf(G(sumsq)(xr, K) / (float)K + eps);
            for (int64_t k = 0; k < K; k++) yr[k] = (xr[k] * r) * w[k];
        } else if (yr != xr) {
            memcpy(yr, xr, (size_t)K * sizeof(float));
        }
        if (q) s[t] = G(quant_row)(yr, K, q + t * ldq, ldq, rowsum + t);
    }
}

GLUE_FN(void act_quant)(float *gu, int64_t T, int64_t F, int act, const float *w, float eps, int8_t *q, int64_t ldq,
                        float *s, int32_t *rowsum) {
    for (int64_t t = 0; t < T; t++) {
        float *g = gu + t * 2 * F, *u = g + F;
        for (int64_t k = 0; k < F; k++) {
            float a = g[k];
            a = act == 0 ? a / (1.0f + expf(-a)) : (a > 0.0f ? a * a : 0.0f);
            g[k] = a * u[k];
        }
        if (w) {
            float r = 1.0f / sqrtf(G(sumsq)(g, F) / (float)F + eps);
            for (int64_t k = 0; k < F; k++) g[k] = (g[k] * r) * w[k];
        }
        s[t] = G(quant_row)(g, F, q + t * ldq, ldq, rowsum + t);
    }
}

#ifdef BT_GLUE_AVX2
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) __m256 load8_kv_avx2(const void *row, int dt,
                                                                                           int64_t i) {
    if (dt == BT_KV_F32) return _mm256_loadu_ps((const float *)row + i);
    if (dt == BT_KV_I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + i))));
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    if (dt == BT_KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#endif

GLUE_INL(float dot_kv)(const float *q, const void *row, int dt, int64_t hd) {
    int64_t i = 0;
    float acc = 0.0f;
#ifdef BT_GLUE_AVX2
    __m256 a = _mm256_setzero_ps();
    for (; i + 8 <= hd; i += 8) {
        const __m256 kv = load8_kv_avx2(row, dt, i);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv, a);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
    acc = _mm_cvtss_f32(r);
#endif
    for (; i < hd; i++) acc += q[i] * G(load_kv)(row, dt, i);
    return acc;
}

GLUE_INL(void axpy_kv)(float *out, float w, const void *row, int dt, int64_t hd) {
    int64_t i = 0;
#ifdef BT_GLUE_AVX2
    __m256 vw = _mm256_set1_ps(w);
    for (; i + 8 <= hd; i += 8) {
        const __m256 kv = load8_kv_avx2(row, dt, i);
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vw, kv, _mm256_loadu_ps(out + i)));
    }
#endif
    for (; i < hd; i++) out[i] += w * G(load_kv)(row, dt, i);
}

/* int8 codes of one cached row (absmax / 127 per row, as EngineKVCache._quant); returns the scale */
GLUE_INL(float store_row_i8)(int8_t *dst, const float *x, int64_t hd) {
    float amax = 0.0f;
    for (int64_t i = 0; i < hd; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float sc = (amax > 1e-8f ? amax : 1e-8f) / 127.0f;
    for (int64_t i = 0; i < hd; i++) {
        float c = nearbyintf(x[i] / sc);
        dst[i] = (int8_t)(c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c));
    }
    return sc;
}

/* RoPE (rotate-half convention) on the q and k heads of qkv, then k and v into the cache at pos
 * (int8 caches also get the row scales ks, vs [KVH, max_len]) */
GLUE_INL(void rope_store)(float *qkv, int64_t H, int64_t KVH, int64_t hd, int64_t pos, const float *cos,
                          const float *sin, void *kc, void *vc, float *ks, float *vs, int dt, int64_t max_len) {
    const float *k = qkv + H * hd, *v = k + KVH * hd;
    int64_t half = hd / 2;
    for (int64_t h = 0; h < H + KVH; h++) {
        float *r = qkv + h * hd;
        for (int64_t i = 0; i < half; i++) {
            float a = r[i], b = r[i + half];
            r[i] = a * cos[i] + (-b) * sin[i];
            r[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
    for (int64_t g = 0; g < KVH; g++) {
        if (dt == BT_KV_I8) {
            ks[g * max_len + pos] = G(store_row_i8)((int8_t *)kc + (g * max_len + pos) * hd, k + g * hd, hd);
            vs[g * max_len + pos] = G(store_row_i8)((int8_t *)vc + (g * max_len + pos) * hd, v + g * hd, hd);
            continue;
        }
        for (int64_t i = 0; i < hd; i++) {
            G(store_kv)(kc, dt, (g * max_len + pos) * hd + i, k[g * hd + i]);
            G(store_kv)(vc, dt, (g * max_len + pos) * hd + i, v[g * hd + i]);
        }
    }
}

#ifndef BT_GLUE_AVX2
GLUE_FN(void attend)(float *qkv, int64_t H, int64_t KVH, int64_t hd, int64_t pos, const float *cos, const float *sin,
                     void *kc, void *vc, float *ks, float *vs, int dt, int64_t max_len, float *out, float *scores) {
    const float *q = qkv;
    G(rope_store)(qkv, H, KVH, hd, pos, cos, sin, kc, vc, ks, vs, dt, max_len);
    int64_t rep = H / KVH, S = pos + 1;
    size_t es = kv_elem_size(dt);
    float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < H; h++) {
        int64_t g = h / rep;
        const char *kb = (const char *)kc + (size_t)(g * max_len) * hd * es;
        const char *vb = (const char *)vc + (size_t)(g * max_len) * hd * es;
        float m = -INFINITY;
        for (int64_t p = 0; p < S; p++) {
            float sc = G(dot_kv)(q + h * hd, kb + (size_t)p * hd * es, dt, hd);
            if (dt == BT_KV_I8) sc *= ks[g * max_len + p];
            sc *= scale;
            scores[p] = sc;
            m = sc > m ? sc : m;
        }
        float sum = 0.0f;
        for (int64_t p = 0; p < S; p++) {
            scores[p] = expf(scores[p] - m);
            sum += scores[p];
        }
        float inv = 1.0f / sum;
        float *o = out + h * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t p = 0; p < S; p++) {
            float w = scores[p] * inv;
            if (dt == BT_KV_I8) w *= vs[g * max_len + p];
            G(axpy_kv)(o, w, vb + (size_t)p * hd * es, dt, hd);
        }
    }
}

#endif

#ifdef BT_GLUE_AVX2
/* exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), |relative error| < 2e-7 */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) __m256 exp_neg_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#ifndef BT_ATTEND_PF_ROWS
#define BT_ATTEND_PF_ROWS 8 /* key rows prefetched ahead (2 KB for float16 rows of 128) */
#endif

#ifndef BT_ATTEND_VBLOCK
#define BT_ATTEND_VBLOCK 32 /* value rows per block of the weighted sum (8 KB of float16 rows of 128) */
#endif
#ifndef BT_ATTEND_PARALLEL_MIN
#define BT_ATTEND_PARALLEL_MIN 65536 /* positions x heads x head size: below, one thread (~10 us of work) */
#endif

static _Thread_local float *tl_scores = NULL;
static _Thread_local size_t tl_scores_cap = 0;

/* this thread's scratch for a tile of up to 4 heads: score rows of S8 positions, then the value pass's
 * partial sums (hd floats per head); NULL when out of memory */
static float *attend_scores(int64_t S8, int64_t hd) {
    if ((size_t)(4 * (S8 + hd)) > tl_scores_cap) {
        free(tl_scores);
        tl_scores_cap = (size_t)(4 * (S8 + hd));
        tl_scores = (float *)malloc(tl_scores_cap * sizeof(float));
        if (!tl_scores) tl_scores_cap = 0;
    }
    return tl_scores;
}

typedef struct {
    const float *q;
    const void *kc, *vc;
    const float *ks, *vs;
    int dt;
    int64_t hd, rep, S, max_len, tiles_per_group, ntiles;
    float scale;
    float *out;
    _Atomic int64_t next;
} attend_job;

/* Tile t: up to 4 query heads of one KV head (every cached key and value row is loaded and converted
 * once for them); softmax uses a vectorised exp. P holds 4 rows of S8 scores. */
__attribute__((target("avx2,fma,f16c"))) static void attend_tile_avx2(const attend_job *J, int64_t t, float *P) {
    const float *q = J->q, *ks = J->ks, *vs = J->vs;
    const int dt = J->dt;
    const int64_t hd = J->hd, rep = J->rep, S = J->S, S8 = (S + 7) / 8 * 8, max_len = J->max_len;
    const int64_t g = t / J->tiles_per_group, h0 = g * rep + 4 * (t % J->tiles_per_group);
    const size_t es = kv_elem_size(dt);
    const float scale = J->scale;
    float *out = J->out;
    const char *kb = (const char *)J->kc + (size_t)(g * max_len) * hd * es;
    const char *vb = (const char *)J->vc + (size_t)(g * max_len) * hd * es;
    const int nh = (g + 1) * rep - h0 < 4 ? (int)((g + 1) * rep - h0) : 4;
    const float *qh[4];
    for (int j = 0; j < 4; j++) qh[j] = q + (h0 + (j < nh ? j : 0)) * hd;
    /* scores: key rows against nh query heads, two rows per step (eight independent FMA chains: one row's
     * four chains of hd / 8 dependent FMAs kept the loop at latency; each row's sums keep their order).
     * The cache rows come from DRAM (each token's weight stream evicts them): prefetch keys
     * BT_ATTEND_PF_ROWS rows ahead, and each value row while its key is read. */
    const size_t row_bytes = (size_t)hd * es;
    for (int64_t p = 0; p < S; p += 2) {
        const int two = p + 1 < S;
        const char *kr = kb + (size_t)p * row_bytes, *kr2 = two ? kr + row_bytes : kr;
        for (size_t o = 0; o < (two ? 2 : 1) * row_bytes; o += 64) {
            if (p + BT_ATTEND_PF_ROWS + 1 < S) _mm_prefetch(kr + BT_ATTEND_PF_ROWS * row_bytes + o, _MM_HINT_T0);
            _mm_prefetch(vb + (size_t)p * row_bytes + o, _MM_HINT_T0);
        }
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t i = 0; i < hd; i += 8) {
            const __m256 kv = load8_kv_avx2(kr, dt, i), kv2 = load8_kv_avx2(kr2, dt, i);
            const __m256 q0 = _mm256_loadu_ps(qh[0] + i), q1 = _mm256_loadu_ps(qh[1] + i);
            const __m256 q2 = _mm256_loadu_ps(qh[2] + i), q3 = _mm256_loadu_ps(qh[3] + i);
            a0 = _mm256_fmadd_ps(q0, kv, a0);
            a1 = _mm256_fmadd_ps(q1, kv, a1);
            a2 = _mm256_fmadd_ps(q2, kv, a2);
            a3 = _mm256_fmadd_ps(q3, kv, a3);
            b0 = _mm256_fmadd_ps(q0, kv2, b0);
            b1 = _mm256_fmadd_ps(q1, kv2, b1);
            b2 = _mm256_fmadd_ps(q2, kv2, b2);
            b3 = _mm256_fmadd_ps(q3, kv2, b3);
        }
        for (int k = 0; k < 1 + two; k++) {
            const __m256 s01 = k ? _mm256_hadd_ps(b0, b1) : _mm256_hadd_ps(a0, a1);
            const __m256 s23 = k ? _mm256_hadd_ps(b2, b3) : _mm256_hadd_ps(a2, a3);
            const __m256 s = _mm256_hadd_ps(s01, s23);
            __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            float sc[4];
            if (dt == BT_KV_I8) r = _mm_mul_ps(r, _mm_set1_ps(ks[g * max_len + p + k]));
            _mm_storeu_ps(sc, _mm_mul_ps(r, _mm_set1_ps(scale)));
            for (int j = 0; j < 4; j++) P[j * S8 + p + k] = sc[j];
        }
    }
    /* softmax per head; the padding up to S8 gets probability 0 */
    float inv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < 4; j++) { /* all 4 lanes (a short tile repeats head h0): fixed trip counts */
        float *pj = P + j * S8;
        float m = -INFINITY;
        for (int64_t p = 0; p < S; p++) m = pj[p] > m ? pj[p] : m;
        for (int64_t p = S; p < S8; p++) pj[p] = -INFINITY;
        const __m256 vm = _mm256_set1_ps(m);
        __m256 vs = _mm256_setzero_ps();
        for (int64_t p = 0; p < S8; p += 8) {
            __m256 e = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(pj + p), vm));
            if (p + 8 > S) e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                                    _mm256_set1_epi32((int)(S - p)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
            _mm256_storeu_ps(pj + p, e);
            vs = _mm256_add_ps(vs, e);
        }
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(vs), _mm256_extractf128_ps(vs, 1));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
        inv[j] = 1.0f / _mm_cvtss_f32(r);
    }
    /* out[h] = sum_p P[h][p] * v[p]. Value rows in blocks of BT_ATTEND_VBLOCK: the 4 heads' weights of the
     * block's rows are broadcast once into W (they serve every 16-column chunk), the rows stay in L1 while
     * the chunks pass over them, and the other chunks' running sums wait in A (4 x hd floats after the
     * scores). Each output sums over p in order, as one pass over all rows would. */
    float *A = P + 4 * S8;
    __m256 W[BT_ATTEND_VBLOCK][4];
    for (int64_t p0 = 0; p0 < S; p0 += BT_ATTEND_VBLOCK) {
        const int64_t nb = S - p0 < BT_ATTEND_VBLOCK ? S - p0 : BT_ATTEND_VBLOCK;
        for (int64_t r = 0; r < nb; r++) {
            const float vsp = dt == BT_KV_I8 ? vs[g * max_len + p0 + r] : 1.0f;
            for (int j = 0; j < 4; j++) W[r][j] = _mm256_set1_ps(P[j * S8 + p0 + r] * vsp);
        }
        for (int64_t i = 0; i < hd; i += 16) {
            __m256 o[4][2];
            for (int j = 0; j < 4; j++) {
                o[j][0] = p0 ? _mm256_loadu_ps(A + j * hd + i) : _mm256_setzero_ps();
                o[j][1] = p0 ? _mm256_loadu_ps(A + j * hd + i + 8) : _mm256_setzero_ps();
            }
            for (int64_t r = 0; r < nb; r++) {
                const char *vr = vb + (size_t)(p0 + r) * hd * es;
                const __m256 v0 = load8_kv_avx2(vr, dt, i), v1 = load8_kv_avx2(vr, dt, i + 8);
                for (int j = 0; j < 4; j++) {
                    o[j][0] = _mm256_fmadd_ps(W[r][j], v0, o[j][0]);
                    o[j][1] = _mm256_fmadd_ps(W[r][j], v1, o[j][1]);
                }
            }
            if (p0 + nb < S) {
                for (int j = 0; j < 4; j++) {
                    _mm256_storeu_ps(A + j * hd + i, o[j][0]);
                    _mm256_storeu_ps(A + j * hd + i + 8, o[j][1]);
                }
                continue;
            }
            for (int j = 0; j < nh; j++) {
                const __m256 f = _mm256_set1_ps(inv[j]);
                _mm256_storeu_ps(out + (h0 + j) * hd + i, _mm256_mul_ps(o[j][0], f));
                _mm256_storeu_ps(out + (h0 + j) * hd + i + 8, _mm256_mul_ps(o[j][1], f));
            }
        }
    }
}

static void attend_task(void *ctx, int tid, int n) {
    attend_job *J = (attend_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    /* a thread without score memory takes no tile; the caller (whose buffer is checked first) does the rest */
    float *P = attend_scores((J->S + 7) / 8 * 8, J->hd);
    if (!P) return;
    for (;;) {
        int64_t t = atomic_fetch_add(&J->next, 1);
        if (t >= J->ntiles) break;
        attend_tile_avx2(J, t, P);
    }
}

/* Tiles of up to 4 query heads sharing one KV head go to the thread pool when the context is long
 * enough to pay for the dispatch; every tile is computed the same way on any thread. */
GLUE_FN(void attend)(float *qkv, int64_t H, int64_t KVH, int64_t hd, int64_t pos, const float *cos, const float *sin,
                     void *kc, void *vc, float *ks, float *vs, int dt, int64_t max_len, float *out, float *scores) {
    if (hd % 16) {
        attend_generic(qkv, H, KVH, hd, pos, cos, sin, kc, vc, ks, vs, dt, max_len, out, scores);
        return;
    }
    if (!attend_scores((pos + 8) / 8 * 8, hd)) { /* out of memory: the slower path needs only the caller's scratch */
        attend_generic(qkv, H, KVH, hd, pos, cos, sin, kc, vc, ks, vs, dt, max_len, out, scores);
        return;
    }
    rope_store_avx2(qkv, H, KVH, hd, pos, cos, sin, kc, vc, ks, vs, dt, max_len);
    const int64_t rep = H / KVH, tpg = (rep + 3) / 4;
    attend_job J = {.q = qkv, .kc = kc, .vc = vc, .ks = ks, .vs = vs, .dt = dt, .hd = hd, .rep = rep, .S = pos + 1,
                    .max_len = max_len, .tiles_per_group = tpg, .ntiles = KVH * tpg,
                    .scale = 1.0f / sqrtf((float)hd), .out = out};
    atomic_store(&J.next, 0);
    int n = bt_get_threads();
    if ((int64_t)n > J.ntiles) n = (int)J.ntiles;
    if (n > 1 && (pos + 1) * H * hd >= BT_ATTEND_PARALLEL_MIN)
        bt_parallel(attend_task, &J, n);
    else
        attend_task(&J, 0, 1);
    BT_UNUSED(scores);
}

#define BT_ATTEND_ROWS_CHUNK 64

typedef struct {
    attend_job jobs[BT_ATTEND_ROWS_CHUNK]; /* one per row */
    int64_t nrows, ntiles, S8max;
    _Atomic int64_t next;
} attend_rows_job;

/* items (row, tile), the rows with the most positions first */
static void attend_rows_task(void *ctx, int tid, int n) {
    attend_rows_job *R = (attend_rows_job *)ctx;
    BT_UNUSED(tid);
    BT_UNUSED(n);
    float *P = attend_scores(R->S8max, R->jobs[0].hd);
    if (!P) return;
    for (;;) {
        const int64_t i = atomic_fetch_add(&R->next, 1);
        if (i >= R->nrows * R->ntiles) break;
        attend_tile_avx2(&R->jobs[R->nrows - 1 - i / R->ntiles], i % R->ntiles, P);
    }
}

/* Rows b < B of a layer (query/key/value row b at qkv + b * ldqkv, output at out + b * ldout; rows[2b],
 * rows[2b+1]: its slot and position; the slot's cache planes at kbase/vbase + (plane0 + slot) * plane and
 * the int8 scales at ksbase/vsbase + (plane0 + slot) * splane): every row's keys and values are stored
 * first, then all (row, tile) pairs of up to BT_ATTEND_ROWS_CHUNK rows go to the pool in one dispatch.
 * The same numbers as attend() row after row, provided a row never needs a position that a later row of
 * the same slot writes (positions rise within a slot: the caller checks). Returns 0, or -1 when the
 * caller's per-row path must be used (head size not a multiple of 16, or out of memory). */
GLUE_FN(int attend_rows)(float *qkv, int64_t ldqkv, int64_t B, const int64_t *rows, int64_t plane0, int64_t H,
                         int64_t KVH, int64_t hd, const float *cos, const float *sin, char *kbase, char *vbase,
                         char *ksbase, char *vsbase, int64_t plane, int64_t splane, int dt, int64_t max_len, float *out,
                         int64_t ldout) {
    if (hd % 16) return -1;
    int64_t maxpos = 0;
    for (int64_t b = 0; b < B; b++) maxpos = rows[2 * b + 1] > maxpos ? rows[2 * b + 1] : maxpos;
    const int64_t S8max = (maxpos + 8) / 8 * 8;
    if (!attend_scores(S8max, hd)) return -1;
    const int64_t rep = H / KVH, tpg = (rep + 3) / 4;
    const int n = bt_get_threads();
    for (int64_t b0 = 0; b0 < B; b0 += BT_ATTEND_ROWS_CHUNK) {
        const int64_t nb = B - b0 < BT_ATTEND_ROWS_CHUNK ? B - b0 : BT_ATTEND_ROWS_CHUNK;
        attend_rows_job R;
        R.nrows = nb;
        R.ntiles = KVH * tpg;
        R.S8max = S8max;
        int64_t work = 0;
        for (int64_t i = 0; i < nb; i++) {
            const int64_t b = b0 + i, pos = rows[2 * b + 1], pl = plane0 + rows[2 * b];
            float *q = qkv + b * ldqkv;
            void *kc = kbase + pl * plane, *vc = vbase + pl * plane;
            float *ks = ksbase ? (float *)(void *)(ksbase + pl * splane) : NULL;
            float *vs = vsbase ? (float *)(void *)(vsbase + pl * splane) : NULL;
            rope_store_avx2(q, H, KVH, hd, pos, cos + pos * hd, sin + pos * hd, kc, vc, ks, vs, dt, max_len);
            R.jobs[i] = (attend_job){.q = q, .kc = kc, .vc = vc, .ks = ks, .vs = vs, .dt = dt, .hd = hd, .rep = rep,
                                     .S = pos + 1, .max_len = max_len, .tiles_per_group = tpg, .ntiles = KVH * tpg,
                                     .scale = 1.0f / sqrtf((float)hd), .out = out + b * ldout};
            work += (pos + 1) * H * hd;
        }
        atomic_store(&R.next, 0);
        const int nt = (int64_t)n > nb * R.ntiles ? (int)(nb * R.ntiles) : n;
        if (nt > 1 && work >= BT_ATTEND_PARALLEL_MIN)
            bt_parallel(attend_rows_task, &R, nt);
        else
            attend_rows_task(&R, 0, 1);
    }
    return 0;
}
#endif

#undef GLUE_FN
#undef GLUE_INL
#undef G
