"""Paper bench: random packed models, memory arithmetic, one in-process measurement, table and chart."""

from __future__ import annotations

import json

import pytest
import torch

from bittern import kernels
from bittern.configs import get_config
from bittern.eval import paper_bench as pb
from bittern.layers import PackedLinear


@pytest.fixture(autouse=True)
def reference_kernels():
    kernels.set_backend("reference")
    yield
    kernels.set_backend(None)


def test_random_ternary_is_valid_and_balanced():
    w = pb.random_ternary(96, 130, torch.Generator().manual_seed(0))  # 130 % 4 != 0: padding fields
    codes = w.codes()
    assert codes.shape == (96, 130)
    counts = torch.bincount((codes.flatten() + 1).long(), minlength=3)
    assert counts.min() > 0.25 * codes.numel()  # roughly a third each
    assert w.packed[:, -1].tolist() == [(b & 0b1111) | 0b01010000 for b in w.packed[:, -1].tolist()]


def test_random_packed_model_runs_and_holds_the_computed_bytes():
    cfg = get_config("tiny")
    model = pb.random_packed_model(cfg, torch.bfloat16)
    assert all(isinstance(m, PackedLinear) for m in model.packed_linears().values())
    assert len(model.packed_linears()) == 7 * cfg.num_layers
    assert not any(p.device.type == "meta" for p in model.parameters())
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(m.weight_packed.numel() + 4 for m in model.packed_linears().values())
    assert held == pb.weight_bytes(cfg, "bitnet", 2)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(logits).all() and logits.std() > 0
    fp = pb.random_fp_model(cfg, torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in fp.parameters()) == pb.weight_bytes(cfg, "fp", 2)


def test_weight_memory_ratio_grows_with_size_and_batch_arithmetic():
    small = pb.weight_bytes(get_config("700M"), "fp") / pb.weight_bytes(get_config("700M"), "bitnet")
    big = pb.weight_bytes(get_config("70B"), "fp") / pb.weight_bytes(get_config("70B"), "bitnet")
    assert 2 < small < big < 8
    cfg = get_config("tiny")
    per_seq = pb.kv_bytes_per_seq(cfg, 16) + 2 * cfg.vocab_size * 4
    assert per_seq == 2 * 2 * 32 * 16 * 2 + 4096
    budget = pb.weight_bytes(cfg, "fp") + 3.5 * per_seq
    assert pb.max_batch(cfg, "fp", budget, 16) == 3
    assert pb.max_batch(cfg, "fp", 10, 16) == 0


def test_measure_table_and_chart(tmp_path):
    s = pb.BenchSettings(prompt_len=4, decode_steps=2, throughput_ctx=8, throughput_steps=1, max_batch=2)
    m = pb.measure_one("tiny", "bitnet", s)
    assert m["layers"] == 2 and m["decode_seconds"] > 0 and m["batch"] == 2 and m["batch_step_seconds"] > 0
    assert m["weight_bytes_held"] > 0 and m["peak_rss"] >= m["rss_after_import"]
    half = dict(m, layers=1, decode_seconds=m["head_seconds"] + 1.0)
    scaled = pb._scale(half, 4)
    assert scaled["decode_seconds"] == pytest.approx(m["head_seconds"] + 4.0)
    fake_side = {"weight_bytes": 4e9, "peak_rss_model": 5e9, "decode_seconds": 0.5, "throughput": 10.0, "batch": 4,
                 "path": "x"}
    row = {"config": "700M", "mode": "scaled", "measured_layers": 1, "paper": pb.PAPER_RATIOS["700M"],
           "fp": fake_side, "bitnet": dict(fake_side, weight_bytes=1e9, decode_seconds=0.25, throughput=30.0),
           "ratios": {"weight_memory": 4.0, "peak_memory": 1.0, "latency": 2.0, "throughput": 3.0},
           "energy": pb.energy_per_token(get_config("700M"))}
    result = {"rows": [row], "settings": {"fp_dtype": "bfloat16"}, "backends": ["reference"]}
    table = pb.format_table(result)
    assert "4.00x" in table and "2.60x" in table and "scaled1" in table
    png = pb.plot(result, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_weight_in_native_layout_is_valid():
    from bittern.pack import LAYOUTS

    if "2bit-r4" not in LAYOUTS:
        pytest.skip("no native r4 layout in this build")
    w = pb.random_ternary(12, 256, torch.Generator().manual_seed(1), layout="2bit-r4")
    assert w.layout == "2bit-r4"
    codes = w.codes()  # unpacking checks every field
    assert codes.shape == (12, 256) and set(codes.unique().tolist()) == {-1, 0, 1}
    assert w.to_layout("2bit").to_layout("2bit-r4").packed.equal(w.packed)
    padded = pb.random_ternary(12, 300, torch.Generator().manual_seed(2), layout="2bit-r4")  # 300 = 2 * 128 + 44
    assert padded.layout == "2bit-r4" and padded.codes().shape == (12, 300)
    # packing the codes again reproduces every byte, so the padding fields hold code 0 as the layout requires
    assert padded.to_layout("2bit").to_layout("2bit-r4").packed.equal(padded.packed)
    assert (padded.codes()[:, 256:] != 0).float().mean() > 0.4  # the real columns of the last block are random
    assert pb.random_ternary(10, 256, layout="2bit-r4").layout == "2bit"  # rows not a multiple of 4
    model = pb.random_packed_model(get_config("tiny"), layout="2bit-r4")
    assert {m.layout for m in model.packed_linears().values()} == {"2bit-r4"}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2]]))).all()


@pytest.mark.parametrize("bad,message", [
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "-2"], "--threads must be between 1 and"),
    (["--budget-gb", "nan"], "--budget-gb must be a positive number"),
    (["--budget-gb", "inf"], "--budget-gb must be a positive number"),
    (["--timeout", "nan"], "--timeout must be a positive number"),
    (["--full-limit-gb", "-1"], "--full-limit-gb must be a positive number"),
    (["--decode-steps", "1"], "--decode-steps must be at least 2"),
    (["--configs", ""], "--configs names no config"),
    (["--configs", "700M,9Q"], "unknown config '9Q'"),
    (["--json", "{tmp}/file.txt/p.json"], "is not a directory"),
    (["--png", "{tmp}"], "is a directory"),
    (["--png", "{tmp}/out.json"], "--json and --png name the same file"),
])
def test_cli_refuses_bad_options_before_measuring(tmp_path, monkeypatch, capsys, bad, message):
    from bittern.cli import main

    def measured(*args, **kwargs):
        raise AssertionError("measured before refusing the options")

    monkeypatch.setattr(pb, "run_paper_bench", measured)
    (tmp_path / "file.txt").write_text("keep")
    args = ["--configs", "tiny", "--json", str(tmp_path / "out.json"), "--png", str(tmp_path / "out.png")]
    assert main(["bench", "paper", *args, *[b.format(tmp=tmp_path) for b in bad]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists() and (tmp_path / "file.txt").read_text() == "keep"


def test_cli_exits_nonzero_when_every_measurement_failed(tmp_path, monkeypatch, capsys):
    from bittern.cli import main

    def failed(config, settings, progress=None):
        err = {"config": config, "side": "fp", "error": "worker failed (exit 1): boom"}
        return {"config": config, "mode": "measured", "measured_layers": 2, "num_layers": 2, "params": 0,
                "paper": {}, "fp": err, "bitnet": dict(err, side="bitnet"), "ratios": {},
                "energy": pb.energy_per_token(get_config(config))}

    monkeypatch.setattr(pb, "bench_config", failed)
    out, png = tmp_path / "runs" / "p.json", tmp_path / "runs" / "p.png"  # missing parents are created
    assert main(["bench", "paper", "--configs", "tiny", "--json", str(out), "--png", str(png)]) == 1
    assert "every measurement failed" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"][0]["fp"]["error"].endswith("boom")  # the record is still written
