"""The engine's small C helpers: the int8 LM head and the per-token glue between ternary products.

The int8 head multiplies int8 rows (per-row scale) with per-token int8 activations. The decode glue
fuses what runs between the ternary products of one token (residual add + RMSNorm + int8
quantisation, RoPE + KV-cache store + GQA attention, gated activation + sub-norm + quantisation), so a
decode step costs a dozen C calls per layer instead of dozens of small torch operations.

The ternary kernels live in :mod:`bittern.kernels`; these cover the rest of a decode step. They are compiled once with the system C compiler into a per-user cache and
loaded with ctypes; without a compiler (or AVX2/F16C) the engine computes the same in torch.

Arithmetic: ``s = 127 / max(|x|)``, ``q = clamp(round_half_even(x * s), -128, 127)`` (as
:func:`bittern.quant.quantize_activation`), ``acc = q . w_row`` exact in int32,
``y = float(acc) * (scale_row / s)``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static void quantize_row(const float *x, int64_t K, int8_t *q, float *s_out) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) { float a = fabsf(x[k]); if (a > amax) amax = a; }
    if (amax < 1e-5f) amax = 1e-5f;
    float s = (1.0f / amax) * 127.0f;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(x[k] * s);
        if (v > 127.0f) v = 127.0f;
        if (v < -128.0f) v = -128.0f;
        q[k] = (int8_t)v;
    }
    *s_out = s;
}

static inline int32_t dot_i8(const int8_t *a, const int8_t *w, int64_t K) {
    int64_t k = 0;
    int32_t acc = 0;
#if defined(__AVX2__)
    __m256i sum = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; k + 32 <= K; k += 32) {
        __m256i va = _mm256_loadu_si256((const __m256i *)(a + k));
        __m256i vw = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vw, va));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    acc = _mm_cvtsi128_si32(s4);
#endif
    for (; k < K; k++) acc += (int32_t)a[k] * (int32_t)w[k];
    return acc;
}

typedef struct {
    const int8_t *w; const float *scale; const int8_t *q; const float *s;
    int64_t N, K, T, ldy, n0, n1; float *y;
} job_t;

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    for (int64_t n = j->n0; n < j->n1; n++) {
        const int8_t *wr = j->w + n * j->K;
        __builtin_prefetch(wr + 8 * j->K, 0, 0);
        for (int64_t t = 0; t < j->T; t++) {
            int32_t acc = dot_i8(j->q + t * j->K, wr, j->K);
            j->y[t * j->ldy + n] = (float)acc * (j->scale[n] / j->s[t]);
        }
    }
    return 0;
}

/* y [T, ldy] = quant(x [T, K]) @ w^T * scale; q_buf holds T*K bytes, s_buf T floats. */
int bth_matmul(const int8_t *w, const float *scale, int64_t N, int64_t K, const float *x, int64_t T,
               int8_t *q_buf, float *s_buf, float *y, int64_t ldy, int threads) {
    for (int64_t t = 0; t < T; t++) quantize_row(x + t * K, K, q_buf + t * K, s_buf + t);
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    job_t jobs[64];
    pthread_t tids[64];
    int64_t per = (N + threads - 1) / threads;
    for (int i = 0; i < threads; i++) {
        int64_t a = i * per, b = a + per < N ? a + per : N;
        jobs[i] = (job_t){w, scale, q_buf, s_buf, N, K, T, ldy, a < N ? a : N, b, y};
    }
    for (int i = 1; i < threads; i++) pthread_create(&tids[i], 0, run_job, &jobs[i]);
    run_job(&jobs[0]);
    for (int i = 1; i < threads; i++) pthread_join(tids[i], 0);
    return 0;
}

/* ---------------------------------------------------------------- decode glue (one token per call) */
#include <immintrin.h>

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f2h(float f) { return _cvtss_sh(f, 0); }
static inline float b2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2b(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16); }

/* int8 quantisation of y[K] into q (as bittern.quant): returns s, writes rowsum */
static float quant_row(const float *y, int64_t K, int8_t *q, int32_t *rowsum) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) { float a = fabsf(y[k]); amax = a > amax ? a : amax; }
    if (amax < 1e-5f) amax = 1e-5f;
    float s = (1.0f / amax) * 127.0f;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(y[k] * s);
        v = v > 127.0f ? 127.0f : (v < -128.0f ? -128.0f : v);
        q[k] = (int8_t)v;
        sum += (int32_t)q[k];
    }
    *rowsum = sum;
    return s;
}

/* x[t] += delta[t] (if delta); y = rmsnorm(x[t]) * w (if w, else y = x[t]); (q, s, rowsum) = quant(y).
 * y_out (optional) receives the normalised row. */
int bte_norm_quant(float *x, const float *delta, const float *w, float eps, int64_t T, int64_t K,
                   float *y_out, int8_t *q, int64_t ldq, float *s, int32_t *rowsum) {
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * K;
        if (delta) for (int64_t k = 0; k < K; k++) xr[k] += delta[t * K + k];
        float *yr = y_out ? y_out + t * K : xr;
        if (w) {
            float ss = 0.0f;
            for (int64_t k = 0; k < K; k++) ss += xr[k] * xr[k];
            float r = 1.0f / sqrtf(ss / (float)K + eps);
            for (int64_t k = 0; k < K; k++) yr[k] = (xr[k] * r) * w[k];
        } else if (yr != xr) {
            memcpy(yr, xr, K * sizeof(float));
        }
        if (q) s[t] = quant_row(yr, K, q + t * ldq, rowsum + t);
    }
    return 0;
}

/* gated activation on gu [T, 2F] (gate | up): h = act(gate) * up written over gate; optional sub-norm
 * (into gate too); then quantise. act 0 = silu, 1 = relu^2. */
int bte_act_quant(float *gu, int64_t T, int64_t F, int act, const float *w, float eps,
                  int8_t *q, int64_t ldq, float *s, int32_t *rowsum) {
    for (int64_t t = 0; t < T; t++) {
        float *g = gu + t * 2 * F, *u = g + F;
        for (int64_t k = 0; k < F; k++) {
            float a = g[k];
            a = act == 0 ? a / (1.0f + expf(-a)) : (a > 0.0f ? a * a : 0.0f);
            g[k] = a * u[k];
        }
        if (w) {
            float ss = 0.0f;
            for (int64_t k = 0; k < F; k++) ss += g[k] * g[k];
            float r = 1.0f / sqrtf(ss / (float)F + eps);
            for (int64_t k = 0; k < F; k++) g[k] = (g[k] * r) * w[k];
        }
        s[t] = quant_row(g, F, q + t * ldq, rowsum + t);
    }
    return 0;
}

static void rope(float *v, const float *cos, const float *sin, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] + (-b) * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline float load_kv(const void *base, int dt, int64_t i) {
    if (dt == 0) return ((const float *)base)[i];
    if (dt == 1) return h2f(((const uint16_t *)base)[i]);
    return b2f(((const uint16_t *)base)[i]);
}

static inline void store_kv(void *base, int dt, int64_t i, float v) {
    if (dt == 0) ((float *)base)[i] = v;
    else if (dt == 1) ((uint16_t *)base)[i] = f2h(v);
    else ((uint16_t *)base)[i] = f2b(v);
}

static inline float dot_kv(const float *q, const void *row, int dt, int64_t hd) {
    int64_t i = 0;
    float acc = 0.0f;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 a = _mm256_setzero_ps();
    for (; i + 8 <= hd; i += 8) {
        __m256 kv;
        if (dt == 0) kv = _mm256_loadu_ps((const float *)row + i);
        else if (dt == 1) kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
        else kv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i))), 16));
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv, a);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_shuffle_ps(r, r, 1));
    acc = _mm_cvtss_f32(r);
#endif
    for (; i < hd; i++) acc += q[i] * load_kv(row, dt, i);
    return acc;
}

static inline void axpy_kv(float *out, float w, const void *row, int dt, int64_t hd) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    __m256 vw = _mm256_set1_ps(w);
    for (; i + 8 <= hd; i += 8) {
        __m256 kv;
        if (dt == 0) kv = _mm256_loadu_ps((const float *)row + i);
        else if (dt == 1) kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
        else kv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i))), 16));
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vw, kv, _mm256_loadu_ps(out + i)));
    }
#endif
    for (; i < hd; i++) out[i] += w * load_kv(row, dt, i);
}

/* One token: rope q and k of qkv [H*hd | KVH*hd | KVH*hd] at position pos, store k, v into the cache
 * (kc, vc: [KVH, max_len, hd] of this layer and slot, dtype dt: 0 f32, 1 f16, 2 bf16), attend over
 * positions 0..pos and write out [H*hd]. scores is scratch of >= pos+1 floats. */
int bte_attend(float *qkv, int64_t H, int64_t KVH, int64_t hd, int64_t pos, const float *cos, const float *sin,
               void *kc, void *vc, int dt, int64_t max_len, float *out, float *scores) {
    float *q = qkv, *k = qkv + H * hd, *v = k + KVH * hd;
    for (int64_t h = 0; h < H + KVH; h++) rope(qkv + h * hd, cos, sin, hd);
    for (int64_t g = 0; g < KVH; g++)
        for (int64_t i = 0; i < hd; i++) {
            store_kv(kc, dt, (g * max_len + pos) * hd + i, k[g * hd + i]);
            store_kv(vc, dt, (g * max_len + pos) * hd + i, v[g * hd + i]);
        }
    int64_t rep = H / KVH, S = pos + 1;
    size_t es = dt == 0 ? 4 : 2;
    float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < H; h++) {
        int64_t g = h / rep;
        const char *kb = (const char *)kc + (size_t)(g * max_len) * hd * es;
        const char *vb = (const char *)vc + (size_t)(g * max_len) * hd * es;
        float m = -INFINITY;
        for (int64_t p = 0; p < S; p++) {
            float sc = dot_kv(q + h * hd, kb + (size_t)p * hd * es, dt, hd) * scale;
            scores[p] = sc;
            m = sc > m ? sc : m;
        }
        float sum = 0.0f;
        for (int64_t p = 0; p < S; p++) { scores[p] = expf(scores[p] - m); sum += scores[p]; }
        float inv = 1.0f / sum;
        float *o = out + h * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t p = 0; p < S; p++) axpy_kv(o, scores[p] * inv, vb + (size_t)p * hd * es, dt, hd);
    }
    return 0;
}

/* Per-row absmax int8 quantisation of src [rows, cols] (dtype 0 f32, 1 f16, 2 bf16):
 * scale = max(amax, 1e-8) / 127, code = clamp(round(w / scale), -127, 127).
 * release != 0: src is a read-only file mapping; its pages are dropped once read (MADV_DONTNEED). */
int bte_quant_rows(const void *src, int dt, int64_t rows, int64_t cols, int8_t *codes, float *scales, int release) {
    size_t es = dt == 0 ? 4 : 2;
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t done = ((uintptr_t)src + page - 1) & ~(uintptr_t)(page - 1);
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)src + (size_t)r * cols * es;
        float amax = 0.0f;
        for (int64_t k = 0; k < cols; k++) { float a = fabsf(load_kv(row, dt, k)); amax = a > amax ? a : amax; }
        if (amax < 1e-8f) amax = 1e-8f;
        float sc = amax / 127.0f;
        for (int64_t k = 0; k < cols; k++) {
            float v = nearbyintf(load_kv(row, dt, k) / sc);
            codes[r * cols + k] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
        }
        scales[r] = sc;
        if (release && (r % 256 == 255 || r == rows - 1)) {
            uintptr_t end = (uintptr_t)(row + cols * es);
            uintptr_t upto = end & ~(uintptr_t)(page - 1);
            if (r == rows - 1) upto = end;  /* last page: the mapping is private, dropping re-reads the file */
            if (upto > done) { madvise((void *)done, (size_t)(upto - done), MADV_DONTNEED); done = upto; }
        }
    }
    return 0;
}
"""

_lock = threading.Lock()
_loaded: "HeadKernel | None | bool" = False


class HeadKernel:
    """ctypes wrapper of the compiled int8 head product."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        f = lib.bth_matmul
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        for name, args in {
            "bte_norm_quant": [vp, vp, vp, f32, i64, i64, vp, vp, i64, vp, vp],
            "bte_act_quant": [vp, i64, i64, i32, vp, f32, vp, i64, vp, vp],
            "bte_attend": [vp, i64, i64, i64, i64, vp, vp, vp, vp, i32, i64, vp, vp],
            "bte_quant_rows": [vp, i32, i64, i64, vp, vp, i32],
        }.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, args
        self.norm_quant = lib.bte_norm_quant
        self.act_quant = lib.bte_act_quant
        self.attend = lib.bte_attend
        self.quant_rows = lib.bte_quant_rows
        self.threads = max(1, torch.get_num_threads())
        self._q = torch.empty(0, dtype=torch.int8)
        self._s = torch.empty(0, dtype=torch.float32)

    def matmul(self, w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``quant(x) @ w^T * scale`` as float32 ``[T, N]`` (``x`` float32 ``[T, K]``)."""
        N, K = w.shape
        x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        T = x.shape[0]
        if out is None:
            out = torch.empty(T, N, dtype=torch.float32)
        if self._q.numel() < T * K:
            self._q = torch.empty(T * K, dtype=torch.int8)
        if self._s.numel() < T:
            self._s = torch.empty(T, dtype=torch.float32)
        self.lib.bth_matmul(w.data_ptr(), scale.data_ptr(), N, K, x.data_ptr(), T, self._q.data_ptr(),
                            self._s.data_ptr(), out.data_ptr(), out.stride(0), self.threads)
        return out


def _cache_dir() -> Path:
    base = os.environ.get("BITTERN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "bittern")
    return Path(base)


def _compile() -> Path | None:
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    target = _cache_dir() / f"bittern_head_{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "head.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / "head.so"
        for flags in (["-mavx2", "-mfma", "-mf16c"],):
            cmd = [os.environ.get("CC", "cc"), "-O3", *flags, "-fPIC", "-shared", str(src), "-o", str(out), "-lpthread", "-lm"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                continue
            if not _cpu_has_avx2():
                return None
            os.replace(out, target)
            return target
    return None


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load_head_kernel() -> HeadKernel | None:
    """The compiled kernel (built on first use), or None when no C compiler works here."""
    global _loaded
    with _lock:
        if _loaded is False:
            _loaded = None
            if os.environ.get("BITTERN_NO_HEAD_KERNEL") != "1":
                path = _compile()
                if path is not None:
                    try:
                        _loaded = HeadKernel(ctypes.CDLL(str(path)))
                    except OSError:
                        _loaded = None
        return _loaded  # type: ignore[return-value]
