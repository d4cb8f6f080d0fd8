"""HF ``rope_scaling`` ("linear", "llama3") survives conversion: a converted bittern directory, reopened with
``load_packed`` and with the engine, gives transformers' logits; HF and GGUF exports carry the scaling."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # transformers' BitLinear is @torch.compile'd: eager on CPU

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet quantizer requires it
pytest.importorskip("gguf")

from bittern.engine import EngineModel  # noqa: E402
from bittern.interop import convert, from_pretrained  # noqa: E402
from bittern.interop.gguf_io import GGUFFile, load_gguf, save_gguf  # noqa: E402
from bittern.model import Transformer, config_rope_tables, rope_tables  # noqa: E402
from bittern.modelfile import ModelFileError, load_packed, read_config  # noqa: E402

VOCAB = 320
N_TOKENS = 24
LATENT_ATOL = 1e-3  # as tests/test_interop_hf.py for latent weights quantised at load vs transformers' AutoBitLinear
LOGIT_RTOL = 1e-3  # as tests/test_interop_hf.py for packed checkpoints (of the largest |logit|)
SCALINGS = {
    # original context 32 and head_dim 16: one RoPE frequency kept, one smoothed, six divided by the factor
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


pytestmark = pytest.mark.usefixtures("reference_kernels")


def make_scaled_llama(directory: Path, scaling: dict, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM with ``rope_scaling``, saved by save_pretrained (latent fp32 weights),
    marked as a BitNet model quantised on the fly (transformers' AutoBitLinear, the 1bitLLM arithmetic)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, rope_scaling=dict(scaling),
                                      bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else 0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(directory))
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": "online"}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, N_TOKENS), generator=torch.Generator().manual_seed(1))


def _reference_logits(directory: Path) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(_ids()).logits[0].float()


def _engine_logits(directory: Path) -> torch.Tensor:
    engine = EngineModel.load(directory, head="f32")
    cache = engine.new_cache(1, max_len=64, dtype="f32")
    return engine.prefill(_ids()[0], cache, all_logits=True).float().clone()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = LATENT_ATOL) -> None:
    assert b.abs().max() > 0.5
    diff = (a - b).abs().max().item()
    assert diff < atol, f"max |logit diff| {diff}"
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def converted(request, tmp_path_factory):
    """(kind, HF checkpoint, converted bittern dir, transformers' logits)."""
    root = tmp_path_factory.mktemp(f"rope-{request.param}")
    hf_dir = make_scaled_llama(root / "hf", SCALINGS[request.param])
    out = convert(hf_dir, root / "bittern", to="bittern", dtype="float32")
    return request.param, hf_dir, out, _reference_logits(hf_dir)


def test_scaling_matters(converted):
    """The same weights without the scaling are far off: the checks below can fail."""
    kind, _, out, ref = converted
    model = load_packed(out)
    plain = Transformer(model.config.replace(extra={}))
    assert not torch.allclose(plain.rope_cos, model.rope_cos)
    model.rope_cos, model.rope_sin = rope_tables(model.config.head_dim, model.config.max_seq_len,
                                                 model.config.rope_theta)
    with torch.no_grad():
        wrong = model(_ids())[0]
    assert (wrong - ref).abs().max().item() > 50 * LATENT_ATOL


def test_reopened_bittern_dir_matches_transformers(converted):
    kind, _, out, ref = converted
    stored = read_config(out)["model"].extra["rope_scaling"]
    assert stored["rope_type"] == kind and stored["factor"] == SCALINGS[kind]["factor"]
    model = load_packed(out)
    with torch.no_grad():
        _close(model(_ids())[0], ref)


def test_engine_matches_transformers(converted):
    kind, _, out, ref = converted
    _close(_engine_logits(out), ref)


def test_hf_import_and_streamed_convert_agree(converted):
    kind, hf_dir, out, ref = converted
    direct = from_pretrained(hf_dir).model
    assert torch.equal(direct.rope_cos, load_packed(out).rope_cos)
    with torch.no_grad():
        _close(direct(_ids())[0], ref)


def test_hf_export_keeps_scaling(converted, tmp_path):
    """bittern -> HF (packed, BitNet quantization_config): transformers applies the same scaling."""
    kind, _, out, _ = converted
    hf_out = convert(out, tmp_path / "hf-out", to="hf", dtype="float32", hf_linear_class="autobitlinear")
    cfg = json.loads((hf_out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == kind
    ref = _reference_logits(hf_out)
    with torch.no_grad():
        ours = load_packed(out)(_ids())[0]
    assert (ours - ref).abs().max().item() < LOGIT_RTOL * ref.abs().max().item()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_gguf_export_writes_llama_cpp_rope_scaling(converted, tmp_path):
    kind, _, out, _ = converted
    model = load_packed(out)
    path = save_gguf(model, tmp_path / "m.gguf", weight_type="F16", float_type="F32")
    g = GGUFFile(path)
    if kind == "linear":
        assert g.field("llama.rope.scaling.type") == "linear"
        assert g.field("llama.rope.scaling.factor") == pytest.approx(4.0)
        assert "rope_freqs.weight" not in g.tensors
    else:
        assert g.field("llama.rope.scaling.type") is None
        freqs, _ = g.array("rope_freqs.weight")
        # llama.cpp divides frequency i by rope_freqs[i]; the factors as its Llama-3 converter defines them
        s = SCALINGS["llama3"]
        hd, theta = model.config.head_dim, model.config.rope_theta
        expected = []
        for i in range(0, hd, 2):
            wavelen = 2 * math.pi * theta ** (i / hd)
            lo, hi = s["original_max_position_embeddings"] / s["low_freq_factor"], \
                s["original_max_position_embeddings"] / s["high_freq_factor"]
            if wavelen < hi:
                expected.append(1.0)
            elif wavelen > lo:
                expected.append(s["factor"])
            else:
                smooth = (s["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
                expected.append(1.0 / ((1 - smooth) / s["factor"] + smooth))
        np.testing.assert_allclose(freqs.reshape(-1), expected, rtol=1e-6)
        assert 1.0 in expected and s["factor"] in expected and len(set(expected)) > 2
    back = load_gguf(path)
    assert back.config.extra["rope_scaling"]["rope_type"] == kind
    assert torch.equal(back.rope_cos, model.rope_cos)
    with torch.no_grad():
        assert torch.allclose(back(_ids()), model(_ids()), atol=1e-4)


def test_streamed_hf_to_gguf(converted, tmp_path):
    kind, hf_dir, out, _ = converted
    path = convert(hf_dir, tmp_path / "m.gguf", to="gguf", weight_type="F16", dtype="float32")
    back = load_gguf(path)
    assert back.config.extra["rope_scaling"]["rope_type"] == kind
    with torch.no_grad():
        assert torch.allclose(back(_ids()), load_packed(out)(_ids()), atol=1e-4)


def test_bitnet_arch_llama3_scaling_warns(tmp_path):
    from bittern.configs import get_config
    cfg = get_config("tiny-2b4t", activation="swiglu", hidden_size=64, intermediate_size=128, num_heads=4,
                     num_kv_heads=2, vocab_size=VOCAB, max_seq_len=64)
    model = Transformer(cfg.replace(extra={"rope_scaling": SCALINGS["llama3"]})).freeze()
    with pytest.warns(UserWarning, match="rope_freqs"):
        save_gguf(model, tmp_path / "m.gguf", weight_type="F16")
    assert torch.equal(load_gguf(tmp_path / "m.gguf").rope_cos, config_rope_tables(model.config)[0])


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "original_max_position_embeddings"),
    ({"rope_type": "linear", "factor": -1.0}, "positive"),
])
def test_bad_rope_scaling_is_a_clear_error(tmp_path, scaling, match):
    d = make_scaled_llama(tmp_path / "hf", SCALINGS["linear"])
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = scaling
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=match):
        convert(d, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_no_warning_for_unscaled_export(tmp_path):
    from bittern.configs import get_config
    cfg = get_config("tiny", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                     max_seq_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save_gguf(Transformer(cfg).freeze(), tmp_path / "m.gguf", weight_type="F16")
    assert "rope_freqs.weight" not in GGUFFile(path).tensors


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_llama_cpp_applies_the_rope_scaling(tmp_path, kind):
    """Opt-in: llama.cpp runs the exported GGUF with the scaled RoPE (rope_freqs / rope.scaling keys).

    Rows exactly 256 wide make llama.cpp's Q8_K activation blocks whole token rows, so its arithmetic is
    bittern's (see tests/test_interop_llamacpp.py); the unscaled twin shows the scaling is really applied.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    from bittern.configs import get_config
    cfg = get_config("tiny", hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2, vocab_size=300,
                     max_seq_len=64, extra={"rope_scaling": SCALINGS[kind]})
    torch.manual_seed(3)
    model = Transformer(cfg)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(10.0)
        model.lm_head.weight.mul_(20.0)
    model = model.freeze()
    for m in model.packed_linears().values():  # llama.cpp holds fp16 block scales
        m.weight_scale = m.weight_scale.half().float()
    path = save_gguf(model, tmp_path / "m.gguf", weight_type="TQ2_0", float_type="F32")
    prompt = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(prompt)
    cpp = torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
        model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        plain = model(torch.tensor([prompt]))[0]
    diff, d_plain = (ours - cpp).abs().max().item(), (plain - cpp).abs().max().item()
    print(f"\n{kind}: llama.cpp vs bittern max |logit diff| {diff:.3g}, vs unscaled twin {d_plain:.3g} "
          f"(max |logit| {ours.abs().max():.3g})")
    assert diff < 1e-4 * ours.abs().max().item() < d_plain
