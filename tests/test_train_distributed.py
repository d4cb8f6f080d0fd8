"""Two CPU processes (gloo) under DDP and FSDP2 give the same training as one process with the same global batch."""

from __future__ import annotations

import pytest
import torch

from bittern.demo import demo_text
from bittern.tokenizer import train_bpe
from bittern.train.checkpoint import latest_checkpoint, load_model_weights
from bittern.train.config import TrainConfig
from bittern.train.launch import train_multiprocess
from bittern.train.metrics import read_metrics
from bittern.train.data import prepare_shards
from bittern.train.trainer import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    text = demo_text()[:60_000]
    (d / "a.txt").write_text(text)
    tok = train_bpe([text], vocab_size=512)
    prepare_shards([d / "a.txt"], tok, d / "shards", val_fraction=0.1, split="tail")
    return d / "shards"


def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(data=str(shards), out_dir=str(out), model={"name": "tiny"}, steps=4, batch_size=4, seq_len=32,
                warmup=1, eval_every=0, eval_windows=4, save_every=4, progress=False, plot=False, num_threads=1, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def _weights(run):
    return load_model_weights(latest_checkpoint(run))[0]


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(_cfg(shards, out))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(shards, single, tmp_path, mode):
    out = tmp_path / mode
    train_multiprocess(_cfg(shards, out, distributed=mode), nprocs=2)
    one, two = _losses(single), _losses(out)
    assert len(one) == len(two) == 4
    assert one[0] != one[-1]  # training happened
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=2e-4, atol=2e-4)
    w1, w2 = _weights(single), _weights(out)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_gradient_accumulation_matches_full_batch(shards, single, tmp_path):
    out = tmp_path / "accum"
    train(_cfg(shards, out, micro_batch_size=1))
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(single)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option,tol", [({"activation_checkpointing": True}, 1e-5), ({"precision": "bf16"}, 0.05)])
def test_activation_checkpointing_and_bf16_train_the_same(shards, single, tmp_path, option, tol):
    out = tmp_path / "opt"
    train(_cfg(shards, out, **option))
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(single)), rtol=tol, atol=tol)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_under_ddp(shards, tmp_path):
    """A checkpoint written by 2 FSDP processes holds full state: 2 DDP processes continue it exactly."""
    flat = dict(lr_schedule="constant", wd_schedule="constant", save_every=2, model={"name": "tiny-2b4t"})
    ref = tmp_path / "ref"
    train(_cfg(shards, ref, steps=6, **flat))
    run = tmp_path / "run"
    train_multiprocess(_cfg(shards, run, steps=4, distributed="fsdp", **flat), nprocs=2)
    train_multiprocess(_cfg(shards, run, steps=6, distributed="ddp", **flat), nprocs=2)
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(ref)), rtol=2e-4, atol=2e-4)
