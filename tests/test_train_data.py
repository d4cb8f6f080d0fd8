"""Token shards round-trip; validation splits by document or tail; batches are deterministic and resumable."""

from __future__ import annotations

import json

import pytest

from bittern.errors import UsageError
from bittern.tokenizer import train_bpe
from bittern.train.data import WindowLoader, eval_windows, load_split, prepare_shards, read_meta, text_bytes

DOCS = [f"Document number {i}. " + " ".join(f"word{j % 13} thing{(i * j) % 7}" for j in range(40 + 5 * i)) for i in range(10)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(DOCS, vocab_size=300)


def test_document_split_round_trips(tmp_path, tok):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    meta = prepare_shards([src], tok, tmp_path / "s", val_fraction=0.2, split="document", shard_tokens=400)
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["documents"] == 2
    assert len(meta["splits"]["train"]["files"]) > 1  # several shards, documents never split
    train, val = load_split(tmp_path / "s", "train"), load_split(tmp_path / "s", "val")
    eos = tok.eos_id
    def docs_of(split):
        bounds = list(split.doc_starts) + [len(split.tokens)]
        return [tok.decode(split.tokens[a:b - 1].tolist()) for a, b in zip(bounds, bounds[1:])]
    assert all(split.tokens[b - 1] == eos for split in (train, val) for b in list(split.doc_starts[1:]) + [len(split.tokens)])
    assert docs_of(val) == [DOCS[4], DOCS[9]]
    assert docs_of(train) == [d for i, d in enumerate(DOCS) if i not in (4, 9)]
    assert (tmp_path / "s" / "tokenizer.json").is_file()


def test_tail_split_and_train_only(tmp_path, tok):
    for i, d in enumerate(DOCS[:3]):
        (tmp_path / f"in{i}.txt").write_text(d)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "quoted.txt").write_text(DOCS[5])
    meta = prepare_shards([tmp_path / "in0.txt", tmp_path / "in1.txt", tmp_path / "in2.txt"], tok, tmp_path / "t",
                          val_fraction=0.25, split="tail", train_only=[tmp_path / "extra"])
    train, val = load_split(tmp_path / "t", "train"), load_split(tmp_path / "t", "val")
    assert meta["splits"]["val"]["documents"] == 3 and meta["splits"]["train"]["documents"] == 4
    for i in range(3):
        ids = tok.encode(DOCS[i]) + [tok.eos_id]
        cut = len(ids) - round(len(ids) * 0.25)
        a = int(train.doc_starts[i]); b = int(train.doc_starts[i + 1])
        assert train.tokens[a:b].tolist() == ids[:cut]
        c = int(val.doc_starts[i]); e = int(val.doc_starts[i + 1]) if i < 2 else len(val.tokens)
        assert val.tokens[c:e].tolist() == ids[cut:]
    assert tok.decode(train.tokens[int(train.doc_starts[3]):-1].tolist()) == DOCS[5]


def test_bad_inputs_are_clear(tmp_path, tok):
    with pytest.raises(UsageError, match="no such file"):
        prepare_shards([tmp_path / "nope.txt"], tok, tmp_path / "x")
    (tmp_path / "bad.jsonl").write_text('{"txt": "a"}\n')
    with pytest.raises(UsageError, match="string field 'text'"):
        prepare_shards([tmp_path / "bad.jsonl"], tok, tmp_path / "x")
    with pytest.raises(UsageError, match="not a shard directory"):
        read_meta(tmp_path)


def test_loader_is_deterministic_resumable_and_rank_split(tmp_path, tok):
    (tmp_path / "a.txt").write_text(" ".join(DOCS))
    prepare_shards([tmp_path / "a.txt"], tok, tmp_path / "s", val_fraction=0.0)
    split = load_split(tmp_path / "s", "train")
    a = WindowLoader(split, seq_len=8, batch_size=6, seed=3)
    batches = [a.next_batch()[0] for _ in range(2 * a.num_windows // 6 + 3)]  # crosses epochs
    b = WindowLoader(split, seq_len=8, batch_size=6, seed=3)
    for _ in range(5):
        b.next_batch()
    c = WindowLoader(split, seq_len=8, batch_size=6, seed=3)
    c.load_state_dict(b.state_dict())
    assert all((c.next_batch()[0] == batches[i]).all() for i in range(5, len(batches)))
    r0, r1 = WindowLoader(split, 8, 6, seed=3), WindowLoader(split, 8, 6, seed=3)
    x0, y0 = r0.next_batch(0, 2)
    x1, _ = r1.next_batch(1, 2)
    assert (x0 == batches[0][0::2]).all() and (x1 == batches[0][1::2]).all()
    assert (y0[:, :-1] == x0[:, 1:]).all()
    assert not (batches[0] == batches[1]).all()
    w = eval_windows(split, 8, 3)
    assert w.shape == (3, 9) and (w[1, 0] == w[0, -1])
    assert text_bytes(tok, w[:, 1:]) == len(tok.decode(split.tokens[1:25].tolist()).encode())
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    (tmp_path / "s" / meta["splits"]["train"]["files"][0]["bin"]).write_bytes(b"12")
    with pytest.raises(UsageError, match="expected .* tokens"):
        load_split(tmp_path / "s", "train")


def test_cli_data_and_tokenizer_outputs_are_checked_first_and_written_whole(tmp_path, tok, capsys) -> None:
    """`data prepare` and `tokenizer train` refuse a non-empty --out (no stale shard beside new ones)
    unless --overwrite replaces it whole; bad numbers, empty inputs and undecodable JSONL lines are
    one-line errors naming what is wrong; a demo checks its layout and --out before training."""
    from bittern.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS))
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--out", str(tok_dir), "--vocab-size", "300"]) == 0
    shards = tmp_path / "shards"
    base = ["data", "prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(shards)]
    assert main(base + ["--split", "tail", "--val-fraction", "0.2"]) == 0
    assert any(p.name.startswith("val_") for p in shards.iterdir())
    assert main(base + ["--val-fraction", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(base + ["--val-fraction", "0", "--overwrite"]) == 0
    assert not any(p.name.startswith("val_") for p in shards.iterdir())  # the earlier run's validation shard is gone
    cases = [
        (["tokenizer", "train", str(corpus), "--out", str(tmp_path / "t1"), "--vocab-size", "-5"], "--vocab-size must be at least 257"),
        (["tokenizer", "train", str(corpus), "--out", str(tmp_path / "t1"), "--min-frequency", "0"], "--min-frequency"),
        (["tokenizer", "train", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t1")], "no text"),
        (["data", "prepare", str(tmp_path / "empty.txt"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s1")], "no training tokens"),
        (["data", "prepare", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s1")], "bad.jsonl:2: not UTF-8"),
        (["demo", "--layout", "bogus", "--out", str(tmp_path / "d1")], "unknown packed layout"),
        (["demo", "--out", str(shards)], "earlier demo did not write"),
    ]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t1").exists() and not (tmp_path / "s1").exists() and not (tmp_path / "d1").exists()
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    assert main(["tokenizer", "train", str(jsonl), "--out", str(tmp_path / "t2"), "--vocab-size", "300", "--text-field", "body"]) == 0


def test_packed_model_files_get_the_usual_permissions(tmp_path) -> None:
    import os

    import torch

    from bittern.configs import get_config
    from bittern.model import Transformer
    from bittern.modelfile import save_packed

    torch.manual_seed(0)
    save_packed(Transformer(get_config("tiny")).freeze(), tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "m").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # not mkstemp's (or save_file's) 0600
