"""The native CPU backend: ctypes bindings to bittern's C kernels (``kernels/csrc``, built by setup.py).

The C library is plain C11 (AVX2, NEON and scalar paths, chosen at run time from the CPU's features)
compiled into ``bittern/kernels/_bitternc*.so`` and loaded with :class:`ctypes.CDLL`, which releases
the GIL for the duration of every call. Tensors are passed by ``data_ptr()``: nothing is copied.

Two levels of API:

* :class:`NativeBackend` (``BACKEND``, name ``"native"``) implements the seam of
  :mod:`bittern.kernels` (``available``/``prepare``/``linear``) and equals the reference backend
  bit for bit.
* Lower-level functions for the inference engine, which quantises an input once and reuses it for
  several projections, writing into preallocated buffers:
  :func:`quantize_activations` -> ``(q, s, rowsum)``, :func:`gemv` (decode), :func:`gemm` (prefill),
  :func:`matmul` (picks one), all with ``out=``; :func:`set_threads` / :func:`get_threads`,
  :func:`set_isa` / :func:`force_scalar` / :func:`isa`, :func:`using` (temporary settings).

How the kernels work (details in ``csrc/bittern.h`` and the layout notes in :mod:`bittern.pack`):

* Weights live in ``"2bit-r4"`` or ``"1.6bit-r4"``: rows interleaved in groups of 4, 32 bytes per row
  per column block, so the decode GEMV reads memory strictly sequentially (with software prefetch
  2 KB ahead) and one activation block serves four rows. Codes are stored as ``c + 1`` in {0, 1, 2}
  and multiplied with ``_mm256_maddubs_epi16`` (unsigned codes x signed int8 activations); the
  per-token ``rowsum`` of ``q`` removes the +1: ``sum((c+1) q) - sum(q)``. int16 partial sums are
  widened to int32 at least every 64 products, which is exact for any input (worst case: all
  activations -128 against all weights +1, tested at K = 28672).
* The 1.6-bit format (5 trits per byte, fixed point as GGUF TQ1_0) is decoded with byte adds (x3 mod
  256) and two signed compares per trit; that decode, not memory, bounds its GEMV on one core.
* ``"1.67bit-lut"`` (TL2-style, 5 bits per 3 weights) is read by a lookup-table GEMV: per token, each
  column triple gets a 16-entry table of its 14 possible partial sums (int16 as a low-byte and a
  high-byte table), and ``_mm256_shuffle_epi8`` looks up 32 rows at once; a sign bit per triple
  flips the bytes and a stored per-row count corrects the off-by-one. For several tokens it decodes
  to bytes and uses the GEMM below.
* GEMM (prefill, batches above a few tokens) decodes a panel of rows to bytes once, then a 2-row x
  4-token register-blocked microkernel (assembly) reuses every weight vector for 4 tokens.
* Threads: a persistent pthread pool (the caller is thread 0; workers spin ~2 ms, then sleep); work
  items are taken from a shared counter, so a descheduled worker on a busy machine costs nothing.
  Measured against OpenMP for many small calls, the pool's fork/join is cheaper; OpenMP remains a
  build option (``-DBT_USE_OPENMP -fopenmp``).

Weights must be in a native layout (:data:`FORMATS`); :meth:`NativeBackend.prepare` converts any other
layout once (``"2bit"`` -> ``"2bit-r4"``, ``"1.6bit"`` -> ``"1.6bit-r4"``).

Environment: ``BITTERN_THREADS`` (threads per call, default all CPUs), ``BITTERN_KERNEL_ISA``
(``scalar``/``avx2``/``neon``; default: best available), ``BITTERN_SPIN_US`` (how long idle pool
threads spin before sleeping, default 2000), ``BITTERN_GEMV_MAX_T`` (largest batch sent to the GEMV
kernels), ``BITTERN_TABLE_GEMM_MIN_T`` (smallest batch sent to the GEMM by tables, default 10, for
``"1.6bit-r4"`` 11; 0: never),
``BITTERN_NATIVE_LIB`` (path of the library to load).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from ..pack import TernaryWeight, get_layout

ABI_VERSION = 7
FORMATS = {"2bit-r4": 0, "1.6bit-r4": 1, "1.67bit-lut": 2}
"""Native layouts and their format ids in the C API."""
NATIVE_LAYOUT = {"2bit": "2bit-r4", "2bit-r4": "2bit-r4", "1.6bit": "1.6bit-r4", "1.6bit-r4": "1.6bit-r4",
                 "1.67bit-lut": "1.67bit-lut"}
"""The native layout :meth:`NativeBackend.prepare` picks for each layout (others go to ``"2bit-r4"``)."""
ACT_PAD = 640
LUT_PAD = 96  # 1.67bit-lut: 24-column blocks, and its GEMM panel rounds up to 32 columns
"""Quantised activation rows are zero-padded to a multiple of this (128 and 160 both divide it)."""

_ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "neon": 3}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def _candidates() -> list[str]:
    env = os.environ.get("BITTERN_NATIVE_LIB")
    if env:
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    names = [os.path.join(here, "_bitternc" + sfx) for sfx in importlib.machinery.EXTENSION_SUFFIXES]
    return [p for p in names if os.path.exists(p)] or sorted(glob.glob(os.path.join(here, "_bitternc*.so")))


def _load() -> ctypes.CDLL | None:
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    paths = _candidates()
    if not paths:
        _load_error = "native library _bitternc not built (reinstall bittern with a C compiler: pip install -e .)"
        return None
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError as e:
        _load_error = f"cannot load {paths[0]}: {e}"
        return None
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    sigs = {
        "bt_abi_version": (i32, []),
        "bt_isa_available": (i32, [i32]),
        "bt_set_isa": (i32, [i32]),
        "bt_get_isa": (i32, []),
        "bt_isa_name": (ctypes.c_char_p, [i32]),
        "bt_set_threads": (i32, [i32]),
        "bt_get_threads": (i32, []),
        "bt_release_cores": (None, []),
        "bt_padded_k": (i64, [i32, i64]),
        "bt_quantize": (i32, [vp, i32, i64, i64, i64, vp, i64, vp, vp]),
        "bt_matmul": (i32, [i32, vp, i64, i64, vp, i64, vp, vp, i64, f32, vp, vp, i64]),
        "bt_matmul_mode": (i32, [i32, i32, vp, i64, i64, vp, i64, vp, vp, i64, f32, vp, vp, i64]),
        "bt_matmul_many": (i32, [i32, vp, vp, vp, i64, vp, i64, vp, vp, i64, vp, vp, vp]),
        "bt_stream_read": (ctypes.c_uint64, [vp, i64, i64]),
        "bt_threading_name": (ctypes.c_char_p, []),
        "bt_bench": (
            i32,
            [i32, i32, i32, vp, i32, i64, i64, vp, i64, vp, vp, i64, f32, vp, i64, i64, i32,
             ctypes.POINTER(ctypes.c_double)],
        ),
    }
    try:
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        if lib.bt_abi_version() != ABI_VERSION:
            raise OSError(f"ABI version {lib.bt_abi_version()} != {ABI_VERSION} (stale build?)")
    except (AttributeError, OSError) as e:
        _load_error = f"{paths[0]} is not a usable bittern kernel library: {e}"
        return None
    _lib = lib
    return lib


def available() -> bool:
    """True when the C library is built and loads."""
    return _load() is not None


def library_error() -> str | None:
    """Why the library is unavailable (None when it loads)."""
    _load()
    return _load_error


def _need() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_load_error}")
    return lib


# ----------------------------------------------------------------------------------------- settings


def set_threads(n: int | None) -> int:
    """Threads used by every kernel call (the caller included); None or 0 means all CPUs."""
    return int(_need().bt_set_threads(int(n or 0)))


def get_threads() -> int:
    """Threads used by every kernel call."""
    return int(_need().bt_get_threads())


def release_cores() -> None:
    """Let the pool's idle workers sleep now instead of spinning (~2 ms) for the next call: use before
    other multithreaded work (torch) runs between kernel calls."""
    _need().bt_release_cores()


def isa() -> str:
    """The instruction set the kernels run with now: ``"avx2"``, ``"neon"`` or ``"scalar"``."""
    lib = _need()
    return lib.bt_isa_name(lib.bt_get_isa()).decode()


def isa_available(name: str) -> bool:
    """Whether this CPU and build support ``name`` (``"scalar"``, ``"avx2"``, ``"neon"``)."""
    return name in _ISAS and bool(_need().bt_isa_available(_ISAS[name]))


def set_isa(name: str) -> str:
    """Select ``"auto"`` (best available), ``"scalar"``, ``"avx2"`` or ``"neon"``; returns the active ISA."""
    if name not in _ISAS:
        raise ValueError(f"unknown ISA {name!r}; known: {sorted(_ISAS)}")
    if _need().bt_set_isa(_ISAS[name]) != 0:
        raise RuntimeError(f"ISA {name!r} is not available on this CPU/build")
    return isa()


def force_scalar(on: bool = True) -> str:
    """Force the portable scalar path (for testing), or go back to the best available one."""
    return set_isa("scalar" if on else "auto")


@contextmanager
def using(isa_name: str | None = None, threads: int | None = None) -> Iterator[None]:
    """Temporarily run with another ISA and/or thread count."""
    old_isa, old_threads = isa(), get_threads()
    try:
        if isa_name is not None:
            set_isa(isa_name)
        if threads is not None:
            set_threads(threads)
        yield
    finally:
        set_isa(old_isa)
        set_threads(old_threads)


def threading_backend() -> str:
    """How the library runs threads (``"pthread-pool"`` or ``"openmp"``)."""
    return _need().bt_threading_name().decode()


def padded_k(in_features: int) -> int:
    """Row length of quantised activations for ``in_features``: zero padding up to a multiple of 640 (the
    r4 layouts' blocks) or of 96 (1.67bit-lut: 24-column blocks, 32-column GEMM slices), whichever is longer."""
    k = int(in_features)
    return max(-(-k // ACT_PAD) * ACT_PAD, -(-k // LUT_PAD) * LUT_PAD)


# ----------------------------------------------------------------------------------------- kernels


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _t(a):
    """NumPy arrays are wrapped without copying (torch.from_numpy); tensors pass through."""
    return a if a is None or isinstance(a, torch.Tensor) else torch.from_numpy(a)


def _check_cpu(*ts: torch.Tensor) -> None:
    for t in ts:
        if not t.is_cpu:
            raise ValueError(f"native kernels need CPU tensors, got {t.device}")


def quantize_activations(
    x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantisation of ``x [..., K]`` exactly as :func:`bittern.quant.quantize_activation`.

    Returns ``(q, s, rowsum)``: ``q`` int8 ``[T, padded_k(K)]`` (zero beyond K), ``s`` float32 ``[T]``,
    ``rowsum`` int32 ``[T]`` (sum of each row of q), with ``T = x[..., 0].numel()``. ``out`` may supply
    the three buffers (``q`` needs at least ``padded_k(K)`` columns and unit column stride). NumPy
    arrays are accepted wherever tensors are (wrapped without copying).
    """
    lib = _lib or _need()
    x = _t(x)
    if out is not None:
        out = tuple(_t(o) for o in out)
    _check_cpu(x)
    K = x.shape[-1]
    if K == 0:
        raise ValueError("cannot quantise activations with 0 features")
    x2 = x.reshape(-1, K)
    if x2.dtype not in _DTYPES:
        x2 = x2.float()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if out is None:
        q = torch.empty((T, padded_k(K)), dtype=torch.int8)
        s = torch.empty(T, dtype=torch.float32)
        rowsum = torch.empty(T, dtype=torch.int32)
    else:
        q, s, rowsum = out
        if q.dtype != torch.int8 or q.shape[0] < T or q.shape[1] < padded_k(K) or q.stride(1) != 1:
            raise ValueError(f"q buffer must be int8 [>= {T}, >= {padded_k(K)}] with unit column stride")
        if (s.dtype != torch.float32 or rowsum.dtype != torch.int32
                or not s.is_contiguous() or not rowsum.is_contiguous()):
            raise ValueError("s must be contiguous float32 and rowsum contiguous int32")
        if s.numel() < T or rowsum.numel() < T:
            raise ValueError(f"s and rowsum need at least {T} entries")
        _check_cpu(q, s, rowsum)
    if T == 0:
        return q, s, rowsum
    ldx = x2.stride(0) if T > 1 else K
    rc = lib.bt_quantize(_ptr(x2), _DTYPES[x2.dtype], T, K, ldx, _ptr(q), q.stride(0), _ptr(s), _ptr(rowsum))
    if rc != 0:
        raise RuntimeError(f"bt_quantize failed ({rc})")
    return q, s, rowsum


class _WeightMeta:
    """What a call needs to know about a native-layout weight, computed once and cached on it."""

    __slots__ = ("packed", "fmt", "N", "K", "Kp", "gamma", "ptr")

    def __init__(self, weight: TernaryWeight, lib: ctypes.CDLL) -> None:
        try:
            self.fmt = FORMATS[weight.layout]
        except KeyError:
            raise ValueError(
                f"native kernels read layouts {sorted(FORMATS)}, got {weight.layout!r}: call BACKEND.prepare(weight)"
            ) from None
        packed = weight.packed
        if not packed.is_cpu or packed.dtype != torch.uint8 or not packed.is_contiguous():
            raise ValueError("packed weight must be a contiguous uint8 CPU tensor")
        self.N, self.K = int(weight.out_features), int(weight.in_features)
        self.Kp = int(lib.bt_padded_k(self.fmt, self.K))
        if packed.numel() != self.N * get_layout(weight.layout).packed_cols(self.K):
            raise ValueError(
                f"packed weight has {packed.numel()} bytes; {weight.layout} needs"
                f" {self.N} x {get_layout(weight.layout).packed_cols(self.K)}"
            )
        self.packed = packed
        self.gamma = float(weight.scale)
        self.ptr = packed.data_ptr()


def _meta(weight: TernaryWeight, lib: ctypes.CDLL) -> _WeightMeta:
    meta = weight.__dict__.get("_native_meta")
    if meta is None or meta.packed is not weight.packed:
        meta = _WeightMeta(weight, lib)
        weight.__dict__["_native_meta"] = meta
    return meta


def _matmul(
    mode: int,
    q: torch.Tensor,
    s: torch.Tensor | None,
    rowsum: torch.Tensor,
    weight: TernaryWeight,
    out: torch.Tensor | None,
    int32: bool = False,
) -> torch.Tensor:
    # The decode loop calls this hundreds of times per token: checks are kept to cheap attributes.
    lib = _lib or _need()
    if not isinstance(q, torch.Tensor):
        q, s, rowsum, out = _t(q), _t(s), _t(rowsum), _t(out)
    m = _meta(weight, lib)
    if q.dtype != torch.int8 or q.dim() != 2 or not q.is_cpu:
        raise ValueError("q must be a 2-D int8 CPU tensor [T, padded K]")
    T, kq = q.shape
    if q.is_contiguous():
        ldq = kq
    elif q.stride(1) == 1:
        ldq = q.stride(0)
    else:
        raise ValueError("q must have unit column stride")
    if kq < m.Kp:
        raise ValueError(f"q has {kq} columns; this weight needs {m.Kp} (zero-padded, see padded_k)")
    if rowsum.dtype != torch.int32 or not rowsum.is_cpu or not rowsum.is_contiguous() or rowsum.numel() < T:
        raise ValueError("rowsum must be a contiguous int32 CPU tensor with one entry per token")
    dtype = torch.int32 if int32 else torch.float32
    if out is None:
        out = torch.empty((T, m.N), dtype=dtype)
        ldy = m.N
    else:
        if out.dtype != dtype or out.dim() != 2 or not out.is_cpu or out.shape[0] < T or out.shape[1] < m.N:
            raise ValueError(f"out must be a {dtype} CPU tensor [{T}, >= {m.N}]")
        if out.is_contiguous():
            ldy = out.shape[1]
        elif out.stride(1) == 1:
            ldy = out.stride(0)
        else:
            raise ValueError("out must have unit column stride")
    if T == 0:
        return out
    if int32:
        yp, yip, sp, gamma = None, out.data_ptr(), None, 0.0
    else:
        if s is None or s.dtype != torch.float32 or not s.is_cpu or not s.is_contiguous() or s.numel() < T:
            raise ValueError("s must be a contiguous float32 CPU tensor with one entry per token")
        yp, yip, sp, gamma = out.data_ptr(), None, s.data_ptr(), m.gamma
    rc = lib.bt_matmul_mode(
        mode, m.fmt, m.ptr, m.N, m.K, q.data_ptr(), ldq, rowsum.data_ptr(), sp, T, gamma, yp, yip, ldy
    )
    if rc != 0:
        raise RuntimeError(f"bt_matmul failed ({rc})")
    return out


def matmul(
    q: torch.Tensor, s: torch.Tensor, rowsum: torch.Tensor, weight: TernaryWeight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``y [T, N] = float32(q @ codes^T) * (gamma / s)``: GEMV kernels for a few tokens, GEMM for more.

    The GEMV takes up to 9 tokens for ``"2bit-r4"`` and ``"1.67bit-lut"``, 4 for ``"1.6bit-r4"``
    (measured on Zen 3; ``BITTERN_GEMV_MAX_T`` overrides); above that, from 10 tokens (11 for ``"1.6bit-r4"``)
    the GEMM is :func:`gemm_tables` where the kernel set has it (``BITTERN_TABLE_GEMM_MIN_T``), else :func:`gemm`.
    """
    return _matmul(0, q, s, rowsum, weight, out)


def gemv(
    q: torch.Tensor, s: torch.Tensor, rowsum: torch.Tensor, weight: TernaryWeight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode product: the weight-streaming GEMV (2-4 tokens share each decoded weight vector).

    Same result as :func:`matmul`, for any number of tokens.
    """
    return _matmul(1, q, s, rowsum, weight, out)


def gemm(
    q: torch.Tensor, s: torch.Tensor, rowsum: torch.Tensor, weight: TernaryWeight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Prefill / batched product (decoded weight panels, register-blocked); same result as :func:`matmul`."""
    return _matmul(2, q, s, rowsum, weight, out)


def gemm_tables(
    q: torch.Tensor, s: torch.Tensor, rowsum: torch.Tensor, weight: TernaryWeight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Prefill product by tables of token vectors (one add per 4 weights x 16 tokens); same result as
    :func:`matmul`. Where the kernel set has no tables (scalar, NEON) it runs :func:`gemm`.

    :func:`matmul` uses it from 10 tokens up, 11 for ``"1.6bit-r4"`` (``BITTERN_TABLE_GEMM_MIN_T``; 0 turns it off).
    """
    return _matmul(3, q, s, rowsum, weight, out)


def matmul_int32(
    q: torch.Tensor, rowsum: torch.Tensor, weight: TernaryWeight, mode: str = "auto", out: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact int32 accumulators ``q @ codes^T`` (``rowsum`` must be the row sums of ``q``); for tests."""
    return _matmul({"auto": 0, "gemv": 1, "gemm": 2, "tables": 3}[mode], q, None, rowsum, weight, out, int32=True)


def matmul_many(
    q: torch.Tensor, s: torch.Tensor, rowsum: torch.Tensor, weights: list[TernaryWeight], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Products of one set of activations with several weights, side by side: ``out [T, sum N_i]``.

    Each slice equals :func:`matmul` of its weight bit for bit; for decode-sized ``T`` all products run
    in one thread-pool dispatch with their work items interleaved (q/k/v, gate/up of a block).
    """
    lib = _need()
    if not weights or len(weights) > 8:
        raise ValueError("matmul_many takes 1 to 8 weights")
    metas = [_meta(w, lib) for w in weights]
    K = metas[0].K
    if any(m.K != K for m in metas):
        raise ValueError("matmul_many: all weights must have the same in_features")
    if q.dtype != torch.int8 or q.dim() != 2 or not q.is_cpu or q.stride(1) != 1:
        raise ValueError("q must be a 2-D int8 CPU tensor [T, padded K] with unit column stride")
    T = q.shape[0]
    if q.shape[1] < max(m.Kp for m in metas):
        raise ValueError(f"q has {q.shape[1]} columns; these weights need {max(m.Kp for m in metas)} (see padded_k)")
    if rowsum.dtype != torch.int32 or not rowsum.is_cpu or not rowsum.is_contiguous() or rowsum.numel() < T:
        raise ValueError("rowsum must be a contiguous int32 CPU tensor with one entry per token")
    if s.dtype != torch.float32 or not s.is_cpu or not s.is_contiguous() or s.numel() < T:
        raise ValueError("s must be a contiguous float32 CPU tensor with one entry per token")
    total = sum(m.N for m in metas)
    if out is None:
        out = torch.empty((T, total), dtype=torch.float32)
    elif out.dtype != torch.float32 or out.dim() != 2 or not out.is_cpu or out.shape[0] < T or out.shape[1] < total \
            or out.stride(1) != 1:
        raise ValueError(f"out must be a float32 CPU tensor [{T}, >= {total}] with unit column stride")
    if T == 0:
        return out
    n = len(metas)
    offsets = [sum(m.N for m in metas[:i]) for i in range(n)]
    fmts = (ctypes.c_int * n)(*[m.fmt for m in metas])
    ptrs = (ctypes.c_void_p * n)(*[m.ptr for m in metas])
    Ns = (ctypes.c_int64 * n)(*[m.N for m in metas])
    gammas = (ctypes.c_float * n)(*[m.gamma for m in metas])
    ys = (ctypes.c_void_p * n)(*[out.data_ptr() + 4 * o for o in offsets])
    ldys = (ctypes.c_int64 * n)(*([out.stride(0)] * n))
    rc = lib.bt_matmul_many(n, fmts, ptrs, Ns, K, q.data_ptr(), q.stride(0), rowsum.data_ptr(), s.data_ptr(), T,
                            gammas, ys, ldys)
    if rc != 0:
        raise RuntimeError(f"bt_matmul_many failed ({rc})")
    return out


def stream_read(buf: torch.Tensor, prefetch_bytes: int = 0) -> int:
    """Read every byte of ``buf`` once with SIMD loads on the current threads (the memory roofline)."""
    _check_cpu(buf)
    if not buf.is_contiguous():
        raise ValueError("buffer must be contiguous")
    return int(_need().bt_stream_read(_ptr(buf), buf.numel() * buf.element_size(), int(prefetch_bytes)))


def bench_calls(
    weights: list[TernaryWeight],
    q: torch.Tensor,
    s: torch.Tensor,
    rowsum: torch.Tensor,
    out: torch.Tensor,
    mode: str = "auto",
    rounds: int = 5,
    read: bool = False,
    prefetch_bytes: int = 0,
    cpu_clock: bool = False,
) -> list[float]:
    """Seconds per call for ``rounds`` passes over ``weights`` (same shape and layout), timed in C.

    With ``read=True`` each call is instead a :func:`stream_read` of the same packed bytes: the
    memory roofline for exactly the kernel's traffic. Python is not in the timed loop. ``cpu_clock``
    times with the calling thread's CPU clock (meaningful for one thread on a busy machine).
    """
    lib = _need()
    metas = [_meta(w, lib) for w in weights]
    m = metas[0]
    ptrs = (ctypes.c_void_p * len(metas))(*[x.ptr for x in metas])
    times = (ctypes.c_double * rounds)()
    T = q.shape[0]
    rc = lib.bt_bench(
        (1 if read else 0) | (2 if cpu_clock else 0), {"auto": 0, "gemv": 1, "gemm": 2, "tables": 3}[mode], m.fmt,
        ptrs, len(metas), m.N, m.K,
        q.data_ptr(), q.stride(0), rowsum.data_ptr(), s.data_ptr(), T, m.gamma, out.data_ptr(), out.stride(0),
        int(prefetch_bytes), rounds, times,
    )
    if rc != 0:
        raise RuntimeError(f"bt_bench failed ({rc})")
    return list(times)


# ----------------------------------------------------------------------------------------- backend


class NativeBackend:
    """Ternary linear on CPU with the C kernels; bit-for-bit equal to the reference backend."""

    name = "native"

    def available(self) -> bool:
        """True when the C library is built and loads (never raises)."""
        try:
            return available()
        except Exception:  # pragma: no cover - defensive: a broken library must not break imports
            return False

    def prepare(self, weight: TernaryWeight) -> TernaryWeight:
        """The weight in its format's native layout (``"2bit"`` -> ``"2bit-r4"``, ``"1.6bit"`` -> ``"1.6bit-r4"``)."""
        if weight.layout in FORMATS:
            return weight
        cached = weight.__dict__.get("_native_prepared")
        if cached is not None:
            return cached
        prepared = weight.to_layout(NATIVE_LAYOUT.get(weight.layout, "2bit-r4"))
        prepared.packed = prepared.packed.contiguous()
        weight.__dict__["_native_prepared"] = prepared
        return prepared

    def linear(self, x: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
        """``y[..., out] = rescale(quant(x) @ codes.T)`` in float32."""
        if x.shape[-1] != weight.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {weight.in_features}")
        w = self.prepare(weight)
        lead = x.shape[:-1]
        q, s, rowsum = quantize_activations(x)
        y = matmul(q, s, rowsum, w)
        return y.reshape(*lead, weight.out_features)


BACKEND = NativeBackend()
