"""FP LLaMA (saved by transformers) → BitNet b1.58 by fine-tuning with the quantisation ramp; pack; CLI verbs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bittern.cli import main
from bittern.demo import demo_text
from bittern.modelfile import load_packed
from bittern.tokenizer import train_bpe
from bittern.train import default_model_path
from bittern.train.convert import finetune_ternary
from bittern.train.data import eval_windows, load_split, prepare_shards
from bittern.train.export import load_run_model
from bittern.train.hf_llama import load_llama_checkpoint
from bittern.train.metrics import read_metrics
from bittern.model import Transformer

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("reference_kernels")  # packed models on the reference kernels here


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    text = demo_text()[:60_000]
    (d / "a.txt").write_text(text)
    tok = train_bpe([text], vocab_size=512)
    prepare_shards([d / "a.txt"], tok, d / "shards", val_fraction=0.1, split="tail")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(d / "hf", safe_serialization=True)
    return d, hf


def test_hf_names_map_onto_our_fp_model(setup):
    d, hf = setup
    config, state = load_llama_checkpoint(d / "hf", linear="fp")
    assert config.num_kv_heads == 2 and config.num_layers == 2 and "layers.0.self_attn.q_proj.weight" in state
    ours = Transformer(config)
    ours.load_state_dict(state)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits.float(), rtol=1e-4, atol=1e-4)


def test_finetune_ternary_lowers_the_loss_and_packs(setup, tmp_path):
    d, _ = setup
    run = tmp_path / "run"
    windows = eval_windows(load_split(d / "shards", "val"), 32, 8)
    config, state = load_llama_checkpoint(d / "hf", linear="bitnet")
    start_model = Transformer(config)
    start_model.load_state_dict(state)
    with torch.no_grad():
        start_loss = float(F.cross_entropy(start_model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()))
    summary = finetune_ternary(d / "hf", d / "shards", run, ramp_steps=10,
                               overrides=["steps=30", "batch_size=8", "seq_len=32", "lr=3e-3", "warmup=3", "eval_every=0",
                                          "eval_windows=8", "save_every=30", "progress=false", "plot=false", "num_threads=1"])
    assert summary["linear"] == "bitnet" and summary["steps"] == 30
    assert summary["val_loss"] < start_loss - 0.3, (summary["val_loss"], start_loss)
    ramp = [r["quant_strength"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert ramp[:3] == [0.0, 0.1, 0.2] and ramp[10:] == [1.0] * 20
    # pack with the CLI and check the packed (integer) model gives the same validation loss
    assert main(["pack", str(run), str(tmp_path / "packed"), "--layout", "2bit"]) == 0
    packed = load_packed(tmp_path / "packed")
    trained, _ = load_run_model(run)
    with torch.no_grad():
        packed_loss = float(F.cross_entropy(packed(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()))
        train_loss = float(F.cross_entropy(trained(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()))
    assert packed_loss == pytest.approx(train_loss, abs=2e-2)
    assert packed_loss == pytest.approx(summary["val_loss"], abs=2e-2)
    assert (tmp_path / "packed" / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "packed" / "config.json").read_text())["meta"]
    assert meta["step"] == 30


def test_cli_verbs_and_errors(setup, tmp_path, capsys):
    d, _ = setup
    assert main(["tokenizer", "train", str(d / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert main(["data", "prepare", str(d / "a.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s"),
                 "--split", "tail", "--val-fraction", "0.1"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--set", f"data={tmp_path / 's'}", f"out_dir={tmp_path / 'r'}", "steps=2", "batch_size=2",
                 "seq_len=16", "eval_windows=2", "progress=false", "plot=true", "model.linear=fp"]) == 0
    assert (tmp_path / "r" / "loss_curve.png").stat().st_size > 1000
    assert main(["pack", str(tmp_path / "r"), str(tmp_path / "p")]) == 2  # FP cannot be packed
    assert "cannot be packed" in capsys.readouterr().err
    assert main(["train", "--set", f"data={tmp_path / 'nothing'}"]) == 2
    assert "not a shard directory" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "nothing"), str(tmp_path / "p")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_default_model_path():
    p = default_model_path()
    if p is not None:
        assert (p / "config.json").is_file() and (p / "tokenizer.json").is_file()
        model = load_packed(p)
        assert model.config.linear == "bitnet" and model.is_packed


def test_transformers5_rope_parameters_are_honoured(tmp_path):
    """transformers 5 writes ``rope_parameters`` (theta and scaling) instead of top-level rope_theta / rope_scaling."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_parameters=dict(rope))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    written = json.loads((tmp_path / "config.json").read_text())
    if "rope_parameters" not in written or "rope_theta" in written:
        pytest.skip("this transformers writes the old rope_theta / rope_scaling keys")
    config, state = load_llama_checkpoint(tmp_path, linear="fp")
    assert config.rope_theta == 500000.0
    assert config.extra["rope_scaling"]["rope_type"] == "llama3" and config.extra["rope_scaling"]["factor"] == 8.0
    ours = Transformer(config)
    ours.load_state_dict(state)
    x = torch.randint(0, 128, (1, 96))  # past original_max_position_embeddings, where the scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits.float(), rtol=1e-4, atol=1e-4)


def test_llama_config_defaults_match_transformers():
    from bittern.train.hf_llama import llama_model_config

    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 64}
    config = llama_model_config(hf)
    assert config.norm_eps == transformers.LlamaConfig().rms_norm_eps == 1e-6
    assert config.rope_theta == 10000.0 and "rope_scaling" not in config.extra
    theta_only = llama_model_config({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert theta_only.rope_theta == 1e6 and "rope_scaling" not in theta_only.extra
    from bittern.errors import UsageError

    with pytest.raises(UsageError, match="rope scaling type 'yarn' is not supported"):
        llama_model_config({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
