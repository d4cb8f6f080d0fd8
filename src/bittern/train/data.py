"""Token shards: text, JSONL or a directory of them → memory-mapped token files with a validation split.

A shard directory holds::

    meta.json            {"format": "bittern-shards", "dtype": "uint16"|"uint32", "vocab_size": V,
                          "eos_id": E, "split": "document"|"tail", "splits": {"train": {...}, "val": {...}}}
    train_000.bin ...    raw little-endian token ids, documents concatenated, each followed by EOS
    train_000.docs.npy   int64 start offset of every document in that shard
    val_000.bin ...
    tokenizer.json       the tokenizer that made them

Documents are never split across shards. A ``.txt`` file is one document; each line of a ``.jsonl``
file is one (its ``"text"`` field); a directory contributes every ``.txt``/``.jsonl`` under it.
The validation split is by whole document (every k-th document) or by the contiguous tail of each
document (``split="tail"``), never by random lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import UsageError
from ..modelfile import atomic_write
from ..tokenizer import Tokenizer

FORMAT = "bittern-shards"
META_FILE = "meta.json"
_CHUNK_CHARS = 1 << 20


# ----------------------------------------------------------------------------- reading documents


def list_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The ``.txt``/``.jsonl`` files named by ``paths`` (directories searched recursively, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl", ".text"))
            if not found:
                raise UsageError(f"{p}: directory holds no .txt or .jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return files


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """``(name, text)`` of every document in the files (JSONL: one per line, its ``text_field``)."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for i, raw in enumerate(fh, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise UsageError(f"{f}:{i}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"{f}:{i}: not valid JSON ({e})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise UsageError(f"{f}:{i}: expected an object with a string field {text_field!r}")
                    yield f"{f}:{i}", obj[text_field]
        else:
            try:
                yield str(f), f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{f}: not UTF-8 text ({e})") from None


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Split at line ends into pieces of about ``size`` characters (so long texts encode in parallel)."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
        out.append(text[start:end])
        start = end
    return out


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of one document (long documents encoded in line-aligned chunks, in parallel)."""
    pieces = _chunks(text)
    ids = [np.asarray(p, dtype=np.int64) for p in tokenizer.encode_batch(pieces)] if pieces else []
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- writing shards


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.buf: list[np.ndarray] = []
        self.starts: list[int] = []
        self.count = 0
        self.tokens = 0
        self.docs = 0

    def add(self, ids: np.ndarray) -> None:
        if self.count and self.count + len(ids) > self.shard_tokens:
            self.flush()
        self.starts.append(self.count)
        self.buf.append(ids.astype(self.dtype))
        self.count += len(ids)
        self.tokens += len(ids)
        self.docs += 1

    def flush(self) -> None:
        if not self.count:
            return
        name = f"{self.split}_{len(self.files):03d}"
        data = np.concatenate(self.buf)
        starts = np.asarray(self.starts, dtype=np.int64)
        atomic_write(self.out_dir / f"{name}.bin", lambda p: data.tofile(p))
        atomic_write(self.out_dir / f"{name}.docs.npy", lambda p: np.save(open(p, "wb"), starts, allow_pickle=False))
        self.files.append({"bin": f"{name}.bin", "docs": f"{name}.docs.npy", "tokens": int(len(data)), "documents": len(starts)})
        self.buf, self.starts, self.count = [], [], 0


def prepare_shards(inputs: Iterable[str | os.PathLike], tokenizer: Tokenizer, out_dir: str | os.PathLike,
                   val_fraction: float = 0.05, split: str = "document", train_only: Iterable[str | os.PathLike] = (),
                   shard_tokens: int = 1 << 27, text_field: str = "text", tokenizer_file: str | os.PathLike | None = None) -> dict:
    """Tokenize documents into train/val shards in ``out_dir`` and return the written ``meta.json`` content.

    ``split="document"`` sends every ``round(1/val_fraction)``-th document to validation;
    ``split="tail"`` sends the last ``val_fraction`` of every document's tokens (cut at a token
    boundary). Files in ``train_only`` are used only for training (e.g. a text quoting another).
    """
    if split not in ("document", "tail"):
        raise UsageError(f"split must be 'document' or 'tail', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eos = tokenizer.eos_id
    if eos is None:
        raise UsageError("the tokenizer has no end-of-sequence token (needed to separate documents)")
    vocab = tokenizer.vocab_size
    dtype = np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list_inputs(inputs)
    only_train = {p.resolve() for p in list_inputs(train_only)} if train_only else set()
    files += [p for p in list_inputs(train_only) if p.resolve() not in {f.resolve() for f in files}] if train_only else []
    train = _ShardWriter(out, "train", dtype, shard_tokens)
    val = _ShardWriter(out, "val", dtype, shard_tokens)
    every = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    n_doc = 0
    for f in files:
        for _, text in iter_documents([f], text_field):
            if not text:  # an empty file or record adds nothing (not even a document separator)
                continue
            ids = np.append(encode_document(tokenizer, text), eos)
            if f.resolve() in only_train or val_fraction == 0:
                train.add(ids)
            elif split == "document":
                (val if (n_doc % every) == every - 1 else train).add(ids)
                n_doc += 1
            else:
                cut = len(ids) - int(round(len(ids) * val_fraction))
                if cut > 0:
                    train.add(ids[:cut])
                if cut < len(ids):
                    val.add(ids[cut:])
    train.flush()
    val.flush()
    if not train.tokens:
        raise UsageError("no training tokens: the inputs are empty")
    meta = {"format": FORMAT, "format_version": 1, "dtype": dtype.name, "vocab_size": vocab, "eos_id": eos,
            "split": split, "val_fraction": val_fraction, "inputs": [str(f) for f in files],
            "train_only": sorted(str(p) for p in only_train), "tokenizer": None,
            "splits": {"train": {"files": train.files, "tokens": train.tokens, "documents": train.docs},
                       "val": {"files": val.files, "tokens": val.tokens, "documents": val.docs}}}
    if tokenizer_file is not None:
        data = Path(tokenizer_file).read_bytes()
        atomic_write(out / "tokenizer.json", lambda p: p.write_bytes(data))
        meta["tokenizer"] = "tokenizer.json"
    else:
        tokenizer.hf.save(str(out / "tokenizer.json"))
        meta["tokenizer"] = "tokenizer.json"
    atomic_write(out / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return meta


# ----------------------------------------------------------------------------- reading shards


def read_meta(shard_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a shard directory, checked."""
    path = Path(shard_dir) / META_FILE
    if not path.is_file():
        raise UsageError(f"{shard_dir}: not a shard directory (no {META_FILE}; make one with `bittern data prepare`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path}: not a bittern shard directory")
    return meta


@dataclass
class TokenSplit:
    """One split's tokens, memory-mapped: ``tokens`` (concatenated documents) and ``doc_starts``."""

    tokens: np.ndarray
    doc_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def load_split(shard_dir: str | os.PathLike, split: str = "train") -> TokenSplit:
    """All shards of one split, memory-mapped (a single shard is mapped without copying)."""
    meta = read_meta(shard_dir)
    d = Path(shard_dir)
    info = meta["splits"].get(split)
    if info is None or not info["files"]:
        raise UsageError(f"{shard_dir}: the {split!r} split is empty")
    dtype = np.dtype(meta["dtype"])
    arrays, starts, offset = [], [], 0
    for f in info["files"]:
        path = d / f["bin"]
        size = path.stat().st_size if path.is_file() else -1
        if size != f["tokens"] * dtype.itemsize:
            raise UsageError(f"{path}: expected {f['tokens']} tokens ({f['tokens'] * dtype.itemsize} bytes), found {size} bytes")
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        starts.append(np.load(d / f["docs"], allow_pickle=False) + offset)
        offset += f["tokens"]
    tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return TokenSplit(tokens, np.concatenate(starts))


class WindowLoader:
    """Deterministic batches of ``seq_len + 1``-token windows, resumable from ``state_dict()``.

    The token stream is cut into non-overlapping windows; each epoch visits them in a permutation
    seeded by ``(seed, epoch)``. A global batch is the next ``batch_size`` windows; rank ``r`` of
    ``world`` takes rows ``r::world`` of it, so any world size sees the same global batches.
    """

    def __init__(self, split: TokenSplit, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.data = split.tokens
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.num_windows = (len(self.data) - 1) // seq_len
        if self.num_windows < 1:
            raise UsageError(f"only {len(self.data)} tokens: too few for one window of {seq_len + 1}")
        self.epoch, self.index = 0, 0
        self._order: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
                self._order = torch.randperm(self.num_windows, generator=g).numpy()
            else:
                self._order = np.arange(self.num_windows)
        return self._order

    def next_batch(self, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets ``[batch_size / world, seq_len]`` (int64) of this rank's share."""
        starts = []
        while len(starts) < self.batch_size:
            order = self._permutation()
            take = min(self.batch_size - len(starts), self.num_windows - self.index)
            starts.extend(order[self.index:self.index + take].tolist())
            self.index += take
            if self.index >= self.num_windows:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        mine = starts[rank::world]
        L = self.seq_len
        rows = np.stack([np.asarray(self.data[s * L: s * L + L + 1], dtype=np.int64) for s in mine])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict[str, int]:
        """Position in the stream (epoch, window index)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        if state.get("num_windows", self.num_windows) != self.num_windows:
            raise UsageError(f"the data changed since the checkpoint ({state['num_windows']} windows then, {self.num_windows} now)")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def eval_windows(split: TokenSplit, seq_len: int, max_windows: int) -> torch.Tensor:
    """The first ``max_windows`` non-overlapping ``seq_len + 1`` windows of a split, ``[n, seq_len + 1]``."""
    n = min(max_windows, (len(split.tokens) - 1) // seq_len)
    if n < 1:
        raise UsageError(f"validation split has {len(split.tokens)} tokens: too few for one window of {seq_len + 1}")
    return torch.from_numpy(np.stack([np.asarray(split.tokens[i * seq_len: i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)]))


def text_bytes(tokenizer: Tokenizer, tokens: torch.Tensor) -> int:
    """UTF-8 bytes of the text ``tokens`` (targets of eval windows) decode to (specials skipped), for bits per byte."""
    return len(tokenizer.decode(tokens.flatten().tolist(), skip_special_tokens=True).encode("utf-8"))
