"""Triton kernels under the Triton interpreter (CPU tensors): bit-exact inference, fused training.

Every test here switches ``TRITON_INTERPRET=1`` on for its own duration (so other test modules keep
seeing the Triton backend as unavailable on a machine without GPU); the kernels bind interpreter
mode when ``bittern.kernels.triton_kernels`` is first imported, which happens inside these tests.
Shapes are small and ragged (not multiples of any block size); data is random and never all zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from bittern.configs import get_config
from bittern.kernels.reference import ReferenceBackend
from bittern.layers import BitLinear
from bittern.model import KVCache, Transformer
from bittern.pack import LAYOUTS, TernaryWeight, pack_2bit
from bittern.quant import fake_quant_activation, fake_quant_weight, quantize_activation, weight_scale

REF = ReferenceBackend()


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _interpreter_usable() -> bool:
    """False when ``triton.language`` was imported in compiled mode (Triton fixes the mode of its own
    library functions at import), in which case interpreted kernels cannot run in this process."""
    if "triton.language" not in sys.modules:
        return True  # it will be imported under TRITON_INTERPRET=1 (set by _interpret)
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.max, InterpretedFunction)


@pytest.fixture(scope="module", autouse=True)
def _forget_interpreted_kernels():
    """After this module, drop the interpreted kernels so later CUDA users get compiled ones."""
    yield
    backend = sys.modules.get("bittern.kernels.triton_backend")
    if backend is not None:
        backend._KERNELS = None
    sys.modules.pop("bittern.kernels.triton_kernels", None)
    package = sys.modules.get("bittern.kernels")
    if package is not None and hasattr(package, "triton_kernels"):
        delattr(package, "triton_kernels")


@pytest.fixture
def tb():
    """The Triton backend module with its kernels defined under the interpreter."""
    pytest.importorskip("triton")
    if not _interpreter_usable():
        pytest.skip("triton was imported without TRITON_INTERPRET earlier in this process "
                    "(torch.optim does that); test_interpreted_kernels_in_subprocess runs this test")
    from bittern.kernels import triton_backend

    kern = triton_backend._kernels()
    if not kern.INTERPRET:  # imported earlier without the interpreter: define the kernels again
        triton_backend._KERNELS = importlib.reload(kern)
    return triton_backend


def _weight(n: int, k: int, seed: int, layout: str = "2bit") -> TernaryWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    codes[0, 0] = 1  # never all zero
    gamma = torch.rand((), generator=g) * 0.1 + 0.003
    return TernaryWeight.from_codes(codes, gamma, layout)


def _x(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g).mul(4).add(0.01)
    return x.to(dtype)


# ----------------------------------------------------------------------------- layout (no triton)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 37), (16, 64), (3, 65), (7, 200)])
def test_layout_roundtrip_and_conversion(n, k):
    w = _weight(n, k, seed=n * 100 + k)
    k64 = w.to_layout("2bit-k64")
    assert k64.packed.dtype == torch.uint8
    assert tuple(k64.packed.shape) == (n, LAYOUTS["2bit-k64"].packed_cols(k)) and k64.packed.shape[1] % 16 == 0
    assert torch.equal(k64.codes(), w.codes())
    assert torch.equal(k64.to_layout("1.6bit").to_layout("2bit-k64").packed, k64.packed)


def test_layout_is_2bit_padded_to_64_codes():
    codes = _weight(6, 100, seed=3).codes()
    k64 = TernaryWeight.from_codes(codes, 1.0, "2bit-k64").packed
    padded = torch.nn.functional.pad(codes, (0, 28))
    assert torch.equal(k64, pack_2bit(padded))
    assert (k64[:, 25:] == 0x55).all()  # padding: code 0, stored 1 in every field
    ones = TernaryWeight.from_codes(torch.ones(1, 64, dtype=torch.int8), 1.0, "2bit-k64").packed
    assert ones.tolist() == [[0xAA] * 16]  # stored code 2 in every field, lowest bits first


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("m,n,k,dtype", [
    (1, 37, 100, torch.float32), (1, 1, 17, torch.float32), (2, 70, 300, torch.bfloat16),
    (3, 19, 1, torch.float32), (4, 130, 45, torch.float16),
])
def test_gemv_bit_exact(tb, m, n, k, dtype):
    w = _weight(n, k, seed=m + n + k)
    x = _x((m, k), seed=k, dtype=dtype)
    y = tb.BACKEND.linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.equal(y, REF.linear(x, w))


@pytest.mark.parametrize("shape,n,dtype", [
    ((5, 100), 37, torch.float32), ((19, 130), 70, torch.bfloat16), ((2, 20, 33), 17, torch.float32),
    ((40, 16), 90, torch.float16),
])
def test_gemm_bit_exact(tb, shape, n, dtype):
    k = shape[-1]
    w = _weight(n, k, seed=n * k)
    x = _x(shape, seed=n, dtype=dtype)
    y = tb.BACKEND.linear(x, w)
    assert y.shape == shape[:-1] + (n,)
    assert torch.equal(y, REF.linear(x, w))


def _ties(m: int, k: int) -> torch.Tensor:
    # a row whose absmax is 127 has s == 1 exactly (and 254 gives s == 0.5): x * s lands on .5 ties
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, -126.5, 4.5, 0.49999997])
    x = vals.repeat(m, (k + len(vals) - 1) // len(vals))[:, :k].clone()
    x[:, 0] = 127.0
    x[1::2] *= 2.0  # odd rows: absmax 254, s = 0.5
    return x


def test_round_half_to_even_ties(tb):
    x = _ties(6, 40)
    q, s = quantize_activation(x)
    assert (s.view(-1) == torch.tensor([1.0, 0.5] * 3)).all()
    kq, ks, kqs = tb._kernels().act_quant(x, 48)
    assert torch.equal(kq[:, :40], q) and (kq[:, 40:] == 0).all() and torch.equal(ks, s.view(-1))
    assert torch.equal(kqs, q.int().sum(-1, dtype=torch.int32))
    # the GEMV's order: four planes j of Kp/16 words p, byte m of word p holding q[16p + 4m + j]
    perm, perm_s, perm_qsum = tb._kernels().act_quant(x, 48, permute=True)
    assert torch.equal(perm.view(6, 4, 3, 4).permute(0, 2, 3, 1).reshape(6, 48), kq)
    assert torch.equal(perm_s, ks) and torch.equal(perm_qsum, kqs)
    # row 0 is [127, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, -126.5, 4.5, 0.49999997, 0.5, ...]
    assert kq[0, 1:13].tolist() == [2, 2, 0, -2, -2, 4, -4, 126, -126, 4, 0, 0]
    w = _weight(23, 40, seed=5)
    assert torch.equal(tb.BACKEND.linear(x[:1], w), REF.linear(x[:1], w))   # GEMV path
    assert torch.equal(tb.BACKEND.linear(x[:3], w), REF.linear(x[:3], w))   # GEMV, several rows
    assert torch.equal(tb.BACKEND.linear(x, w), REF.linear(x, w))           # GEMM path


def test_edge_rows_zero_and_tiny(tb):
    x = _x((6, 50), seed=9)
    x[1] = 0.0           # absmax floored at 1e-5
    x[2] *= 1e-8         # below the floor
    x[3] *= 1e4          # large
    w = _weight(29, 50, seed=11)
    assert torch.equal(tb.BACKEND.linear(x, w), REF.linear(x, w))
    assert torch.equal(tb.BACKEND.linear(x[1:3], w), REF.linear(x[1:3], w))


def test_backend_protocol(tb, monkeypatch):
    from bittern.kernels import get_backend

    assert tb.BACKEND.name == "triton" and tb.BACKEND.available()
    assert get_backend("triton") is not None
    assert get_backend(None, "cpu").name != "triton"  # auto never picks Triton for CPU tensors
    w16 = _weight(11, 21, seed=2, layout="1.6bit")
    prepared = tb.BACKEND.prepare(w16)
    assert prepared.layout == tb.LAYOUT and torch.equal(prepared.codes(), w16.codes())
    assert tb.BACKEND.prepare(prepared) is prepared
    w2 = _weight(9, 128, seed=6)  # "2bit" with whole 16-byte rows: relabelled, not copied
    assert tb.BACKEND.prepare(w2).packed is w2.packed
    x = _x((2, 21), seed=4)
    assert torch.equal(tb.BACKEND.linear(x, w16), REF.linear(x, w16))
    with pytest.raises(ValueError):
        tb.BACKEND.linear(_x((2, 20), seed=4), w16)
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        assert not tb.BACKEND.available()
        with pytest.raises(ImportError):
            from bittern.kernels.triton_backend import fused_bitlinear  # noqa: F401


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    path = os.path.join(os.path.dirname(importlib.import_module("bittern.kernels").__file__), "triton_backend.py")
    spec = importlib.util.spec_from_file_location("bittern.kernels._triton_backend_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.HAVE_TRITON and not mod.BACKEND.available()
    with pytest.raises(AttributeError):
        mod.fused_bitlinear


def test_tiny_model_logits_match_reference(tb):
    from bittern.gpu import prepare_model

    torch.manual_seed(0)
    model = prepare_model(Transformer(get_config("tiny-2b4t")).freeze(), "triton")
    assert {layer.layout for layer in model.packed_linears().values()} == {"2bit-k64"}
    tokens = torch.randint(0, model.config.vocab_size, (1, 6))

    def run(backend: str) -> torch.Tensor:
        for layer in model.packed_linears().values():
            layer.backend = backend
        cache = KVCache(model.config, 1, 16)
        logits = [model(tokens[:, :5], cache, 0)[:, -1]]            # prefill: GEMM
        logits.append(model(tokens[:, 5:], cache, 5)[:, -1])         # decode: GEMV
        return torch.stack(logits)

    assert torch.equal(run("triton"), run("reference"))


# ----------------------------------------------------------------------------- training


def _exact_forward(x, norm, weight):
    h = norm(x) if norm is not None else x
    return F.linear(fake_quant_activation(h), fake_quant_weight(weight).to(h.dtype))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = b.float().abs().max().clamp(min=1e-6)
    err = (a.float() - b.float()).abs().max() / scale
    assert err <= rtol, f"relative error {float(err):.3g} > {rtol}"


@pytest.mark.parametrize("norm,dtype", [(True, torch.float32), (False, torch.float32),
                                        (True, torch.bfloat16), (False, torch.bfloat16)])
def test_fused_bitlinear_matches_autograd(tb, norm, dtype):
    from bittern.kernels.triton_backend import fused_bitlinear

    torch.manual_seed(1)
    layer = BitLinear(70, 37, norm=norm)
    if norm:
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
    x = _x((2, 9, 70), seed=3, dtype=dtype).requires_grad_(True)
    nw = layer.norm.weight if norm else None
    eps = layer.norm.eps if norm else 0.0
    y = fused_bitlinear(x, nw, layer.weight, eps)
    assert y.dtype == dtype and y.shape == (2, 9, 37)
    if not (norm and dtype == torch.float32):  # fp32 RMSNorm: rsqrt and sum order may differ by an ulp
        assert torch.equal(y, _exact_forward(x, layer.norm, layer.weight))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(gy)
    got = [x.grad.clone(), layer.weight.grad.clone()] + ([layer.norm.weight.grad.clone()] if norm else [])
    x.grad = None
    layer.zero_grad()
    want_y = BitLinear.forward(layer, x)  # CPU tensors: the unfused autograd path
    want_y.backward(gy)
    want = [x.grad, layer.weight.grad] + ([layer.norm.weight.grad] if norm else [])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    _close(y, want_y, tol)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        _close(g, w, tol)


def test_fused_bitlinear_autocast_and_partial_grads(tb):
    from bittern.kernels.triton_backend import fused_bitlinear

    torch.manual_seed(2)
    layer = BitLinear(48, 21, norm=True)
    x = _x((13, 48), seed=8).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_bitlinear(x, layer.norm.weight, layer.weight, layer.norm.eps)
        want_y = BitLinear.forward(layer, x)
    assert y.dtype == want_y.dtype == torch.bfloat16
    _close(y, want_y, 2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    # weight only (frozen input): no input gradients are computed
    layer.zero_grad()
    x2 = _x((5, 48), seed=9)
    fused_bitlinear(x2, layer.norm.weight.detach(), layer.weight, layer.norm.eps).sum().backward()
    gamma = weight_scale(layer.weight)
    assert layer.weight.grad is not None and float(gamma) > 0


# ----------------------------------------------------------------------------- decode helpers (bittern.gpu)


@pytest.mark.parametrize("name", ["tiny-2b4t", "tiny-faq"])
def test_static_decoder_matches_forward(name):
    from bittern.gpu import StaticDecoder

    torch.manual_seed(3)
    model = Transformer(get_config(name)).freeze()
    for layer in model.packed_linears().values():
        layer.backend = "reference"
    tokens = torch.randint(0, model.config.vocab_size, (2, 7))
    dec = StaticDecoder(model, batch_size=2, max_len=16)
    cache = KVCache(model.config, 2, 16)
    assert torch.equal(dec.prefill(tokens[:, :4]), model(tokens[:, :4], cache, 0)[:, -1])
    for t in range(4, 7):
        got = dec.step(tokens[:, t:t + 1], torch.tensor(t))
        want = model(tokens[:, t:t + 1], cache, t)[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_graph_decode_refuses_without_cuda():
    from bittern.gpu import cuda_graph_decode

    with pytest.raises(RuntimeError, match="CUDA"):
        cuda_graph_decode(lambda t: t, torch.zeros(1))


# ----------------------------------------------------------------------------- GPU compilation (no GPU needed)

_COMPILE_SCRIPT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bittern.kernels import triton_kernels as k

def build(fn, types, consts, arch, **opts):
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=opts).asm["ptx"]

i32 = "i32"
for arch in (80, 90):
    cfg = k.gemv_config(1, 2560, 160)
    ptx = build(k._gemv_kernel, dict(q_ptr="*i32", qsum_ptr="*i32", s_ptr="*fp32", w_ptr="*i32", y_ptr="*fp32",
                gamma_ptr="*fp32", N=i32, Kw4=i32, stride_qm=i32, stride_ym=i32),
                dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_P=cfg["BLOCK_P"], ASM=True), arch, num_warps=cfg["num_warps"])
    assert "dp4a.s32.s32" in ptx
    for permute in (True, False):
        ptx = build(k._act_quant_kernel, dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", qsum_ptr="*i32", K=i32,
                    Kp=i32, stride_xm=i32, stride_qm=i32), dict(PERMUTE=permute, BLOCK_K=1024, INTERP=False), arch)
        assert "cvt.rni.f32.f32" in ptx and "div.rn.f32" in ptx
    for m in (8, 64, 512):
        cfg = dict(k.gemm_config(m, 2560, 2560))
        opts = {o: cfg.pop(o) for o in ("num_warps", "num_stages")}
        ptx = build(k._gemm_kernel, dict(q_ptr="*i8", s_ptr="*fp32", w_ptr="*i32", y_ptr="*fp32", gamma_ptr="*fp32",
                    M=i32, N=i32, Kw4=i32, stride_qm=i32, stride_ym=i32), cfg, arch, **opts)
        assert "mma" in ptx and ".s8" in ptx
    build(k._norm_act_quant_fwd_kernel, dict(x_ptr="*fp32", nw_ptr="*fp32", xq_ptr="*bf16", rstd_ptr="*fp32",
          K=i32, stride_xm=i32, stride_om=i32, eps="fp32"), dict(HAS_NORM=True, BLOCK_K=1024, INTERP=False), arch)
    build(k._weight_fake_quant_kernel, dict(w_ptr="*fp32", gamma_ptr="*fp32", out_ptr="*bf16", numel=i32),
          dict(BLOCK=4096, INTERP=False), arch, num_warps=8)
    build(k._norm_bwd_kernel, dict(x_ptr="*fp32", nw_ptr="*fp32", dh_ptr="*bf16", rstd_ptr="*fp32", dx_ptr="*fp32",
          dnw_ptr="*fp32", M=i32, K=i32, stride_xm=i32, stride_hm=i32, stride_dm=i32),
          dict(BLOCK_M=16, BLOCK_K=128, INTERP=False), arch)
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_nvidia_gpus():
    """Every kernel compiles to PTX and cubin for sm_80 and sm_90 (LLVM + Triton's bundled ptxas)."""
    pytest.importorskip("triton")
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_interpreted_kernels_in_subprocess():
    """When another test module imported triton first (so the tests above were skipped here), run
    this file again in a fresh process with the interpreter switched on from the start."""
    pytest.importorskip("triton")
    if _interpreter_usable():
        pytest.skip("the interpreted kernel tests ran in this process")
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow",
           "-k", "not test_interpreted_kernels_in_subprocess"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
