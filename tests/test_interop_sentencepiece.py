"""SentencePiece-style tokenizers (Llama-2 / 1bitLLM) in GGUF: exported as llama.cpp's "llama" tokenizer
(tokens, scores, token types, special ids) and rebuilt on import to encode and decode as the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
from tokenizers import SentencePieceBPETokenizer  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from bittern.configs import get_config  # noqa: E402
from bittern.interop import convert, from_pretrained  # noqa: E402
from bittern.interop.gguf_io import GGUFFile, load_gguf_tokenizer, save_gguf, sentencepiece_style  # noqa: E402
from bittern.model import Transformer  # noqa: E402
from bittern.tokenizer import load_tokenizer  # noqa: E402

CORPUS = [
    "BitNet b1.58 stores every weight as -1, 0 or +1 with one scale per tensor.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Ternary models run fast on CPUs: no multiplications, only additions and subtractions.",
    "Hello world! Converting models between formats should never change a single token.",
    "llama.cpp reads GGUF files; transformers reads safetensors checkpoints and tokenizer.json.",
] * 4
SAMPLES = [
    "Hello world!",
    "The lazy fox converts ternary weights, and the dog sleeps.",
    "formats: GGUF, safetensors",
    "multiplications and additions   with  several spaces",
    "tokens tokenizer tokenizers",
]
UNUSUAL = ["café naïve résumé", "emoji 🦩 and 中文", "line one\nline two\ttab"]  # need byte fallback
VOCAB = 600


def _train() -> SentencePieceBPETokenizer:
    tok = SentencePieceBPETokenizer(unk_token="<unk>")
    tok.train_from_iterator(CORPUS, vocab_size=260, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"],
                            show_progress=False)
    return tok


def metaspace_tokenizer(directory: Path) -> Path:
    """tokenizers' SentencePieceBPETokenizer: Metaspace pre-tokenizer, <unk> for unknown characters."""
    directory.mkdir(parents=True, exist_ok=True)
    _train().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def llama2_tokenizer(directory: Path) -> Path:
    """The Llama-2 tokenizer.json layout: <unk> <s> </s>, 256 <0xXX> byte tokens, then the BPE pieces;
    byte fallback; spaces made "▁" by a Prepend + Replace normalizer (no pre-tokenizer)."""
    trained = json.loads(_train().to_str())
    model = trained["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": model["merges"]},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    HFTokenizer.from_file(str(directory / "tokenizer.json"))  # a valid file
    return directory


def _model() -> Transformer:
    cfg = get_config("tiny", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                     max_seq_len=64)
    torch.manual_seed(0)
    return Transformer(cfg).freeze()


@pytest.fixture(params=["metaspace", "llama2"])
def exported(request, tmp_path):
    make = metaspace_tokenizer if request.param == "metaspace" else llama2_tokenizer
    tok_dir = make(tmp_path / "tok")
    path = save_gguf(_model(), tmp_path / "m.gguf", weight_type="F16", tokenizer_dir=tok_dir)
    return request.param, load_tokenizer(tok_dir), path


def test_detects_sentencepiece_style(tmp_path):
    assert sentencepiece_style(json.loads((metaspace_tokenizer(tmp_path / "a") / "tokenizer.json").read_text())) \
        == {"add_space_prefix": True}
    assert sentencepiece_style(json.loads((llama2_tokenizer(tmp_path / "b") / "tokenizer.json").read_text())) \
        == {"add_space_prefix": True}
    from bittern.tokenizer import train_bpe
    assert sentencepiece_style(json.loads(train_bpe(CORPUS, vocab_size=300).hf.to_str())) is None  # byte-level


def test_gguf_fields_are_llama_cpp_sentencepiece(exported):
    kind, original, path = exported
    g = GGUFFile(path)
    assert g.field("tokenizer.ggml.model") == "llama"
    tokens = g.field("tokenizer.ggml.tokens")
    scores = g.field("tokenizer.ggml.scores")
    types = g.field("tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == VOCAB
    vocab = original.hf.get_vocab(with_added_tokens=True)
    for text, i in vocab.items():
        assert tokens[i] == text
    T = gguf.TokenType
    assert types[vocab["<unk>"]] == T.UNKNOWN and g.field("tokenizer.ggml.unknown_token_id") == vocab["<unk>"]
    assert types[vocab["<s>"]] == T.CONTROL and g.field("tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert types[vocab["</s>"]] == T.CONTROL and g.field("tokenizer.ggml.eos_token_id") == vocab["</s>"]
    assert g.field("tokenizer.ggml.add_space_prefix") is True
    n_bytes = sum(1 for t in types if t == T.BYTE)
    assert n_bytes == (256 if kind == "llama2" else 0)
    assert types[len(vocab)] == T.UNUSED  # rows beyond the tokenizer's vocabulary
    # a merge made later scores lower: llama.cpp replays the merges in order
    merges = json.loads(original.hf.to_str())["model"]["merges"]
    first, last = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    assert scores[vocab[first]] > scores[vocab[last]]
    assert "tokenizer.ggml.merges" not in GGUFFile(path).reader.fields


def test_gguf_tokenizer_encodes_and_decodes_as_the_original(exported):
    kind, original, path = exported
    rebuilt = load_gguf_tokenizer(path)
    assert rebuilt is not None
    samples = SAMPLES + (UNUSUAL if kind == "llama2" else [])
    for text in samples:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.decode(ids) == original.decode(ids) == text
    assert (rebuilt.bos_token, rebuilt.eos_token) == ("<s>", "</s>")
    assert rebuilt.bos_id == original.bos_id and rebuilt.eos_id == original.eos_id
    with_bos = [original.bos_id] + original.encode("Hello")
    assert rebuilt.decode(with_bos, skip_special_tokens=False) == original.decode(with_bos, skip_special_tokens=False)
    assert rebuilt.decode(with_bos) == "Hello"


def test_byte_fallback_is_exercised(tmp_path):
    """The unusual samples really need byte tokens (so the test above checks them)."""
    tok = load_tokenizer(llama2_tokenizer(tmp_path / "tok"))
    ids = tok.encode(UNUSUAL[1])
    assert any(tok.hf.id_to_token(i).startswith("<0x") for i in ids)


def test_convert_with_sentencepiece_tokenizer(tmp_path):
    """bittern dir with a Llama-2 style tokenizer -> GGUF -> bittern: the tokenizer comes back."""
    from bittern.modelfile import save_packed
    d = save_packed(_model(), tmp_path / "model")
    tok_dir = llama2_tokenizer(tmp_path / "tok")
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        (d / fname).write_bytes((tok_dir / fname).read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["tokenizer"] = "tokenizer.json"
    (d / "config.json").write_text(json.dumps(cfg))
    gguf_path = convert(d, tmp_path / "m.gguf", to="gguf", weight_type="F16")
    _, tok, fmt = from_pretrained(gguf_path)
    assert fmt == "gguf" and tok is not None
    original = load_tokenizer(tok_dir)
    for text in SAMPLES + UNUSUAL:
        assert tok.encode(text) == original.encode(text)


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_the_original(exported):
    """Opt-in: llama.cpp's own tokenizer on the exported vocab gives the original token ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kind, original, path = exported
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in SAMPLES + (UNUSUAL if kind == "llama2" else []):
        ids = original.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids).decode() == " " + text or llm.detokenize(ids).decode() == text
