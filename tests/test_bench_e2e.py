"""bench/e2e.py's driver: interleaved rounds, how rounds merge, and the table's ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench_script

E2E = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    return load_bench_script("e2e")


def test_merge_rounds_keeps_the_best_round_and_every_rate(e2e):
    runs = [{"decode_tok_s": 10.0, "prefill_tok_s": 90.0, "peak_rss": 5, "threads": 1, "round": 0},
            {"error": "killed", "threads": 1, "round": 1},
            {"decode_tok_s": 12.0, "prefill_tok_s": 70.0, "peak_rss": 7, "threads": 1, "round": 2, "profile": {"x": 1}}]
    m = e2e.merge_rounds(runs)
    assert m["decode_tok_s"] == 12.0 and m["profile"] == {"x": 1}  # the best decode round's details
    assert m["prefill_tok_s"] == 90.0  # best prefill of any round
    assert m["peak_rss"] == 7  # the largest resident memory of any round
    assert [r.get("decode_tok_s") for r in m["rounds"]] == [10.0, None, 12.0]
    assert m["rounds"][1]["error"] == "killed" and "round" not in m
    only_errors = [{"error": "a", "threads": 2}, {"error": "b", "threads": 2}]
    assert e2e.merge_rounds(only_errors)["error"] == "b"


def test_table_shows_the_median_of_per_round_ratios(e2e):
    engine = {"layout": "2bit-r4", "head": "int5", "threads": 2, "decode_tok_s": 30.0, "prefill_tok_s": 80.0,
              "peak_rss": 1e9, "file_bytes": 9e8, "kv_bytes": 1e7, "decode_vs_llama_cpp_rounds": [1.5, 1.9, 1.7]}
    lcpp = {"threads": 2, "gguf": "x.gguf", "decode_tok_s": 15.0, "prefill_tok_s": 40.0, "peak_rss": 1e9}
    table = e2e.format_table({"engine": [engine], "llama_cpp": [lcpp], "torch": [], "big": []})
    row = [line for line in table.splitlines() if line.startswith("| 2bit-r4")][0]
    assert "| 2.00x (median of rounds 1.70x) |" in row  # best / best, then the paired median
    assert "| 2.00x |" in row  # prefill ratio


def test_driver_runs_interleaved_rounds(tmp_path):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(E2E), "--workdir", str(tmp_path / "models"), "--config", "tiny", "--layouts", "2bit-r4",
           "--heads", "auto", "--threads", "1", "--prompt", "4", "--gen", "4", "--prefill", "8", "--repeats", "1",
           "--rounds", "2", "--torch", "", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["rounds"] == 2
    (eng,) = res["engine"]
    assert "error" not in eng, eng
    assert len(eng["rounds"]) == 2 and all(r["decode_tok_s"] > 0 for r in eng["rounds"])
    assert eng["decode_tok_s"] == max(r["decode_tok_s"] for r in eng["rounds"])
    assert "| 2bit-r4 / head auto | 1 |" in p.stdout


def test_width_step_factor_grows_with_the_row_width(e2e):
    f = e2e.width_step_factor(160, 2560, rows=2048)
    assert 1.2 < f < 1.35  # Gaussian row absmax: ~3.7 sd at 2560 columns, ~2.9 at 160
    assert e2e.width_step_factor(2560, 2560, rows=512) == pytest.approx(1.0, abs=0.03)
    assert e2e.width_step_factor(2560, 160, rows=512) < 1.0


def test_offset_grid_quantize_stays_on_its_shifted_grid(e2e):
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    zero = torch.zeros(64, 1)
    q0 = e2e.offset_grid_quantize(w, 31, 1.0, zero)
    s = w.abs().amax(dim=1, keepdim=True) / 31
    assert torch.equal(q0, torch.round(w / s).clamp(-31, 31) * s)  # offset 0, scale 1: the engine's absmax codes
    offsets = torch.rand(64, 1, generator=g) - 0.5
    for qmax, scale in ((15, 1.0), (15, 1.27), (31, 1.5)):
        step = w.abs().amax(dim=1, keepdim=True) * scale / qmax
        q = e2e.offset_grid_quantize(w, qmax, scale, offsets)
        k = q / step + offsets  # whole numbers on the shifted grid
        assert torch.allclose(k, torch.round(k), atol=1e-4)
        assert ((q - w).abs() <= step / 2 + 1e-6).all()  # nearest grid point (no value is clipped here)
        assert not torch.equal(q, e2e.offset_grid_quantize(w, qmax, scale, zero))


def test_head_grid_cost_on_the_shipped_model(e2e):
    from bittern.train import default_model_path

    path = default_model_path()
    if path is None or not Path(path).exists():
        pytest.skip("no shipped model")
    r = e2e.head_grid_cost(str(path), text_chars=3000, draws=2)
    assert r["width"] == 160 and r["target_width"] == 2560 and r["target_step_factor"] > 1.2
    assert r["tokens"] > 100 and r["bf16_ppl"] > 1
    for fmt in ("int6", "int5"):
        for label in ("this model", "2560-wide rows"):
            c = r["formats"][fmt][label]
            assert c["min"] <= c["mean"] <= c["max"] and c["sd"] >= 0
            assert abs(c["mean"]) < 0.2  # a perplexity change of a few percent at most, not a broken table
