"""Opt-in: GGUF files written by bittern, run by llama.cpp itself (llama-cpp-python), against bittern.

Why the comparisons are set up this way:

* llama.cpp multiplies TQ1_0/TQ2_0 weights with activations quantised to Q8_K: one scale per block of
  256 values, q = round(127 * x / max|x|) like ours, but per block rather than per token. With every
  linear input exactly 256 wide (hidden_size = intermediate_size = 256) a block *is* a token's row, so
  llama.cpp's arithmetic is bittern's; the tests use that shape and demand the same greedy tokens.
* upstream llama.cpp's ``bitnet`` graph gates the FFN with SiLU (1bitLLM's models); 2B4T uses ReLU².
  A relu2 model's GGUF is therefore compared with bittern running the *same weights* with SiLU, which
  shows exactly what llama.cpp computes for it.
* The KV cache is kept in F32 (llama.cpp's default is F16) so cache rounding does not blur the check.
* llama.cpp holds each gamma as the fp16 TQ block scale, so bittern runs with fp16-rounded gammas too.
  Measured (llama-cpp-python 0.3.36): logits agree to 7.6e-6 of a 25 max (llama arch) and 4.8e-7 of
  1.15 (bitnet arch); the greedy tokens are identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reference_kernels")]
llama_cpp = pytest.importorskip("llama_cpp")

from bittern.configs import get_config  # noqa: E402
from bittern.generate import generate_ids  # noqa: E402
from bittern.interop.gguf_io import save_gguf  # noqa: E402
from bittern.model import Transformer  # noqa: E402
from bittern.sampling import SamplingParams  # noqa: E402

N_NEW = 12
PROMPT = [5, 17, 101, 42, 7, 250, 3, 99]




def _model(base: str, seed: int, **kw) -> Transformer:
    cfg = get_config(base, hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2, vocab_size=300,
                     max_seq_len=64, **kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        if not cfg.tie_embeddings:  # logits well above float noise, tokens that vary
            model.embed_tokens.weight.mul_(10.0)
            model.lm_head.weight.mul_(20.0)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.freeze()


def _llama_cpp_run(path, prompt: list[int], n_new: int):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # 0 = GGML_TYPE_F32
    llm.eval(prompt)
    prompt_logits = torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)
    tokens = []
    for _ in range(n_new):
        nxt = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        tokens.append(nxt)
        llm.eval([nxt])
    return prompt_logits, tokens


def _fp16_scales(model: Transformer) -> Transformer:
    """The model as llama.cpp holds it after a TQ export: every gamma rounded to fp16 (the block scale)."""
    import copy
    twin = copy.deepcopy(model)
    for m in twin.packed_linears().values():
        m.weight_scale = m.weight_scale.half().float()
    return twin


def _bittern_run(model: Transformer, prompt: list[int], n_new: int):
    model = _fp16_scales(model)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0]
    tokens = list(generate_ids(model, prompt, SamplingParams(temperature=0.0, max_tokens=n_new)))
    return logits, tokens


@pytest.mark.parametrize("base,wtype", [("tiny", "TQ2_0"), ("tiny", "TQ1_0"), ("tiny-2b4t", "TQ2_0")])
def test_llama_cpp_greedy_tokens_match(tmp_path, base, wtype):
    kw = {"activation": "swiglu"} if base == "tiny-2b4t" else {}  # bitnet arch, run as llama.cpp runs it
    model = _model(base, seed=1, **kw)
    path = save_gguf(model, tmp_path / "m.gguf", weight_type=wtype, float_type="F32")
    ref_logits, ref_tokens = _bittern_run(model, PROMPT, N_NEW)
    cpp_logits, cpp_tokens = _llama_cpp_run(path, PROMPT, N_NEW)
    diff = (ref_logits - cpp_logits).abs().max().item()
    print(f"\n{base} {wtype}: max |logit diff| {diff:.3g} (max |logit| {ref_logits.abs().max():.3g}); "
          f"bittern {ref_tokens} llama.cpp {cpp_tokens}")
    assert cpp_tokens == ref_tokens
    assert diff < 1e-4 * ref_logits.abs().max().item()


def test_llama_cpp_runs_relu2_bitnet_with_silu(tmp_path):
    """A 2B4T-style (relu2) model exported as arch bitnet: llama.cpp's output is bittern's *SiLU* twin."""
    model = _model("tiny-2b4t", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_gguf(model, tmp_path / "m.gguf", weight_type="TQ2_0", float_type="F32")
    silu_twin = _model("tiny-2b4t", seed=2, activation="swiglu")
    relu_logits, _ = _bittern_run(model, PROMPT, 1)
    silu_logits, silu_tokens = _bittern_run(silu_twin, PROMPT, N_NEW)
    cpp_logits, cpp_tokens = _llama_cpp_run(path, PROMPT, N_NEW)
    d_silu = (silu_logits - cpp_logits).abs().max().item()
    d_relu = (relu_logits - cpp_logits).abs().max().item()
    print(f"\nrelu2 model in llama.cpp: |diff| vs SiLU twin {d_silu:.3g}, vs relu2 model {d_relu:.3g}")
    assert d_silu < 1e-4 * silu_logits.abs().max().item() < d_relu
    assert cpp_tokens == silu_tokens


def test_bittern_reads_a_file_requantised_by_llama_quantize(tmp_path):
    """llama-quantize to TQ2_0 stores token_embd/output as Q6_K: bittern dequantises those as llama.cpp
    does and reads the ternary weights exactly."""
    import gguf

    from bittern.interop.gguf_io import load_gguf

    model = _model("tiny", 0)
    f16 = save_gguf(model, tmp_path / "f16.gguf", weight_type="F16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
    out = tmp_path / "tq2.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) == 0
    types = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] not in ("F16", "F32", "TQ2_0")  # a k-quant: what the old reader refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = load_gguf(out)
    for name, m in model.packed_linears().items():
        assert torch.equal(back.packed_linears()[name].ternary.codes(), m.ternary.codes()), name
    import numpy as np

    t = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.tensor_type)))
    assert torch.equal(back.embed_tokens.weight.float(), torch.from_numpy(np.asarray(expected, dtype=np.float32)).reshape(300, 256))
    emb = model.embed_tokens.weight
    assert (back.embed_tokens.weight.float() - emb.float()).abs().max() / emb.abs().max() < 0.1  # a close copy
