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
