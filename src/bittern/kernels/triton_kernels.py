"""Triton kernels for BitNet b1.58 (imported only when ``triton`` is installed; see ``triton_backend``).

Inference (W2A8: packed 2-bit ternary weights x int8 per-token activations, int32 accumulation):

* :func:`gemv` -- decode, up to 4 rows: a per-token quantisation kernel writes int8 ``q`` (in the
  order the GEMV reads, see ``_gemv_kernel``), ``s`` and ``sum(q)``; the GEMV kernel then turns each
  32-bit weight word into 4 words of 4 byte-sized codes with one shift and one AND each and feeds
  them to ``dp4a`` (4 int8 MACs per instruction) against the matching activation words: about
  3 instructions per 4 weights, so the kernel can stay memory-bound. Exact: int32 accumulation,
  then ``float32(acc) * (gamma / s)``.
* :func:`gemm` -- prefill / batches: the same quantisation kernel (natural order), then an int8
  tensor-core GEMM (``tl.dot`` -> int32) unpacks the weight tile in registers and applies the same
  rescale in its epilogue.

Weights are in the ``"2bit-k64"`` layout of :mod:`bittern.pack` (rows padded to 16 bytes), viewed
as int32 words ``[N, Kw]``: bits ``2i..2i+1`` of word ``[n, p]`` hold ``code[n, 16p + i] + 1``.

Training (fake quantisation, straight-through estimator):

* :func:`norm_act_quant` -- fused RMSNorm (optional) + per-token activation fake-quant, one kernel.
* :func:`weight_fake_quant` -- ternary fake-quant of the latent weight (codes * gamma), one kernel.
* :func:`norm_backward` -- RMSNorm backward (dx and per-program partial sums of d norm_weight).

The arithmetic is that of :mod:`bittern.quant`, exactly. Note that torch evaluates the python
expression ``127.0 / amax`` as ``amax.reciprocal() * 127.0`` (two roundings), so s is computed here
the same way; gamma / s, w / gamma and q / s are single IEEE divisions (``div_rn``). Round half to
even is libdevice ``rint`` on a GPU and the float32 magic-number trick ``(v + 1.5 * 2**23) -
1.5 * 2**23`` under the interpreter (exact for |v| < 2**22; the interpreter has no libdevice); the
interpreter also truncates float32 -> bfloat16 casts, so ``_cast`` rounds those itself there.
Every kernel compiles for sm_80 and sm_90 (checked offline with Triton's bundled ptxas), but
block sizes are heuristics, untuned on hardware: ``bench/gpu.py`` sweeps alternatives.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
"""Whether these kernels were defined under the Triton interpreter (decided at import)."""

GEMV_MAX_M = 4
"""Up to this many rows the dp4a GEMV kernel is used; beyond it the tensor-core GEMM."""

USE_ASM = not INTERPRET and torch.version.hip is None
"""PTX ``dp4a`` on NVIDIA GPUs; the same arithmetic in plain integer ops elsewhere (interpreter)."""


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _round_half_even(v, INTERP: tl.constexpr):
    if INTERP:
        r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: exact round-half-even for |v| < 2**22
    else:
        r = libdevice.rint(v)
    return r


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``v.to(dtype)`` rounding to nearest even; the interpreter truncates float32 -> bfloat16, so
    there the rounding is done on the bits first (finite values)."""
    if INTERP and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _quantize(v, s, INTERP: tl.constexpr):
    """clamp(round(v * s), -128, 127) as float32 (v, s float32)."""
    r = _round_half_even(v * s, INTERP)
    return tl.minimum(tl.maximum(r, -128.0), 127.0)


@triton.jit
def _scale_from_absmax(amax):
    """s = 127 / max(amax, 1e-5) computed as torch computes ``127.0 / t``: rn(rn(1 / t) * 127)."""
    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.maximum(amax, 1e-5))
    return inv * 127.0


@triton.jit
def _row_scale(x_row, K, BLOCK_K: tl.constexpr):
    """s = 127 / max(max|x|, 1e-5) of one row of K elements (float32, IEEE division)."""
    offs = tl.arange(0, BLOCK_K)
    amax_v = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        amax_v = tl.maximum(amax_v, tl.abs(xv))
    return _scale_from_absmax(tl.max(amax_v, axis=0))


# ----------------------------------------------------------------------------- inference kernels


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum over the 4 bytes of a * b (signed bytes of int32 words): PTX ``dp4a`` on NVIDIA."""
    if ASM:
        r = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for m in tl.static_range(4):
            r += ((a << (24 - 8 * m)) >> 24) * ((b << (24 - 8 * m)) >> 24)
    return r


@triton.jit
def _gemv_kernel(q_ptr, qsum_ptr, s_ptr, w_ptr, y_ptr, gamma_ptr, N, Kw4, stride_qm, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, ASM: tl.constexpr):
    """y[m, rows] = rescale(q[m] . codes[rows]); grid (cdiv(N, BLOCK_N), M).

    ``w`` is int32 words ``[N, Kw]`` (16 codes each). ``q`` is int32 words of the *permuted* int8
    activations (``_act_quant_kernel`` with PERMUTE), four planes of Kw words: word ``j * Kw + p``
    holds q[16p + 4m + j] in byte m, matching ``(w >> 2j) & 0x03030303``, whose byte m is the
    stored field 4m + j of weight word p. So 16 codes cost 4 shifts, 4 ands and 4 dp4a; lanes run
    along K and each thread reuses its activation words for all the rows it holds. Stored fields
    are code + 1: the sum of q (``qsum``) is subtracted at the end. Keep BLOCK_P <= 16 * num_warps:
    then the activation words load straight into the weight tile's thread layout (larger BLOCK_P
    puts a shared-memory shuffle inside the loop; seen in the sm_80 / sm_90 SASS).
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    q_row = q_ptr + m.to(tl.int64) * stride_qm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    Kw = Kw4 * 4  # words per row; the layout pads rows to 16 bytes, so loads are aligned vectors
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * Kw
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.int32)
    # software prefetch: the next weight tile is in flight while this one is used (Triton does
    # not pipeline loads that feed no dot)
    w_next = tl.load(w_rows + offs_p[None, :], mask=n_mask[:, None] & (offs_p < Kw)[None, :], other=0)
    for p0 in range(0, Kw, BLOCK_P):
        p = p0 + offs_p
        p_mask = p < Kw
        w = w_next
        pn = p + BLOCK_P
        w_next = tl.load(w_rows + pn[None, :], mask=n_mask[:, None] & (pn < Kw)[None, :], other=0)
        for j in tl.static_range(4):
            qw = tl.load(q_row + j * Kw + p, mask=p_mask, other=0)
            acc = _dp4a((w >> (2 * j)) & 0x03030303, tl.broadcast_to(qw[None, :], (BLOCK_N, BLOCK_P)), acc, ASM)
    total = tl.sum(acc, axis=1) - tl.load(qsum_ptr + m)
    scale = tl.math.div_rn(tl.load(gamma_ptr), tl.load(s_ptr + m))
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, total.to(tl.float32) * scale, mask=n_mask)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, qsum_ptr, K, Kp, stride_xm, stride_qm,
                      PERMUTE: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """Per-token int8 quantisation of one row, zero-padded from K to Kp (a multiple of 16); also
    writes s and the row's sum of q. With PERMUTE the row is four planes of Kp / 4 bytes, byte
    ``(j * Kp / 16 + p) * 4 + m`` holding q[16p + 4m + j] (the order ``_gemv_kernel`` reads). grid (M,)."""
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    s = _row_scale(x_row, K, BLOCK_K)
    offs = tl.arange(0, BLOCK_K)
    qsum = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, Kp, BLOCK_K):
        k = k0 + offs
        if PERMUTE:  # byte (j * Kw + p) * 4 + m  <-  q[16p + 4m + j],  Kw = Kp // 16
            plane = Kp // 4
            src = ((k % plane) // 4) * 16 + (k % 4) * 4 + k // plane
        else:
            src = k
        xv = tl.load(x_row + src, mask=(src < K) & (k < Kp), other=0.0).to(tl.float32)
        q = _quantize(xv, s, INTERP).to(tl.int32)
        qsum += q
        tl.store(q_ptr + m * stride_qm + k, q.to(tl.int8), mask=k < Kp)
    tl.store(s_ptr + m, s)
    tl.store(qsum_ptr + m, tl.sum(qsum, axis=0))


@triton.jit
def _gemm_kernel(q_ptr, s_ptr, w_ptr, y_ptr, gamma_ptr, M, N, Kw4, stride_qm, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """y = rescale(q @ codes^T) for int8 q [M, Kp] and int32 words w [N, Kw] (Kp = 16 Kw = 64 Kw4);
    grid (cdiv(M, BM) * cdiv(N, BN),)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_K // 16)
    shifts = tl.arange(0, 16) * 2
    Kw = Kw4 * 4  # rows padded to 16 bytes: aligned vector loads
    Kp = Kw * 16
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * Kw
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, Kp, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + k[None, :],
                    mask=m_mask[:, None] & (k < Kp)[None, :], other=0)
        p = k0 // 16 + offs_p
        w = tl.load(w_rows + p[None, :], mask=n_mask[:, None] & (p < Kw)[None, :], other=0)   # [BN, BK/16]
        fields = (w[:, :, None] >> shifts[None, None, :]) & 3                 # [BN, BK/16, 16]: k = 16p + i
        b = tl.trans((tl.reshape(fields, (BLOCK_N, BLOCK_K)) - 1).to(tl.int8))  # [BK, BN]; padding meets q == 0
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    s = tl.load(s_ptr + offs_m, mask=m_mask, other=1.0)
    scale = tl.math.div_rn(tl.load(gamma_ptr) + tl.zeros([BLOCK_M], dtype=tl.float32), s)
    y = acc.to(tl.float32) * scale[:, None]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y,
             mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- training kernels


@triton.jit
def _norm_act_quant_fwd_kernel(x_ptr, nw_ptr, xq_ptr, rstd_ptr, K, stride_xm, stride_om, eps,
                               HAS_NORM: tl.constexpr, BLOCK_K: tl.constexpr,
                               INTERP: tl.constexpr):
    """xq[m] = fake_quant(rmsnorm(x[m]) * nw) (or of x[m] without norm); grid (M,)."""
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    offs = tl.arange(0, BLOCK_K)
    rstd = 1.0
    if HAS_NORM:
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        tl.store(rstd_ptr + m, rstd)
    amax_v = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        h = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            nw = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            h = _cast((h * rstd) * nw, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
        amax_v = tl.maximum(amax_v, tl.abs(h))
    s = _scale_from_absmax(tl.max(amax_v, axis=0))
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        h = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            nw = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            h = _cast((h * rstd) * nw, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
        q = _quantize(h, s, INTERP)
        xq = tl.math.div_rn(q, s + tl.zeros([BLOCK_K], dtype=tl.float32))
        xq = _cast(_cast(xq, x_ptr.dtype.element_ty, INTERP).to(tl.float32), xq_ptr.dtype.element_ty, INTERP)
        tl.store(xq_ptr + m * stride_om + k, xq,
                 mask=k < K)


@triton.jit
def _weight_fake_quant_kernel(w_ptr, gamma_ptr, out_ptr, numel, BLOCK: tl.constexpr,
                              INTERP: tl.constexpr):
    """out = (clamp(round(w / gamma), -1, 1) * gamma) in w's dtype, then out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr) + tl.zeros([BLOCK], dtype=tl.float32)
    c = _round_half_even(tl.math.div_rn(w, gamma), INTERP)
    c = tl.minimum(tl.maximum(c, -1.0), 1.0)
    out = _cast(_cast(c * gamma, w_ptr.dtype.element_ty, INTERP).to(tl.float32), out_ptr.dtype.element_ty, INTERP)
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit
def _norm_bwd_kernel(x_ptr, nw_ptr, dh_ptr, rstd_ptr, dx_ptr, dnw_ptr, M, K,
                     stride_xm, stride_hm, stride_dm,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """RMSNorm backward for BLOCK_M rows: dx, and this program's partial sum of d norm_weight."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < M
    rows64 = rows.to(tl.int64)
    rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)
    offs = tl.arange(0, BLOCK_K)
    dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = r_mask[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows64[:, None] * stride_hm + k[None, :], mask=mask, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        dot += tl.sum(dh * nw[None, :] * (x * rstd[:, None]), axis=1)
    c = dot / K
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = r_mask[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows64[:, None] * stride_hm + k[None, :], mask=mask, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        xhat = x * rstd[:, None]
        dx = rstd[:, None] * (dh * nw[None, :] - xhat * c[:, None])
        tl.store(dx_ptr + rows64[:, None] * stride_dm + k[None, :], _cast(dx, dx_ptr.dtype.element_ty, INTERP),
                 mask=mask)
        tl.store(dnw_ptr + pid.to(tl.int64) * K + k, tl.sum(dh * xhat, axis=0), mask=k < K)


# ----------------------------------------------------------------------------- launchers


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def gemv_config(M: int, N: int, Kw: int) -> dict:
    """Default GEMV blocks (heuristic, untuned: 128-byte word rows, enough programs to fill a GPU)."""
    if INTERPRET:
        return {"BLOCK_N": _pow2(N, 16, 64), "BLOCK_P": _pow2(Kw, 4, 32), "num_warps": 4}
    return {"BLOCK_N": 16 if N < 8192 else 32, "BLOCK_P": 64, "num_warps": 4}


def gemm_config(M: int, N: int, Kp: int) -> dict:
    """Default GEMM tiles (heuristic; int8 tl.dot wants BLOCK_K >= 32)."""
    if INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_N": _pow2(N, 16, 64), "BLOCK_K": _pow2(Kp, 32, 64), "GROUP_M": 4,
                "num_warps": 4}
    block_m = _pow2(M, 16, 128)
    if block_m >= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    block_n = 32 if block_m <= 32 else 64  # small batches: more programs
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}


def act_quant(x2: torch.Tensor, Kp: int, permute: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantisation: ``(q int8 [M, Kp] zero-padded, s float32 [M], sum(q) int32 [M])``."""
    M, K = x2.shape
    q = torch.empty((M, Kp), dtype=torch.int8, device=x2.device)
    s = torch.empty((M,), dtype=torch.float32, device=x2.device)
    qsum = torch.empty((M,), dtype=torch.int32, device=x2.device)
    _act_quant_kernel[(M,)](x2, q, s, qsum, K, Kp, x2.stride(0), q.stride(0), PERMUTE=permute,
                            BLOCK_K=_pow2(Kp, 16, 1024), INTERP=INTERPRET, num_warps=4)
    return q, s, qsum


def gemv(x2: torch.Tensor, words: torch.Tensor, gamma: torch.Tensor, K: int,
         config: dict | None = None) -> torch.Tensor:
    """Quantise (permuted) + dp4a W2A8 GEMV: ``x2 [M, K]`` (M small), ``words`` int32 ``[N, Kw]``."""
    M = x2.shape[0]
    N, Kw = words.shape
    q, s, qsum = act_quant(x2, 16 * Kw, permute=True)
    y = torch.empty((M, N), dtype=torch.float32, device=x2.device)
    cfg = dict(config or gemv_config(M, N, Kw))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), M)
    _gemv_kernel[grid](q.view(torch.int32), qsum, s, words, y, gamma, N, Kw // 4, 4 * Kw, y.stride(0),
                       ASM=USE_ASM, **cfg)
    return y


def gemm(x2: torch.Tensor, words: torch.Tensor, gamma: torch.Tensor, K: int,
         config: dict | None = None) -> torch.Tensor:
    """Quantise + int8 tensor-core W2A8 GEMM: ``x2 [M, K]``, ``words`` int32 ``[N, Kw]``."""
    M = x2.shape[0]
    N, Kw = words.shape
    Kp = 16 * Kw
    q, s, _ = act_quant(x2, Kp)
    y = torch.empty((M, N), dtype=torch.float32, device=x2.device)
    cfg = dict(config or gemm_config(M, N, Kp))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](q, s, words, y, gamma, M, N, Kw // 4, q.stride(0), y.stride(0), **cfg)
    return y


def ternary_linear(x2: torch.Tensor, words: torch.Tensor, gamma: torch.Tensor, K: int) -> torch.Tensor:
    """GEMV for up to :data:`GEMV_MAX_M` rows, else GEMM; float32 ``[M, N]``."""
    if x2.shape[0] <= GEMV_MAX_M:
        return gemv(x2, words, gamma, K)
    return gemm(x2, words, gamma, K)


def norm_act_quant(x2: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward prologue: ``(xq [M, K] in out_dtype, rstd float32 [M])``."""
    M, K = x2.shape
    xq = torch.empty((M, K), dtype=out_dtype, device=x2.device)
    rstd = torch.ones((M,), dtype=torch.float32, device=x2.device)
    has_norm = norm_weight is not None
    nw = norm_weight if has_norm else x2  # never read without a norm
    if M:
        _norm_act_quant_fwd_kernel[(M,)](x2, nw, xq, rstd, K, x2.stride(0), xq.stride(0), float(eps),
                                         HAS_NORM=has_norm, BLOCK_K=_pow2(K, 16, 4096 if not INTERPRET else 1024),
                                         INTERP=INTERPRET, num_warps=4 if K <= 2048 else 8)
    return xq, rstd


def weight_fake_quant(w: torch.Tensor, gamma: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``codes * gamma`` of a contiguous latent weight, in ``w.dtype`` then ``out_dtype``."""
    out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    n = w.numel()
    block = 1024 if INTERPRET else 4096
    if n:
        _weight_fake_quant_kernel[(triton.cdiv(n, block),)](w, gamma, out, n, BLOCK=block,
                                                            INTERP=INTERPRET, num_warps=8)
    return out


def norm_backward(x2: torch.Tensor, norm_weight: torch.Tensor, dh: torch.Tensor,
                  rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm backward: ``(dx in x2.dtype, d norm_weight float32)``."""
    M, K = x2.shape
    dx = torch.empty_like(x2)
    block_m = 16
    block_k = _pow2(K, 16, 256 if INTERPRET else 128)
    n_prog = triton.cdiv(M, block_m)
    part = torch.empty((max(n_prog, 1), K), dtype=torch.float32, device=x2.device)
    if M:
        _norm_bwd_kernel[(n_prog,)](x2, norm_weight, dh, rstd, dx, part, M, K,
                                    x2.stride(0), dh.stride(0), dx.stride(0),
                                    BLOCK_M=block_m, BLOCK_K=block_k, INTERP=INTERPRET, num_warps=4)
    else:
        part.zero_()
    return dx, part.sum(dim=0)
