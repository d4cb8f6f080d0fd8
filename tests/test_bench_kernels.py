"""The kernel benchmark's driver on a small shape: table rows, JSON, the same-run llama.cpp comparison."""

from __future__ import annotations

import json

import pytest

from bittern import bench_kernels as bk
from bittern.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")


def test_block_gemm_rate_weighs_each_product_by_its_time() -> None:
    shape = bk.ModelShape("s", 8, 16, 4, 3)
    assert shape.ternary_weights == 3 * (2 * 8 * 8 + 2 * 4 * 8 + 2 * 16 * 8 + 8 * 16)
    rows = [{"model": "s", "format": "2bit-r4", "threads": 1, "layer": layer, "gemm_s": t, "gemm_tokens": 10}
            for layer, t in (("q/o", 1.0), ("k/v", 2.0), ("gate/up", 3.0), ("down", 4.0))]
    # two q/o, two k/v, two gate/up and one down product per block
    want = (2 * 64 + 2 * 32 + 2 * 128 + 128) * 10 / (2 * 1.0 + 2 * 2.0 + 2 * 3.0 + 4.0) / 1e9
    assert bk.block_gemm_rate(rows, shape, "2bit-r4", 1) == pytest.approx(want)
    assert bk.block_gemm_rate(rows, shape, "2bit-r4", 2) is None  # nothing measured at 2 threads
    assert bk.block_gemm_rate(rows[:3], shape, "2bit-r4", 1) is None  # a product without a time


def test_small_run_writes_rows_and_compares_with_llama_cpp(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(bk.MODELS, "mini", bk.ModelShape("mini", 256, 512, 64, 2))
    calls = []

    def fake_llama(gguf, threads, tokens, reps):
        calls.append((gguf, threads, tokens))
        return {"prompt_tok_s": 50.0 + len(calls), "version": "test"}

    monkeypatch.setattr(bk, "llama_cpp_prompt_rate", fake_llama)
    lines: list[str] = []
    out = tmp_path / "k.json"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # only its existence is checked: the llama.cpp run is faked
    rep = bk.run_kernel_bench(models=["mini"], threads=[2], formats=["2bit-r4", "1.67bit-lut"], gemm_tokens=8, reps=1,
                              min_bytes=2e5, with_torch=False, json_path=str(out), log=lines.append,
                              llama_cpp=str(gguf))
    assert calls == [(str(gguf), 2, 8), (str(gguf), 2, 8)]  # before and after the shapes
    assert json.loads(out.read_text()) == json.loads(json.dumps(rep))
    rows = rep["results"]
    assert {(r["layer"], r["format"]) for r in rows} == {(layer, f) for layer in ("q/o", "k/v", "gate/up", "down")
                                                         for f in ("2bit-r4", "1.67bit-lut")}
    for r in rows:
        assert r["gemv_s"] > 0 and r["roof_s"] > 0 and r["gemm_s"] > 0 and r["gemm_panel_s"] > 0
        assert r["weight_copies"] >= 1
        assert r["core_gbps"] > 0
        assert r["core_pct"] == pytest.approx(100 * r["gemv_gbps"] / (r["threads"] * r["core_gbps"]))
    comps = rep["llama_cpp"]["comparisons"]
    assert [c["format"] for c in comps] == ["2bit-r4", "1.67bit-lut"]
    for c in comps:
        assert c["llama_cpp_prompt_tok_s"] == 52.0  # the faster of its two runs
        assert c["ratio"] == pytest.approx(c["block_gemm_gmacs"] / (52.0 * bk.MODELS["mini"].ternary_weights / 1e9))
    assert any("llama.cpp's prompt speed" in line for line in lines)
    with pytest.raises(ValueError, match="GEMM"):
        bk.run_kernel_bench(models=["mini"], threads=[1], gemm_tokens=0, llama_cpp=str(gguf), log=None)
    with pytest.raises(ValueError, match="no such GGUF"):
        bk.run_kernel_bench(models=["mini"], threads=[1], gemm_tokens=8, llama_cpp=str(tmp_path / "x.gguf"), log=None)


def test_core_rate_runs_on_one_thread_and_restores_the_count(monkeypatch) -> None:
    import torch

    seen = []
    real = native.bench_calls

    def spy(*args, **kwargs):
        seen.append(native.get_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "bench_calls", spy)
    gen = torch.Generator().manual_seed(0)
    native.set_threads(2)
    try:
        q, s, rs = native.quantize_activations(torch.randn(1, 512, generator=gen))
        w = bk.random_packed("2bit-r4", 256, 512, gen)
        gbps = bk._core_gemv_gbps("2bit-r4", 256, 512, w.packed.numel(), 2, q, s, rs, 1, False, gen)
        assert gbps > 0 and seen and set(seen) == {1}
        assert native.get_threads() == 2
    finally:
        native.set_threads(None)


def test_cli_verb_takes_the_bench_options(tmp_path, monkeypatch, capsys) -> None:
    from bittern.cli import main

    monkeypatch.setitem(bk.MODELS, "mini", bk.ModelShape("mini", 256, 512, 64, 2))
    out = tmp_path / "k.json"
    rc = main(["bench", "kernels", "--shapes", "mini", "--threads", "1", "--formats", "1.67bit-lut", "--reps", "1",
               "--gemm-tokens", "0", "--no-torch", "--min-mb", "0.2", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["format"] for r in rows} == {"1.67bit-lut"} and {r["threads"] for r in rows} == {1}
    assert all(r["core_gbps"] > 0 and "gemm_s" not in r for r in rows)
    assert "core" in capsys.readouterr().out
    for bad, message in ((["--threads", "two"], "comma-separated integers"), (["--threads", "0"], "positive"),
                         (["--models", "9Z"], "unknown model"), (["--formats", "3bit"], "unknown format")):
        assert main(["bench", "kernels", *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    (["--threads", "257"], "between 1 and 256"),
    (["--threads", "1,100000"], "between 1 and 256"),
    (["--llama-cpp", "{tmp}/nonexist.gguf", "--gemm-tokens", "4"], "nonexist.gguf: no such GGUF file"),
    (["--models", ""], "--models names no model shape"),
    (["--formats", ""], "--formats names no format"),
    (["--formats", " , "], "--formats names no format"),
    (["--min-mb", "nan"], "--min-mb a positive number"),
    (["--json", ""], "--json needs a file name"),
    (["--json", "{tmp}"], "is a directory"),
    (["--json", "{tmp}/missing/k.json"], "does not exist"),
    (["--json", "{tmp}/in.gguf", "--llama-cpp", "{tmp}/in.gguf", "--gemm-tokens", "4"], "is one of the inputs"),
])
def test_cli_refuses_bad_options_before_measuring(tmp_path, monkeypatch, capsys, bad, message) -> None:
    from bittern.cli import main

    (tmp_path / "in.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(bk.MODELS, "mini", bk.ModelShape("mini", 256, 512, 64, 2))

    def measured(*args, **kwargs):
        raise AssertionError("measured before refusing the options")

    monkeypatch.setattr(bk, "_bench_shape", measured)
    monkeypatch.setattr(bk, "python_call_overhead", measured)
    monkeypatch.setattr(bk, "llama_cpp_prompt_rate", measured)
    args = ["--shapes", "mini", "--threads", "1", "--reps", "1", "--gemm-tokens", "0", "--no-torch", "--min-mb", "0.2"]
    assert main(["bench", "kernels", *args, *[b.format(tmp=tmp_path) for b in bad]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (tmp_path / "in.gguf").read_bytes() == b"GGUF"
