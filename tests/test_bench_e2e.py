"""bench/e2e.py's driver: interleaved rounds, how rounds merge, and the table's ratios."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", E2E)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
