"""Perplexity: the sliding-window scorer against a plain forward pass and a brute-force definition."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bittern import kernels
from bittern.cli import main
from bittern.configs import get_config
from bittern.errors import UsageError
from bittern.eval.perplexity import perplexity, score_ids, window_plan
from bittern.model import Transformer
from bittern.modelfile import save_packed
from bittern.tokenizer import train_bpe

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. ")


@pytest.fixture(autouse=True)
def reference_kernels():
    """Pin the exact reference kernels (independent of optional native builds)."""
    kernels.set_backend("reference")
    yield
    kernels.set_backend(None)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT * 20], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_seq_len=256)
    m = Transformer(cfg)
    with torch.no_grad():  # a larger init spreads the logits, so a wrong token alignment shows
        m.lm_head.weight.mul_(20)
    return m.freeze()


def test_single_window_equals_plain_cross_entropy(model, tok):
    ids = [tok.eos_id] + tok.encode(TEXT)
    assert len(ids) < 256
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    ref_nll = F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="mean").item()
    res = perplexity(model, tok, [TEXT], context=256, stride=128, show_progress=False)
    assert res.tokens == len(ids) - 1
    assert res.bytes == len(TEXT.encode("utf-8"))
    assert res.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-5)
    assert res.bits_per_byte == pytest.approx(ref_nll * (len(ids) - 1) / math.log(2) / res.bytes, rel=1e-5)
    assert res.perplexity > 1.5  # a random model is far from perfect


def test_stride_one_equals_brute_force(model, tok):
    ids = [tok.eos_id] + tok.encode(TEXT)[:40]
    ctx = 8
    ref = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            window = ids[max(0, t - (ctx - 1)) : t + 1]
            logits = model(torch.tensor([window]))[0, -2]
            ref -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
    for batch in (1, 5):
        nll, n = score_ids(model, ids, ctx, 1, batch)
        assert n == len(ids) - 1
        assert nll == pytest.approx(ref, rel=1e-6)
    # a longer stride gives less context to some tokens: a different (but still complete) score
    nll4, n4 = score_ids(model, ids, ctx, 4)
    assert n4 == len(ids) - 1 and nll4 != pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("n,ctx,stride", [(2, 4, 2), (50, 8, 3), (50, 8, 8), (17, 32, 16), (100, 10, 1)])
def test_window_plan_scores_each_token_once(n, ctx, stride):
    scored = []
    for begin, end, first in window_plan(n, ctx, stride):
        assert end - begin <= ctx and begin < first <= end
        scored.extend(range(first, end))
    assert len(scored) == len(set(scored))
    if stride < ctx:
        assert scored == list(range(1, n))
    else:  # disjoint windows: each window's first token has no context and is skipped
        assert set(scored) == set(range(1, n)) - set(range(0, n, ctx))


def test_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="stride"):
        window_plan(10, 8, 9)
    with pytest.raises(ValueError, match="context"):
        perplexity(model, tok, [TEXT], context=1024, show_progress=False)
    with pytest.raises(UsageError, match="empty"):
        perplexity(model, tok, [""], context=64, show_progress=False)
    with pytest.raises(ValueError, match="context must be at least 2"):  # 0 is not "the default"
        perplexity(model, tok, [TEXT], context=0, show_progress=False)
    with pytest.raises(ValueError, match="stride must be between 1"):
        perplexity(model, tok, [TEXT], context=64, stride=0, show_progress=False)


def test_cli_ppl_json(model, tok, tmp_path, capsys):
    tok_file = tok.save(tmp_path / "tok")
    save_packed(model, tmp_path / "m", tokenizer_file=tok_file, dtype="float32")
    text_file = tmp_path / "a.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", str(tmp_path / "m"), str(text_file), "--context", "64", "--stride", "32",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    direct = perplexity(model, tok, [TEXT], context=64, stride=32, show_progress=False)
    assert data["perplexity"] == pytest.approx(direct.perplexity, rel=1e-5)
    assert data["tokens"] == direct.tokens and data["texts"][0]["bytes"] == len(TEXT.encode())
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "ppl", "--model", str(tmp_path / "m"), str(tmp_path / "missing.txt")]) == 2


def test_default_model_path(monkeypatch, tmp_path):
    from bittern.eval.perplexity import resolve_model_path

    assert resolve_model_path(str(tmp_path)) == tmp_path
    train = pytest.importorskip("bittern.train")
    monkeypatch.setattr(train, "default_model_path", lambda: None, raising=False)
    with pytest.raises(UsageError, match="--model"):
        resolve_model_path(None)
    monkeypatch.setattr(train, "default_model_path", lambda: tmp_path, raising=False)
    assert resolve_model_path(None) == tmp_path


def _packed_dir(model, tok, tmp_path, name="m"):
    tok_file = tok.save(tmp_path / f"{name}_tok")
    save_packed(model, tmp_path / name, tokenizer_file=tok_file, dtype="float32")
    return tmp_path / name


def test_bits_per_byte_counts_only_the_bytes_of_scored_tokens(model, tok):
    ids = [tok.eos_id] + tok.encode(TEXT)
    piece = [len(tok.decode([i], skip_special_tokens=False).encode()) for i in ids]
    assert sum(piece[1:]) == len(TEXT.encode())  # ASCII text: each token's bytes stand alone
    for stride in (8, 16):  # 16 = context: disjoint windows, each window's first token is not scored
        res = perplexity(model, tok, [TEXT], context=16, stride=stride, show_progress=False)
        scored = [p for _, end, first in window_plan(len(ids), 16, stride) for p in range(first, end)]
        assert res.tokens == len(scored)
        assert res.bytes == sum(piece[p] for p in scored)
        assert res.bits_per_byte == pytest.approx(res.nll / math.log(2) / res.bytes)
    assert res.bytes < len(TEXT.encode())  # stride == context left tokens (and their bytes) out


def test_read_texts_keeps_the_file_bytes(tmp_path):
    from bittern.eval.perplexity import read_texts

    f = tmp_path / "crlf.txt"
    f.write_bytes(b"one\r\ntwo\rthree\n")
    [(name, text)] = read_texts([f])
    assert name == str(f) and text == "one\r\ntwo\rthree\n"


def test_tokenizer_with_more_ids_than_the_model_is_refused(tok, tmp_path, capsys):
    from bittern.eval.perplexity import load_model_and_tokenizer

    small = Transformer(get_config("tiny", vocab_size=tok.vocab_size - 20, max_seq_len=64)).freeze()
    d = _packed_dir(small, tok, tmp_path, "small")
    with pytest.raises(UsageError, match=f"{tok.vocab_size} ids .* only {tok.vocab_size - 20}"):
        load_model_and_tokenizer(d)
    text_file = tmp_path / "a.txt"
    text_file.write_text(TEXT)
    assert main(["eval", "ppl", "--model", str(d), str(text_file)]) == 2
    err = capsys.readouterr().err
    assert str(tok.vocab_size) in err and str(tok.vocab_size - 20) in err and "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--context", "0"], "--context must be at least 2"),
    (["--stride", "0"], "--stride must be at least 1"),
    (["--context", "8", "--stride", "9"], "must not exceed --context"),
    (["--batch-size", "0"], "--batch-size"),
    (["--json", ""], "--json needs a file name"),
    (["--json", "{input}"], "is one of the inputs"),
    (["--json", "{tmp}"], "is a directory"),
    (["--json", "{tmp}/no/such/dir/out.json"], "does not exist"),
])
def test_cli_ppl_refuses_bad_values_before_loading_the_model(tmp_path, capsys, extra, message):
    text_file = tmp_path / "a.txt"
    text_file.write_text(TEXT)
    extra = [e.format(input=text_file, tmp=tmp_path) for e in extra]
    # the model directory does not exist: the check must come before anything is loaded
    assert main(["eval", "ppl", "--model", str(tmp_path / "no-model"), str(text_file), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err
    assert text_file.read_text() == TEXT
