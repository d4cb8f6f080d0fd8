"""The engine's C kernels in the native library: LM head (int8, 6-bit, 5-bit) bit-exact, decode glue on both ISAs."""

from __future__ import annotations

import ctypes

import pytest
import torch

from bittern.engine.head import TokenTable, quantize_rows_int8
from bittern.engine.headkernel import load_head_kernel
from bittern.kernels import native
from bittern.quant import quantize_activation

pytestmark = pytest.mark.skipif(load_head_kernel() is None, reason="native library not built")

ISAS = ["scalar"] + (["avx2"] if native.isa_available("avx2") else [])
QMAX = {"int8": 127, "int6": 31, "int5": 15}


def _reference(fmt: str, w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scales = quantize_rows_int8(w, qmax=QMAX[fmt])
    q, s = quantize_activation(x)
    acc = torch.matmul(q.double(), codes.double().t()).float()  # exact integer sums
    return codes, scales, acc * (scales[None, :] / s)


@pytest.mark.parametrize("fmt", ["int8", "int6", "int5"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("rows,cols,tokens", [(37, 100, 1), (64, 128, 2), (129, 257, 5), (300, 2560 + 96, 3)])
def test_head_product_bit_exact(fmt: str, isa: str, threads: int, rows: int, cols: int, tokens: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of different scale
    w[0] = 0.0  # an all-zero row
    x = torch.randn(tokens, cols, generator=g) * 3
    codes_ref, scales_ref, y_ref = _reference(fmt, w, x)
    with native.using(isa, threads):
        table = TokenTable(w, fmt)
        y = table.logits(x)
        emb = table.embed(torch.tensor([0, rows - 1, rows // 2, rows - 1]))
    row_bytes = {"int8": cols, "int6": -(-cols // 128) * 96, "int5": -(-cols // 256) * 160}[fmt]
    assert table.nbytes == rows * row_bytes + 4 * rows
    assert torch.equal(table.scales, scales_ref)
    assert torch.equal(emb, codes_ref[[0, rows - 1, rows // 2, rows - 1]].float() * scales_ref[[0, rows - 1, rows // 2, rows - 1], None])
    assert torch.equal(y, y_ref)


def test_head_extreme_codes_do_not_overflow() -> None:
    """All codes at +-qmax and activations at -128/127: the int16 pair sums must stay exact."""
    kern = load_head_kernel()
    cols = 4096
    w = torch.ones(4, cols)
    w[1] = -1.0
    w[2, ::2] = -1.0
    x = torch.full((2, cols), -1.0)
    x[1, ::3] = 1.0
    for fmt in ("int8", "int6", "int5"):
        _, _, y_ref = _reference(fmt, w, x)
        for isa in ISAS:
            with native.using(isa, 1):
                codes, scales = kern.quantize(w, fmt)
                assert torch.equal(kern.matmul(fmt, codes, scales, cols, x), y_ref)


def test_head_rejects_non_finite_tables() -> None:
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        TokenTable(w, "int6")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rows_int8(w)


def test_low_bit_head_bytes_and_error_ordered() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 256, generator=g)
    x = torch.randn(4, 256, generator=g)
    exact = x @ w.t()
    errs = {f: (TokenTable(w, f).logits(x) - exact).abs().mean().item() for f in ("int8", "int6", "int5")}
    assert 0 < errs["int8"] < errs["int6"] < errs["int5"] < 0.1 * exact.abs().mean().item()
    assert TokenTable(w, "int6").weight.numel() == 500 * 256 * 3 // 4
    assert TokenTable(w, "int5").weight.numel() == 500 * 256 * 5 // 8


def _lowbit_value(fmt: str, row: torch.Tensor, col: int) -> int:
    """v = code + offset of column ``col`` of a 6- or 5-bit row, read as the layouts in bt_engine.c describe them."""
    cols, nbytes = {"int6": (128, 96), "int5": (256, 160)}[fmt]
    blk = row[(col // cols) * nbytes :][:nbytes].tolist()
    i, j = (col % cols) // 32, col % 32
    V = [blk[32 * n + j] for n in range(nbytes // 32)]
    if fmt == "int6":
        return V[i] & 63 if i < 3 else (V[0] >> 6) | (V[1] >> 6) << 2 | (V[2] >> 6) << 4
    if i < 5:
        return V[i] & 31
    if i == 5:
        return (V[0] >> 5) | ((V[1] >> 5) & 3) << 3
    if i == 6:
        return (V[2] >> 5) | ((V[3] >> 5) & 3) << 3
    return (V[4] >> 5) | (V[1] >> 7) << 3 | (V[3] >> 7) << 4


@pytest.mark.parametrize("fmt", ["int6", "int5"])
def test_low_bit_byte_order(fmt: str) -> None:
    """Blocks of 32-byte vectors: most columns in the low bits of one vector, the rest spread over the top bits."""
    kern = load_head_kernel()
    qmax, off, cols_per, nbytes = {"int6": (31, 32, 128, 96), "int5": (15, 16, 256, 160)}[fmt]
    g = torch.Generator().manual_seed(5)
    cols = 2 * cols_per + 40  # two full blocks and a padded one
    w = torch.randint(-qmax, qmax + 1, (3, cols), generator=g).float()
    w[:, 0] = float(qmax)  # scale 1 in every row
    w[1, cols_per - 29] = -float(qmax)  # extremes in the spread-out column group
    w[2, cols_per - 28] = float(qmax)
    codes, scales = kern.quantize(w, fmt)
    assert codes.shape[1] == 3 * nbytes and torch.equal(scales, torch.ones(3))
    for r in range(3):
        got = [_lowbit_value(fmt, codes[r], c) - off for c in range(3 * cols_per)]
        assert got[:cols] == w[r].long().tolist()
        assert got[cols:] == [0] * (3 * cols_per - cols)  # padding columns hold code 0
    assert codes[0, 0].item() & (2 * qmax + 1) == qmax + off  # column 0: the low bits of byte 0


def _attend(isa: str, qkv: torch.Tensor, H: int, KVH: int, hd: int, pos: int, cos: torch.Tensor, sin: torch.Tensor,
            kv_dtype: torch.dtype, max_len: int, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kern = load_head_kernel()
    qkv = qkv.clone()
    kc = torch.zeros(KVH, max_len, hd, dtype=kv_dtype)
    vc = torch.zeros(KVH, max_len, hd, dtype=kv_dtype)
    g = torch.Generator().manual_seed(11)
    kc[:, :pos] = torch.randn(KVH, pos, hd, generator=g).to(kv_dtype)
    vc[:, :pos] = torch.randn(KVH, pos, hd, generator=g).to(kv_dtype)
    out = torch.empty(H * hd)
    scores = torch.empty(max_len)
    dt = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[kv_dtype]
    with native.using(isa, threads):
        rc = kern.attend(qkv.data_ptr(), H, KVH, hd, pos, cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                         None, None, dt, max_len, out.data_ptr(), scores.data_ptr())
    assert rc == 0
    return out, kc, vc


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attend_matches_torch_and_stores_kv_exactly(kv_dtype: torch.dtype) -> None:
    H, KVH, hd, pos, max_len = 4, 2, 24, 5, 8
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn((H + 2 * KVH) * hd, generator=g)
    # values that exercise float->half rounding: ties, subnormals, overflow to inf, near 65504
    qkv[H * hd : H * hd + 8] = torch.tensor([1.0 + 2**-11, 1.0 + 3 * 2**-11, 3e-6, -6.1e-5, 7e4, 65519.0, 65520.0, 1e-9])
    cos = torch.ones(hd)
    sin = torch.zeros(hd)  # identity rotation: the stored keys are the inputs
    k_in = qkv[H * hd : (H + KVH) * hd].reshape(KVH, hd)
    v_in = qkv[(H + KVH) * hd :].reshape(KVH, hd)
    outs = []
    for isa in ISAS:
        out, kc, vc = _attend(isa, qkv, H, KVH, hd, pos, cos, sin, kv_dtype, max_len)
        assert torch.equal(kc[:, pos].view(torch.int16 if kv_dtype != torch.float32 else torch.int32),
                           k_in.to(kv_dtype).view(torch.int16 if kv_dtype != torch.float32 else torch.int32))
        assert torch.equal(vc[:, pos], v_in.to(kv_dtype))
        finite = torch.isfinite(kc.float()).all()
        if finite:  # the reference: softmax attention over positions 0..pos with GQA
            q = qkv[: H * hd].reshape(H, hd)
            k = kc[:, : pos + 1].float().repeat_interleave(H // KVH, 0)
            v = vc[:, : pos + 1].float().repeat_interleave(H // KVH, 0)
            att = torch.softmax((q[:, None, :] @ k.transpose(1, 2))[:, 0] / hd**0.5, -1)
            ref = (att[:, None, :] @ v)[:, 0].reshape(-1)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        outs.append(out)
    if len(outs) == 2:
        assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_attend_long_context_same_on_any_thread_count(kv_dtype: torch.dtype) -> None:
    """A long context goes to the thread pool in tiles of query heads: identical bits on 1 and 3 threads,
    and the torch reference (GQA with 6 query heads per KV head: one full and one short tile)."""
    H, KVH, hd, pos, max_len = 12, 2, 32, 300, 320  # 301 x 12 x 32 >= the parallel threshold
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn((H + 2 * KVH) * hd, generator=g)
    ang = torch.rand(hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    outs = [_attend(isa, qkv, H, KVH, hd, pos, cos, sin, kv_dtype, max_len, threads) for isa in ISAS for threads in (1, 3)]
    for (o1, k1, _), (o3, k3, _) in zip(outs[::2], outs[1::2]):
        assert torch.equal(o1, o3) and torch.equal(k1, k3)
    out, kc, vc = outs[-1]
    half = hd // 2
    q = qkv[: H * hd].reshape(H, hd)
    q = q * cos + torch.cat([-q[:, half:], q[:, :half]], 1) * sin  # rotate-half RoPE, as the engine
    k = kc[:, : pos + 1].float().repeat_interleave(H // KVH, 0)
    v = vc[:, : pos + 1].float().repeat_interleave(H // KVH, 0)
    att = torch.softmax((q[:, None, :] @ k.transpose(1, 2))[:, 0] / hd**0.5, -1)
    assert torch.allclose(out, (att[:, None, :] @ v)[:, 0].reshape(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pos", [0, 1, 30, 31, 32, 63, 64, 100])
def test_attend_value_blocks_at_every_boundary(pos: int) -> None:
    """Positions around the value pass's 32-row blocks (and the key pass's row pairs): the torch reference."""
    H, KVH, hd, max_len = 8, 2, 32, 128
    g = torch.Generator().manual_seed(100 + pos)
    qkv = torch.randn((H + 2 * KVH) * hd, generator=g)
    cos, sin = torch.ones(hd), torch.zeros(hd)
    for isa in ISAS:
        out, kc, vc = _attend(isa, qkv, H, KVH, hd, pos, cos, sin, torch.float16, max_len)
        q = qkv[: H * hd].reshape(H, hd)
        k = kc[:, : pos + 1].float().repeat_interleave(H // KVH, 0)
        v = vc[:, : pos + 1].float().repeat_interleave(H // KVH, 0)
        att = torch.softmax((q[:, None, :] @ k.transpose(1, 2))[:, 0] / hd**0.5, -1)
        assert torch.allclose(out, (att[:, None, :] @ v)[:, 0].reshape(-1), rtol=1e-4, atol=1e-5), isa


def test_attend_rejects_bad_arguments() -> None:
    kern = load_head_kernel()
    buf = torch.zeros(64)
    p = buf.data_ptr()
    assert kern.attend(p, 3, 2, 8, 0, p, p, p, p, None, None, 0, 4, p, p) == -1  # heads not a multiple of KV heads
    assert kern.attend(p, 2, 2, 8, 4, p, p, p, p, None, None, 0, 4, p, p) == -1  # position past the cache
    assert kern.attend(p, 2, 2, 8, 0, p, p, p, p, None, None, 3, 4, p, p) == -1  # int8 cache without scales
    assert isinstance(kern.lib.bt_head_row_bytes(7, 10), int) and kern.lib.bt_head_row_bytes(7, 10) == -2
    assert ctypes.c_int64(kern.lib.bt_head_row_bytes(1, 129)).value == 192


@pytest.mark.parametrize("isa", ISAS)
def test_int8_kv_cache_decode_matches_the_torch_path(isa: str) -> None:
    """The C decode path with an int8 cache stores the same codes and scales as the torch path and gives close logits."""
    from bittern.configs import get_config
    from bittern.engine import EngineModel
    from bittern.model import Transformer

    torch.manual_seed(0)
    model = Transformer(get_config("tiny-2b4t")).freeze("2bit").requires_grad_(False)
    em = EngineModel.from_transformer(model, head="f32")
    assert em.use_fast_path
    prompt, steps = list(range(3, 12)), [5, 9, 2, 7]
    outs, caches = [], []
    with native.using(isa, 1):
        for fast in (True, False):
            em.use_fast_path = fast
            cache = em.new_cache(1, 32, "int8")
            em.prefill(prompt, cache)
            logits = [em.decode([t], cache, [0], [len(prompt) + j]).clone() for j, t in enumerate(steps)]
            outs.append(torch.cat(logits))
            caches.append(cache)
    em.use_fast_path = True
    end = len(prompt) + len(steps)
    fast_c, torch_c = caches
    # the first decoded position sees identical inputs on both paths: codes and scales match exactly
    p0 = len(prompt)
    assert torch.equal(fast_c.k[0, 0, :, p0], torch_c.k[0, 0, :, p0])
    assert torch.allclose(fast_c.k_scale[0, 0, :, p0], torch_c.k_scale[0, 0, :, p0], rtol=1e-6, atol=0)
    assert (fast_c.k[:, 0, :, :end] != 0).any()
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3 * outs[1].abs().max().item())


@pytest.mark.parametrize("fmt", ["int8", "int6", "int5"])
def test_torch_fallback_computes_the_same(fmt: str, monkeypatch) -> None:
    """Without the native library the table keeps one int8 per code and gives identical results in torch."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(70, 200, generator=g)
    x = torch.randn(3, 200, generator=g)
    ids = torch.tensor([0, 69, 5])
    native_table = TokenTable(w, fmt)
    monkeypatch.setattr("bittern.engine.headkernel.load_head_kernel", lambda: None)
    fallback = TokenTable(w, fmt)
    assert fallback._kernel is None and fallback.weight.dtype == torch.int8
    assert torch.equal(fallback.logits(x), native_table.logits(x))
    assert torch.equal(fallback.embed(ids), native_table.embed(ids))


def test_head_bench_script_runs(tmp_path) -> None:
    """bench/head.py on a tiny table: one row per format and thread count, rates positive."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_head", Path(__file__).parents[1] / "bench" / "head.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "head.json"
    with native.using(None, native.get_threads()):  # the script sets the thread count
        assert mod.main(["--vocab", "300", "--hidden", "256", "--threads", "1,2", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["threads"]) for r in rows] == [(f, t) for f in ("int8", "int6", "int5") for t in (1, 2)]
    assert all(r["gbps"] > 0 and r["roof_gbps"] > 0 for r in rows)
    assert {r["format"]: r["bytes"] for r in rows if r["threads"] == 1} == {
        "int8": 300 * 256 + 1200, "int6": 300 * 192 + 1200, "int5": 300 * 160 + 1200}


@pytest.mark.parametrize("fmt", ["int8", "int6", "int5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_same_codes_on_every_isa_and_thread_count(fmt: str, dtype: torch.dtype) -> None:
    """The C quantiser (rows on the pool, AVX2 or scalar) gives torch's absmax codes, whatever runs it."""
    kern = load_head_kernel()
    g = torch.Generator().manual_seed(21)
    rows, cols = 4100, 45  # more rows than one release window (4096), columns not a multiple of 8
    w = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 4).to(dtype)
    w[7] = 0  # an all-zero row: the scale floor
    w[8, :6] = torch.tensor([0.5, -0.5, 2.5, -1.5, 31.0, -31.0]).to(dtype)  # ties round to even
    ref_codes, ref_scales = quantize_rows_int8(w, qmax=QMAX[fmt])
    ids = torch.arange(rows)
    want = ref_codes.float() * ref_scales[:, None]
    seen = []
    for isa in ISAS:
        for threads in (1, 2):
            with native.using(isa, threads):
                codes, scales = kern.quantize(w, fmt)
            assert torch.equal(scales, ref_scales)
            assert torch.equal(kern.rows(fmt, codes, scales, cols, ids), want)
            seen.append(codes)
    assert all(torch.equal(c, seen[0]) for c in seen)


def test_quantize_reports_a_non_finite_value_in_a_later_window() -> None:
    w = torch.randn(4200, 16)
    w[4150, 3] = float("inf")
    for isa in ISAS:
        with native.using(isa, 2), pytest.raises(ValueError, match="NaN or Inf"):
            load_head_kernel().quantize(w, "int6")
