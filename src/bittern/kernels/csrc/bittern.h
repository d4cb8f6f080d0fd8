/* bittern native CPU kernels: public C API (plain C11, no Python or PyTorch headers).
 *
 * Ternary x int8 matrix products for BitNet b1.58, bit-for-bit equal to bittern.kernels.reference:
 *
 *   s[t]   = (1 / max(max_k |x[t,k]|, 1e-5f)) * 127      float32 (two roundings, as torch computes
 *                                                         127.0 / tensor == reciprocal() * 127)
 *   q[t,k] = clamp(round_half_even(x[t,k] * s[t]), -128, 127)
 *   acc    = sum_k q[t,k] * codes[n,k]                    exact int32
 *   y[t,n] = (float)acc * (gamma / s[t])                  gamma / s[t] in float32
 *
 * Weights come in the kernel layouts "2bit-r4" and "1.6bit-r4" (see bittern/pack.py, which holds
 * their reference pack/unpack in torch):
 *
 *   2bit-r4   K padded to Kp = 128*ceil(K/128); rows in groups of 4 (last group may be short);
 *             per group, per 128-column block, per row of the group: 32 bytes, byte j holding
 *             (code[k] + 1) << 2i for k = block*128 + 32*i + j, i = 0..3.  N * Kp/4 bytes.
 *   1.6bit-r4 K padded to Kp = 160*ceil(K/160); same grouping with 160-column blocks of 32 bytes;
 *             byte j holds the 5 trits d_i = code[k_i] + 1, k_i = block*160 + 32*i + j, as the
 *             fixed-point fraction b = ceil(256 * sum_i d_i 3^(4-i) / 243), stored b ^ 0x80.
 *             Trit i is recovered as (3 * ((b * 3^i) mod 256)) >> 8.  N * Kp/5 bytes.
 *
 * Activations are int8 rows of stride ldq >= Kp, zero in the padding columns [K, Kp).
 * All functions are thread-safe to call from one thread at a time per process (the pool is shared).
 */
#ifndef BITTERN_H
#define BITTERN_H

#include <stdint.h>

#if defined(_WIN32)
#define BT_API __declspec(dllexport)
#else
#define BT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* weight formats (kernel layouts) */
enum { BT_FMT_2BIT_R4 = 0, BT_FMT_1P6BIT_R4 = 1, BT_FMT_1P67BIT_LUT = 2 };
/* activation dtypes */
enum { BT_DT_F32 = 0, BT_DT_BF16 = 1, BT_DT_F16 = 2 };
/* instruction sets */
enum { BT_ISA_AUTO = 0, BT_ISA_SCALAR = 1, BT_ISA_AVX2 = 2, BT_ISA_NEON = 3 };

BT_API int bt_abi_version(void);

/* ISA dispatch: bt_set_isa(BT_ISA_AUTO) picks the best available; returns 0 or -1 if unavailable. */
BT_API int bt_isa_available(int isa);
BT_API int bt_set_isa(int isa);
BT_API int bt_get_isa(void);
BT_API const char *bt_isa_name(int isa);

/* threads used by every call (caller included); 0 means "all online CPUs". Returns the new value. */
BT_API int bt_set_threads(int n);
BT_API int bt_get_threads(void);
/* Idle pool workers stop spinning and sleep until the next product (they otherwise spin ~2 ms after
 * each one, BITTERN_SPIN_US): call before other multithreaded work (e.g. torch ops on several threads)
 * runs between kernel calls, so it gets the cores. */
BT_API void bt_release_cores(void);

/* Layout geometry: padded K (Kp) and bytes per row. */
BT_API int64_t bt_padded_k(int fmt, int64_t K);

/* Per-token absmax int8 quantisation of x [T, K] (row stride ldx elements, dtype BT_DT_*):
 * writes q [T, ldq] (zero-filled in [K, ldq)), s [T] and rowsum [T] = sum_k q[t, k]. */
BT_API int bt_quantize(const void *x, int dtype, int64_t T, int64_t K, int64_t ldx, int8_t *q, int64_t ldq,
                       float *s, int32_t *rowsum);

/* y [T, ldy] = rescale(q @ codes^T): q [T, ldq] int8 (ldq >= Kp), rowsum [T], s [T], gamma.
 * Small T (decode, batched decode) runs the GEMV kernels, larger T the GEMM (thresholds per format in
 * bt_api.c; BITTERN_GEMV_MAX_T overrides). If y is NULL, writes the exact int32 accumulators
 * to yi [T, ldy] instead (testing). Returns 0, or a negative error code on bad arguments. */
BT_API int bt_matmul(int fmt, const uint8_t *w, int64_t N, int64_t K, const int8_t *q, int64_t ldq,
                     const int32_t *rowsum, const float *s, int64_t T, float gamma, float *y, int32_t *yi,
                     int64_t ldy);

/* Like bt_matmul but forces the kernel: mode 0 = auto, 1 = GEMV (any T), 2 = GEMM (panel decode), 3 = GEMM
 * by tables of token vectors (the panel GEMM where the ISA has no tables). Same result in every mode. */
BT_API int bt_matmul_mode(int mode, int fmt, const uint8_t *w, int64_t N, int64_t K, const int8_t *q, int64_t ldq,
                          const int32_t *rowsum, const float *s, int64_t T, float gamma, float *y, int32_t *yi,
                          int64_t ldy);
/* Several products of the same activations, y[i] = bt_matmul(fmt[i], w[i], N[i], K, q, ldq, rowsum, s, T,
 * gamma[i], y[i], NULL, ldy[i]) for i < count (<= 8), bit for bit. GEMV-sized T (decode: q/k/v, gate/up)
 * runs all of them in one thread-pool dispatch with their work items interleaved; otherwise one after
 * another. */
BT_API int bt_matmul_many(int count, const int *fmt, const uint8_t *const *w, const int64_t *N, int64_t K,
                          const int8_t *q, int64_t ldq, const int32_t *rowsum, const float *s, int64_t T,
                          const float *gamma, float *const *y, const int64_t *ldy);

/* Streaming read of nbytes (the memory roofline): returns a checksum so the loads are not elided.
 * prefetch_bytes > 0 adds software prefetches that far ahead. Uses the current threads and ISA. */
BT_API uint64_t bt_stream_read(const uint8_t *p, int64_t nbytes, int64_t prefetch_bytes);

/* Benchmark loop without Python overhead (see bt_api.c). */
BT_API int bt_bench(int what, int mode, int fmt, const uint8_t *const *ws, int nw, int64_t N, int64_t K, const int8_t *q,
                    int64_t ldq, const int32_t *rowsum, const float *s, int64_t T, float gamma, float *y, int64_t ldy,
                    int64_t prefetch_bytes, int rounds, double *times);

/* Threading backend name: "pthread-pool" or "openmp". */
BT_API const char *bt_threading_name(void);

/* ---- engine kernels (bt_engine.c): LM head and per-token decode glue ---- */

/* LM-head row formats: int8 codes, or 6-bit codes packed 96 bytes per 128 columns (see bt_engine.c) */
enum { BT_HEAD_I8 = 0, BT_HEAD_I6 = 1, BT_HEAD_I5 = 2 };

/* Bytes per head row of K columns (-2: unknown format). */
BT_API int64_t bt_head_row_bytes(int fmt, int64_t K);
/* Per-row absmax quantisation of src [rows, cols] (dtype BT_DT_*) into codes [rows, row_bytes] and
 * scales [rows]. release != 0: src is a read-only file mapping whose pages are dropped once read.
 * Returns -5 if the table holds NaN or Inf. */
BT_API int bt_head_quantize(const void *src, int dtype, int64_t rows, int64_t cols, int fmt, uint8_t *codes,
                            float *scales, int release);
/* y [T, ldy] = (q @ codes^T) * scale[n] / s[t]; q [T, ldq] from bt_quantize (zero padded to the
 * format's padded K: K for int8, 128 * ceil(K / 128) for int6, 256 * ceil(K / 256) for int5). */
BT_API int bt_head_matmul(int fmt, const uint8_t *w, const float *scale, int64_t N, int64_t K, const int8_t *q,
                          int64_t ldq, const int32_t *rowsum, const float *s, int64_t T, float *y, int64_t ldy);
/* Dequantised rows ids[0..n) as float32 out [n, K] (embedding lookups). */
BT_API int bt_head_rows(int fmt, const uint8_t *w, const float *scale, int64_t rows, int64_t K, const int64_t *ids,
                        int64_t n, float *out);

/* Decode glue, one call per step (T rows). KV dtypes: 0 float32, 1 float16, 2 bfloat16, 3 int8 (codes
 * with one float scale per cached row: max|x| / 127, in ks / vs [KVH, max_len]).
 * x[t] += delta[t] (if delta); y = rmsnorm(x[t]) * w (if w); (q, s, rowsum) = quant(y) (if q). */
BT_API int bt_eng_norm_quant(float *x, const float *delta, const float *w, float eps, int64_t T, int64_t K,
                             float *y_out, int8_t *q, int64_t ldq, float *s, int32_t *rowsum);
/* gu [T, 2F] = gate | up: gate = act(gate) * up (act 0 silu, 1 relu^2), optional sub-norm, quantise. */
BT_API int bt_eng_act_quant(float *gu, int64_t T, int64_t F, int act, const float *w, float eps, int8_t *q,
                            int64_t ldq, float *s, int32_t *rowsum);
/* One token: RoPE on q and k of qkv [H*hd | KVH*hd | KVH*hd] at pos, store k and v in the layer's cache
 * planes kc, vc [KVH, max_len, hd] (and ks, vs for int8; else NULL), attend over positions 0..pos into
 * out [H*hd]; scores: pos+1 floats of scratch. */
BT_API int bt_eng_attend(float *qkv, int64_t H, int64_t KVH, int64_t hd, int64_t pos, const float *cos,
                         const float *sin, void *kc, void *vc, float *ks, float *vs, int dt, int64_t max_len,
                         float *out, float *scores);

/* The transformer blocks of one decode step of B rows, in C (what the engine's Python loop does with
 * the calls above, without a Python call per kernel). All arguments are int64 arrays (pointers as
 * integers, floats as their float32 bit patterns in the low 32 bits):
 *   bufs  [BT_DEC_NBUF]: see enum bt_dec_buf;
 *   plan  [nlayers * BT_DEC_LAYER]: per layer the four norm weights (0 = none), then for the stages
 *         qkv, o, gate_up, down a product count c (<= BT_DEC_MAXMM in all) and after the four counts
 *         the products in stage order, each (fmt, w, N, K, gamma bits, output pointer, output row stride);
 *   rows  [2 * B]: the cache slot and the position of each row.
 * Returns 0, or the first failing call's code. */
enum bt_dec_buf {
    BT_DEC_X, BT_DEC_XN, BT_DEC_QKV, BT_DEC_ATTN, BT_DEC_O, BT_DEC_GU, BT_DEC_DOWN, BT_DEC_QH, BT_DEC_LDH, BT_DEC_QF,
    BT_DEC_LDF, BT_DEC_S, BT_DEC_RS, BT_DEC_SCORES, BT_DEC_COS, BT_DEC_SIN, BT_DEC_HIDDEN, BT_DEC_FFN, BT_DEC_H,
    BT_DEC_KVH, BT_DEC_HD, BT_DEC_ACT, BT_DEC_EPS, BT_DEC_KBASE, BT_DEC_VBASE, BT_DEC_KSBASE, BT_DEC_VSBASE,
    BT_DEC_KVDT, BT_DEC_MAXLEN, BT_DEC_SLOTS, BT_DEC_PLANE, BT_DEC_SPLANE, BT_DEC_NBUF
};
#define BT_DEC_MAXMM 8
#define BT_DEC_LAYER (8 + 7 * BT_DEC_MAXMM)
BT_API int bt_eng_decode_layers(const int64_t *bufs, const int64_t *plan, int64_t nlayers, const int64_t *rows,
                                int64_t B);

#ifdef __cplusplus
}
#endif
#endif
