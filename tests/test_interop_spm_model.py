"""A checkpoint whose only tokenizer is a SentencePiece ``tokenizer.model`` (Llama-2 / 1bitLLM): imported through
transformers' slow->fast conversion, it encodes and decodes exactly as ``sentencepiece`` itself, in bittern
directories and in GGUF files."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from bittern.demo import demo_text  # noqa: E402
from bittern.interop import convert, from_pretrained  # noqa: E402
from bittern.interop.gguf_io import GGUFFile  # noqa: E402
from bittern.interop.hf import load_tokenizer_if_any  # noqa: E402
from bittern.interop.spm import INSTALL_HINT, sentencepiece_tokenizer  # noqa: E402

VOCAB = 400  # 3 specials + 256 byte pieces + the characters of the text + ~80 merges
TEMPLATE = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
SAMPLES = [
    "Hello world!",
    "To be, or not to be: that is the question.",
    "  two leading spaces, a  double space and a trailing one ",
    "digits 2024 and 7",
    "café naïve résumé Ünïcödé",  # accents: in the vocab as characters
    "emoji 🦩 needs bytes",  # not in the training text: byte fallback
    "中文 and a\ttab\nnew line",
]

pytestmark = pytest.mark.usefixtures("reference_kernels")


def train_spm(directory: Path, llama_style: bool = True) -> Path:
    """A SentencePiece BPE model trained on the bundled Shakespeare, written as ``directory/tokenizer.model``.

    ``llama_style``: Llama-2's normalizer settings (no character map, spaces kept as they are, digits split);
    otherwise SentencePiece's defaults (NFKC-like character map, extra whitespace removed)."""
    lines = [line for line in demo_text().splitlines() if line.strip()][:400]
    lines.append("café naïve résumé Ünïcödé 中文")  # a few non-ASCII characters become pieces
    options = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                   allow_whitespace_only_pieces=True) if llama_style else {}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=VOCAB, byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   **options)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


def make_checkpoint(directory: Path, tokenizer_config: bool = True) -> Path:
    """A tiny random LlamaForCausalLM (latent weights, 1bitLLM style) saved by transformers, with only a
    SentencePiece tokenizer.model beside it (and, like Llama-2 repos, a tokenizer_config.json)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    train_spm(directory)
    if tokenizer_config:
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": TEMPLATE}))
    assert not (directory / "tokenizer.json").exists()
    return directory


@pytest.fixture(scope="module", params=["llama_config", "no_config"])
def checkpoint(request, tmp_path_factory) -> Path:
    """With a LlamaTokenizer tokenizer_config.json, and with none (transformers' generic class)."""
    return make_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", request.param == "llama_config")


def assert_same_as_sentencepiece(tok, model_file: Path, exact_text: bool = True) -> None:
    """``tok`` encodes and decodes every sample as sentencepiece does.

    Like with like: ``SentencePieceProcessor.encode`` adds no bos and prepends its dummy prefix "▁" (Llama-2's
    ``add_dummy_prefix``); bittern's ``Tokenizer.encode`` adds no special tokens either and its normalizer
    prepends the same "▁", so the raw ids must be identical. ``decode`` of both drops that one prefix space,
    so with Llama-2's identity normalizer the text comes back exactly."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == sp.decode(ids), text
        if exact_text:
            assert sp.decode(ids) == text


def test_byte_fallback_and_prefix_are_exercised(tmp_path):
    """The samples really need byte pieces, and the leading-space samples depend on the dummy prefix."""
    sp = spm.SentencePieceProcessor(model_file=str(train_spm(tmp_path) / "tokenizer.model"))
    assert sp.get_piece_size() == VOCAB and (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    pieces = sp.encode("emoji 🦩 needs bytes", out_type=str)
    assert "<0xF0>" in pieces and "<0x9F>" in pieces
    assert sp.encode("x", out_type=str)[0].startswith("▁")
    assert sp.encode("  two", out_type=str)[:2] != sp.encode("two", out_type=str)[:2]


def test_hf_directory_reads_tokenizer_model(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "converted without a tokenizer" warning
        model, tok, fmt = from_pretrained(checkpoint)
    assert fmt == "hf" and tok is not None
    assert_same_as_sentencepiece(tok, checkpoint / "tokenizer.model")
    assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id) == ("<s>", "</s>", 1, 2)
    has_config = (checkpoint / "tokenizer_config.json").exists()
    assert tok.chat_template == (TEMPLATE if has_config else None)
    assert model.config.vocab_size == VOCAB


def test_convert_to_bittern_and_gguf_keeps_the_tokenizer(checkpoint, tmp_path):
    model_file = checkpoint / "tokenizer.model"
    out = convert(checkpoint, tmp_path / "bittern")
    assert (out / "tokenizer.json").is_file()
    _, tok, fmt = from_pretrained(out)
    assert fmt == "bittern"
    assert_same_as_sentencepiece(tok, model_file)
    assert (tok.bos_id, tok.eos_id) == (1, 2)

    gguf_path = convert(checkpoint, tmp_path / "m.gguf", to="gguf", weight_type="F16")
    g = GGUFFile(gguf_path)
    assert g.field("tokenizer.ggml.model") == "llama"  # llama.cpp's SentencePiece tokenizer
    assert g.field("tokenizer.ggml.add_space_prefix") is True
    assert (g.field("tokenizer.ggml.bos_token_id"), g.field("tokenizer.ggml.eos_token_id"),
            g.field("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert g.field("tokenizer.ggml.tokens")[:VOCAB] == [sp.id_to_piece(i) for i in range(VOCAB)]
    _, rebuilt, fmt = from_pretrained(gguf_path)
    assert fmt == "gguf"
    assert_same_as_sentencepiece(rebuilt, model_file)
    if (checkpoint / "tokenizer_config.json").exists():
        assert g.field("tokenizer.chat_template") == TEMPLATE == rebuilt.chat_template


def test_sentencepiece_default_normalizer(tmp_path):
    """A model trained with SentencePiece's defaults (character map, extra whitespace removed) is reproduced too
    (decoding then gives sentencepiece's normalised text, not the input)."""
    d = train_spm(tmp_path / "tok", llama_style=False)
    tok = sentencepiece_tokenizer(d)
    assert tok is not None
    assert_same_as_sentencepiece(tok, d / "tokenizer.model", exact_text=False)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert sp.decode(sp.encode("  a  b ")) == "a b" == tok.decode(tok.encode("  a  b "))


def test_without_sentencepiece_the_warning_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece -> ImportError
    with pytest.warns(UserWarning, match=r"pip install 'bittern\[sentencepiece\]'") as record:
        assert load_tokenizer_if_any(checkpoint) is None
    assert INSTALL_HINT in str(record[0].message) and "sentencepiece" in str(record[0].message)
    with pytest.warns(UserWarning, match="without a tokenizer"):
        out = convert(checkpoint, tmp_path / "bittern")
    assert not (out / "tokenizer.json").exists()
    assert from_pretrained(out).tokenizer is None


def test_not_a_sentencepiece_model(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"\xff\x00 definitely not a protobuf \x12")
    with pytest.warns(UserWarning, match="without a tokenizer"):
        assert sentencepiece_tokenizer(d) is None
