"""The CLI end to end: `bittern demo` on a tiny budget, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest

from bittern.cli import main


def test_demo_runs_end_to_end_and_reports_measured_figures(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    code = main(["demo", "--out", str(tmp_path / "model"), "--steps", "4", "--max-seconds", "600", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits per linear weight" in printed and "validation loss" in printed and "ROMEO:" in printed
    result = json.loads(out_json.read_text())
    bitnet, fp = result["bitnet"], result["fp"]
    assert bitnet["steps"] == fp["steps"] == 4
    assert bitnet["bits_per_linear_weight"] == pytest.approx(2.0, abs=0.01)
    assert bitnet["disk_bytes"] == (tmp_path / "model" / "model.safetensors").stat().st_size
    assert bitnet["disk_bytes"] < fp["disk_bytes_fp16"] / 3
    assert 0 < bitnet["val_loss"] < 8 and 0 < fp["val_loss"] < 8
    assert abs(bitnet["val_loss"] - bitnet["val_loss_packed"]) < 1e-3  # packed integer path == training model
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_bad_arguments_give_one_line_errors(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_module_entry_point_prints_help():
    proc = subprocess.run([sys.executable, "-m", "bittern", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_missing_server_extra_and_unavailable_backend_are_one_line_errors(monkeypatch, capsys) -> None:
    import sys

    from bittern.cli import main

    for name in [m for m in sys.modules if m == "bittern.serve" or m.startswith("bittern.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if `pip install bittern` without [serve]
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'bittern[serve]'" in err and len(err.strip().splitlines()) == 1
    from bittern import kernels

    if "triton" in kernels.available_backends():
        return
    env = {**__import__("os").environ, "BITTERN_BACKEND": "triton"}  # read when the package is imported
    r = subprocess.run([sys.executable, "-m", "bittern", "generate", "ROMEO:", "--max-tokens", "2"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "kernel backend 'triton' is not available" in r.stderr and "NVIDIA GPU" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
