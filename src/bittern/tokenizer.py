"""Tokenizers: Hugging Face ``tokenizers`` byte-level BPE, trained here or loaded from disk.

A :class:`Tokenizer` wraps a ``tokenizer.json`` (ours, GPT-2's, LLaMA-3's, ...) plus, when present,
the ``tokenizer_config.json`` beside it (special tokens, chat template).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .errors import UsageError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids, with the end-of-sequence id and an optional chat template."""

    def __init__(self, hf: HFTokenizer, eos_token: str | None = None, bos_token: str | None = None,
                 chat_template: str | None = None) -> None:
        self.hf = hf
        self.eos_token = eos_token if eos_token is not None else (EOS_TOKEN if hf.token_to_id(EOS_TOKEN) is not None else None)
        self.bos_token = bos_token
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, if the tokenizer has one."""
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if any."""
        return None if self.bos_token is None else self.hf.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (parallel in Rust)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (and ``tokenizer_config.json`` when there is extra information)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        extra = {k: v for k, v in {"eos_token": self.eos_token, "bos_token": self.bos_token,
                                   "chat_template": self.chat_template}.items() if v is not None}
        if extra:
            (directory / "tokenizer_config.json").write_text(json.dumps(extra, indent=2))
        return directory / "tokenizer.json"


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.json`` (a file, or a directory holding it and maybe ``tokenizer_config.json``)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    file = directory / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{file}: no tokenizer file")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a plain Exception for a bad file
        raise UsageError(f"{file}: cannot read tokenizer ({e})") from None
    eos = bos = template = None
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"{config_path}: not a JSON object")
        eos, bos = _token_text(cfg.get("eos_token")), _token_text(cfg.get("bos_token"))
        template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
    return Tokenizer(hf, eos, bos, template)


def train_bpe(texts: Iterator[str] | list[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as its only special token."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, EOS_TOKEN)
