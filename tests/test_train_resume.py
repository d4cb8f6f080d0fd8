"""Checkpoints: resume after SIGKILL continues exactly; a NaN loss stops clearly and leaves the last checkpoint intact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import bittern.train.trainer as trainer_mod
from bittern.demo import demo_text
from bittern.tokenizer import train_bpe
from bittern.train.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights
from bittern.train.config import TrainConfig
from bittern.train.data import prepare_shards
from bittern.train.metrics import read_metrics
from bittern.train.trainer import TrainingDiverged, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    text = demo_text()[:60_000]
    (d / "a.txt").write_text(text)
    prepare_shards([d / "a.txt"], train_bpe([text], vocab_size=512), d / "shards", val_fraction=0.1, split="tail")
    return d / "shards"


def _overrides(shards, out, **kw):
    base = dict(data=str(shards), out_dir=str(out), model={"name": "tiny-2b4t"}, steps=12, batch_size=4, seq_len=32,
                warmup=2, eval_every=6, eval_windows=4, save_every=4, keep_last=2, progress=False, plot=False,
                num_threads=1, lr=3e-3)
    base.update(kw)
    return base


def _train_losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_resume_after_sigkill_is_exact(shards, tmp_path):
    ref = tmp_path / "ref"
    train(TrainConfig(**_overrides(shards, ref)))
    run = tmp_path / "killed"
    cfg = _overrides(shards, run, sleep_per_step=0.4)
    cmd = [sys.executable, "-m", "bittern", "train", "--set"] + [f"{k}={json.dumps(v)}" for k, v in cfg.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            found = latest_checkpoint(run)
            if found is not None and found.name == "step_00000004":
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared")
        time.sleep(0.5)  # let it run on past the checkpoint, then kill it hard mid-run
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = max(s for s, _ in _train_losses(run))
    assert 4 <= killed_at < 12, "the process should die mid-run"
    assert latest_checkpoint(run).name in ("step_00000004", "step_00000008")
    train(TrainConfig(**_overrides(shards, run)))  # resumes from the latest checkpoint
    got, want = _train_losses(run), _train_losses(ref)
    assert [s for s, _ in got] == list(range(1, 13))
    assert got == want  # bit-for-bit the same trajectory
    w_ref, w_run = load_model_weights(latest_checkpoint(ref))[0], load_model_weights(latest_checkpoint(run))[0]
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000008", "step_00000012"]  # keep-last-2
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(shards, tmp_path, monkeypatch):
    run = tmp_path / "nan"
    train(TrainConfig(**_overrides(shards, run, steps=4)))
    good = latest_checkpoint(run)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real = trainer_mod.loss_fn
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(trainer_mod, "loss_fn", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7.*Last good checkpoint: .*step_00000004"):
        train(TrainConfig(**_overrides(shards, run, steps=12)))
    assert latest_checkpoint(run) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    weights = load_model_weights(good)[0]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_init_from_a_bittern_run_continues_from_its_weights(shards, tmp_path):
    """init_from = a finished run (or one of its checkpoints): a new run starts from those weights, fresh schedule."""
    from bittern.train.trainer import build_model

    first = tmp_path / "first"
    train(TrainConfig(**_overrides(shards, first)), resume=False)
    weights, _ = load_model_weights(latest_checkpoint(first))
    for source in (first, latest_checkpoint(first)):
        cfg = TrainConfig(**_overrides(shards, tmp_path / "second", init_from=str(source), model={"name": "tiny"}))
        model = build_model(cfg)  # the model section is ignored: the run's own model_config.json decides the shape
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())
    second = train(TrainConfig(**_overrides(shards, tmp_path / "second", init_from=str(first), steps=4, eval_every=4)),
                   resume=False)
    fresh = train(TrainConfig(**_overrides(shards, tmp_path / "fresh", steps=4, eval_every=4)), resume=False)
    assert second["val_loss"] < fresh["val_loss"]  # 4 more steps on trained weights beat 4 steps from scratch
    with pytest.raises(Exception, match="no checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        (tmp_path / "empty" / "model_config.json").write_text((first / "model_config.json").read_text())
        build_model(TrainConfig(**_overrides(shards, tmp_path / "third", init_from=str(tmp_path / "empty"))))


def test_rerunning_a_finished_run_keeps_its_summary(shards, tmp_path, capsys):
    run = tmp_path / "done"
    first = train(TrainConfig(**_overrides(shards, run, steps=4, eval_every=2)))
    saved, metrics = (run / "summary.json").read_bytes(), (run / "metrics.jsonl").read_bytes()
    assert first["val_loss"] > 0 and first["tokens_per_s"] > 0
    capsys.readouterr()
    again = train(TrainConfig(**_overrides(shards, run, steps=4, eval_every=2)))
    assert "already finished at step 4" in capsys.readouterr().out
    assert again == json.loads(saved)
    assert (run / "summary.json").read_bytes() == saved and (run / "metrics.jsonl").read_bytes() == metrics
    # killed after the last checkpoint but before the summary: the summary is rebuilt with a fresh evaluation
    (run / "summary.json").unlink()
    rebuilt = train(TrainConfig(**_overrides(shards, run, steps=4, eval_every=2)))
    assert rebuilt["steps"] == 4 and rebuilt["val_loss"] == pytest.approx(first["val_loss"], rel=1e-5)
    assert rebuilt["tokens_per_s"] is None and json.loads((run / "summary.json").read_text())["val_loss"] == rebuilt["val_loss"]


def test_stale_temporary_checkpoints_are_removed_at_start(shards, tmp_path):
    from bittern.train.checkpoint import remove_stale_temp_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "stale"
    root = run / "checkpoints"
    orphan = root / f".tmp-step_00000004-{dead.pid}"
    live = root / f".tmp-step_00000004-{os.getppid()}"  # a running process (pytest's parent) may still be saving
    other = root / ".tmp-notes"
    for d in (orphan, live, other):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    train(TrainConfig(**_overrides(shards, run, steps=4)))
    assert not orphan.exists() and live.is_dir() and other.is_dir()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    mine = root / f".tmp-step_00000008-{os.getpid()}"
    mine.mkdir()
    assert remove_stale_temp_dirs(run) == [mine] and not mine.exists()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"] and live.is_dir()


def test_resume_with_another_model_shape_is_a_clear_error(shards, tmp_path):
    from bittern.errors import UsageError

    run = tmp_path / "shape"
    train(TrainConfig(**_overrides(shards, run, steps=4)))
    wider = {"name": "tiny-2b4t", "hidden_size": 128}
    with pytest.raises(UsageError, match=r"started with a different model config \(hidden_size 64 then, 128 now\)"):
        train(TrainConfig(**_overrides(shards, run, steps=8, model=wider)))
    assert latest_checkpoint(run).name == "step_00000004"


def test_damaged_checkpoint_file_is_a_clear_error(shards, tmp_path):
    from bittern.errors import UsageError

    run = tmp_path / "damaged"
    train(TrainConfig(**_overrides(shards, run, steps=4, save_every=2)))
    bad = latest_checkpoint(run)
    optim = bad / "optimizer.pt"
    optim.write_bytes(optim.read_bytes()[:2000])  # truncated, as by a full disk
    damaged = rf"{re.escape(str(optim))}: the checkpoint is damaged.*remove {re.escape(str(bad))} to resume from the previous"
    with pytest.raises(UsageError, match=damaged):
        train(TrainConfig(**_overrides(shards, run, steps=6, save_every=2)))
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(UsageError, match=rf"{re.escape(str(weights))}: the checkpoint is damaged"):
        load_model_weights(bad)
    import shutil

    shutil.rmtree(bad)  # as the message suggests: resume from step 2
    summary = train(TrainConfig(**_overrides(shards, run, steps=6, save_every=2)))
    assert summary["steps"] == 6
    assert [s for s, _ in _train_losses(run)] == list(range(1, 7))
