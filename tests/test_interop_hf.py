"""Hugging Face interop, checked against transformers' own BitNet / LLaMA implementations on tiny random checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # transformers' BitLinear is @torch.compile'd: eager on CPU

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet quantizer requires it
from safetensors.torch import save_file  # noqa: E402
from transformers.integrations.bitnet import pack_weights  # noqa: E402

from bittern.cli import main  # noqa: E402
from bittern.errors import UsageError  # noqa: E402
from bittern.generate import generate_ids  # noqa: E402
from bittern.interop import convert, from_pretrained  # noqa: E402
from bittern.interop.hf import load_hf, load_hf_latent, pack_hf_weight, save_hf, unpack_hf_weight  # noqa: E402
from bittern.modelfile import ModelFileError, load_packed  # noqa: E402
from bittern.sampling import SamplingParams  # noqa: E402
from bittern.tokenizer import train_bpe  # noqa: E402

VOCAB = 320
LOGIT_RTOL = 1e-3  # of the largest |logit|: float32 rounding (e.g. 1/gamma vs gamma) and, rarely, one int8
#                   activation landing on the other side of a rounding boundary; a wrong code or scale is far above

pytestmark = pytest.mark.usefixtures("reference_kernels")



def _hf_config(model_type: str, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=None,
                  eos_token_id=None)
    common.update(kw)
    if model_type == "bitnet":
        return transformers.BitNetConfig(tie_word_embeddings=True, **common)
    return transformers.LlamaConfig(tie_word_embeddings=False, **common)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights with non-trivial norm gains, so every tensor matters to the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def make_checkpoint(directory: Path, model_type: str = "bitnet", storage: str = "packed", linear_class: str = "bitlinear",
                    quant: bool = True, seed: int = 0, shard: bool = False, **cfg_kw) -> Path:
    """A tiny checkpoint written the way transformers stores it (its own pack_weights for packed codes).

    storage: "packed" (uint8 + weight_scale), "ternary" (float codes + weight_scale), "latent" (float weights).
    """
    config = _hf_config(model_type, **cfg_kw)
    cls = transformers.BitNetForCausalLM if model_type == "bitnet" else transformers.LlamaForCausalLM
    model = cls(config)
    _randomise(model, seed)
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "_proj." in key and storage != "latent":
            w = value.float()
            gamma = w.abs().mean().clamp(min=1e-5)
            codes = (w / gamma).round().clamp(-1, 1)
            stored_scale = 1.0 / gamma if linear_class == "bitlinear" else gamma
            state[key] = pack_weights(codes.clone()) if storage == "packed" else codes.contiguous()
            state[key.replace(".weight", ".weight_scale")] = stored_scale.reshape(1).float()
        else:
            state[key] = value.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    if shard:
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        weight_map = {}
        for fname, ks in halves.items():
            save_file({k: state[k] for k in ks}, str(directory / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in ks})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = [cls.__name__]
    if quant:
        cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                      "quantization_mode": "online" if storage == "latent" else "offline"}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def hf_reference(directory: Path):
    cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(str(directory), dtype=torch.float32).eval()


def _ids(seed: int = 1, n: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy_hf(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _greedy_bittern(model, ids: torch.Tensor, n: int) -> list[int]:
    return list(generate_ids(model, ids[0].tolist(), SamplingParams(temperature=0.0, max_tokens=n)))


def _assert_matches(ours, ref, ids=None) -> None:
    ids = _ids() if ids is None else ids
    with torch.no_grad():
        a = ours(ids)
        b = ref(ids).logits.float()
    assert b.abs().max() > 0.5  # a real signal, not near-zero logits
    diff = (a - b).abs().max().item()
    assert diff < LOGIT_RTOL * b.abs().max().item(), f"max |logit diff| {diff}"
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert _greedy_bittern(ours, ids, 8) == _greedy_hf(ref, ids, 8)


def test_hf_packing_matches_transformers():
    codes = torch.randint(-1, 2, (12, 7), dtype=torch.int8)
    ours = pack_hf_weight(codes)
    theirs = pack_weights(codes.float().clone())
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_hf_weight(ours), codes)


@pytest.mark.parametrize("linear_class,storage", [("bitlinear", "packed"), ("autobitlinear", "packed"),
                                                  ("autobitlinear", "ternary")])
def test_bitnet_checkpoint_matches_transformers(tmp_path, linear_class, storage):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet", storage, linear_class)
    ref = hf_reference(d)
    assert type(ref).__name__ == "BitNetForCausalLM"
    ours = load_hf(d)
    assert ours.config.subln and ours.config.activation == "relu2" and ours.config.tie_embeddings
    assert ours.is_packed
    _assert_matches(ours, ref)


def test_scale_convention_matters(tmp_path):
    """Reading a 'bitlinear' (1/gamma) file as 'autobitlinear' must change the result: the config decides."""
    d = make_checkpoint(tmp_path / "ckpt", "bitnet", "packed", "bitlinear")
    ours = load_hf(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["linear_class"] = "autobitlinear"
    (d / "config.json").write_text(json.dumps(cfg))
    wrong = load_hf(d)
    q = "layers.0.self_attn.q_proj"
    g1, g2 = float(ours.get_submodule(q).weight_scale), float(wrong.get_submodule(q).weight_scale)
    assert abs(g1 * g2 - 1.0) < 1e-6 and abs(g1 - g2) > 1e-3


def test_llama_with_bitnet_quant_config_matches_transformers(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", "llama", "packed", "bitlinear")
    ref = hf_reference(d)
    assert type(ref).__name__ == "LlamaForCausalLM"
    ours = load_hf(d)
    assert not ours.config.subln and ours.config.activation == "swiglu" and not ours.config.tie_embeddings
    _assert_matches(ours, ref)


def test_latent_llama_checkpoint_quantised_at_load(tmp_path):
    """1bitLLM-style: fp latent weights, no quantization_config. Reference: transformers' online AutoBitLinear
    (its fake-quant on the same latent weights) and our own fake-quant model."""
    d = make_checkpoint(tmp_path / "ckpt", "llama", "latent", "autobitlinear", quant=True)
    ref = hf_reference(d)  # quantization_mode online: WeightQuant + ActQuant on the latent weights
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(d)
    fake = load_hf_latent(d).eval()
    ids = _ids(3)
    with torch.no_grad():
        a, f = ours(ids), fake(ids)
    assert (a - f).abs().max().item() < LOGIT_RTOL * f.abs().max().item()
    # AutoBitLinear dequantises activations before the matmul (a different float order): slightly looser
    with torch.no_grad():
        b = ref(ids).logits
    assert (a - b).abs().max().item() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_1bitllm_subnorm_names(tmp_path):
    """1bitLLM names its sub-norms inner_attn_ln / ffn_layernorm; they load as attn_sub_norm / ffn_sub_norm."""
    d = make_checkpoint(tmp_path / "ckpt", "bitnet", "latent", quant=False)
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    renamed = {k.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln").replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm"): v
               for k, v in state.items()}
    save_file(renamed, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", hidden_act="silu", architectures=["BitnetForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(d)
    assert ours.config.subln and ours.config.activation == "swiglu"
    w = ours.get_submodule("layers.1.self_attn.attn_sub_norm").weight
    assert torch.equal(w, state["model.layers.1.self_attn.attn_sub_norm.weight"])


def test_sharded_checkpoint_equals_single(tmp_path):
    single = load_hf(make_checkpoint(tmp_path / "a", "bitnet", seed=5))
    sharded = load_hf(make_checkpoint(tmp_path / "b", "bitnet", seed=5, shard=True))
    ids = _ids(4)
    with torch.no_grad():
        assert torch.equal(single(ids), sharded(ids))


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_export_loads_in_transformers_and_back(tmp_path, linear_class):
    src = load_hf(make_checkpoint(tmp_path / "src", "bitnet", seed=7))
    out = save_hf(src, tmp_path / "out", dtype="float32", linear_class=linear_class)
    ref = hf_reference(out)
    assert type(ref).__name__ == "BitNetForCausalLM"
    _assert_matches(src, ref)
    back = load_hf(out)
    for name, m in src.packed_linears().items():
        m2 = back.get_submodule(name)
        assert torch.equal(m.ternary.codes(), m2.ternary.codes())
        g, g2 = float(m.weight_scale), float(m2.weight_scale)
        if linear_class == "autobitlinear":
            assert g == g2
        else:
            assert abs(g - g2) <= 2 * abs(torch.finfo(torch.float32).eps * g)


def test_export_llama_shape_model(tmp_path):
    from bittern.configs import get_config
    from bittern.model import Transformer
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=VOCAB)).freeze()
    out = save_hf(model, tmp_path / "out", dtype="float32")
    ref = hf_reference(out)
    assert type(ref).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ids = _ids(2)
        a, b = model(ids), ref(ids).logits
    assert (a - b).abs().max().item() < LOGIT_RTOL * b.abs().max().item()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_tokenizer_and_chat_template(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet")
    tok = train_bpe(["hello world, the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save(d)
    model, tokenizer, fmt = from_pretrained(d)
    assert fmt == "hf" and tokenizer is not None
    assert tokenizer.chat_template == tok.chat_template
    assert tokenizer.encode("hello world") == tok.encode("hello world")
    out = convert(d, tmp_path / "packed")
    assert (out / "tokenizer.json").is_file()
    _, tok2, fmt2 = from_pretrained(out)
    assert fmt2 == "bittern" and tok2.encode("quick fox") == tok.encode("quick fox")


def test_cli_convert_hf_to_bittern(tmp_path, capsys):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet", seed=9)
    assert main(["convert", str(d), str(tmp_path / "packed"), "--dtype", "float32"]) == 0
    packed = load_packed(tmp_path / "packed")
    direct = load_hf(d)
    ids = _ids(6)
    with torch.no_grad():
        assert torch.equal(packed(ids), direct(ids))
    assert main(["convert", str(d), str(tmp_path / "missing" / "x"), "--to", "hf", "--dtype", "float32"]) == 0
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "y")]) == 2
    assert "error" in capsys.readouterr().err


def test_repo_id_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UsageError, match="hf download microsoft/bitnet-b1.58-2B-4T"):
        from_pretrained("microsoft/bitnet-b1.58-2B-4T")


# ----------------------------------------------------------------------------- bad files


def test_config_that_does_not_match_tensors(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="gate_proj"):
        load_hf(d)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 128, 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="not in the config"):
        load_hf(d)


def test_truncated_safetensors(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated"):
        load_hf(d)
    assert main(["convert", str(d), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_corrupt_packed_codes_and_scales(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet")
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    bad = dict(state)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.full_like(state["model.layers.0.mlp.up_proj.weight"], 255)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(ModelFileError, match="holds 3"):
        load_hf(d)
    bad = dict(state)
    bad["model.layers.0.mlp.up_proj.weight_scale"] = torch.tensor([float("nan")])
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(ModelFileError, match="weight_scale"):
        load_hf(d)


def test_unsupported_configs(tmp_path):
    d = make_checkpoint(tmp_path / "ckpt", "bitnet")
    cfg = json.loads((d / "config.json").read_text())
    for change, msg in [({"model_type": "gpt2"}, "model_type"),
                        ({"quantization_config": {"quant_method": "gptq"}}, "quantization method"),
                        ({"quantization_config": {"quant_method": "bitnet", "use_rms_norm": True}}, "use_rms_norm"),
                        ({"hidden_act": "gelu"}, "hidden_act")]:
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ModelFileError, match=msg):
            load_hf(d)


def test_special_token_ids_and_norm_eps_defaults_follow_transformers(tmp_path) -> None:
    """BOS / EOS ids of the source config survive bittern -> HF without a tokenizer (not transformers'
    128000 / 128001 defaults, outside this vocabulary); a llama config without rms_norm_eps means 1e-6,
    as LlamaConfig says."""
    from bittern.interop import convert
    from bittern.interop.hf import hf_model_config

    src = make_checkpoint(tmp_path / "src", bos_token_id=0, eos_token_id=3)
    convert(src, tmp_path / "bt")
    convert(tmp_path / "bt", tmp_path / "hf", to="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 3)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id == 3
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 128, "vocab_size": 100}
    assert hf_model_config(base).norm_eps == 1e-6
    assert hf_model_config({**base, "model_type": "bitnet"}).norm_eps == 1e-5
    assert hf_model_config({**base, "rms_norm_eps": 3e-6}).norm_eps == 3e-6


def test_convert_stops_on_a_damaged_tokenizer_and_a_malformed_quantization_config(tmp_path) -> None:
    from bittern.interop import convert
    from bittern.modelfile import ModelFileError

    src = make_checkpoint(tmp_path / "src")
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="tokenizer cannot be read"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "tokenizer.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": "bitnet"}))
    with pytest.raises(ModelFileError, match="quantization_config must be an object"):
        convert(src, tmp_path / "out")
