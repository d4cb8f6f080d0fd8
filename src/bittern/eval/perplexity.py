"""Perplexity and bits per byte of a model on text, with a sliding window.

Each text is tokenized whole and scored in windows of ``context`` tokens that start every ``stride``
tokens; a window scores only the tokens the previous windows have not scored yet, so every token is
scored exactly once, with up to ``context - stride`` tokens of earlier text as conditioning (the
method of the Hugging Face "Perplexity of fixed-length models" guide). With ``stride == context`` the
windows are disjoint and the first token of each window has nothing before it inside the window, so
it is not scored (the count of scored tokens says so): prefer ``stride < context``.

When the tokenizer has an end-of-text (or beginning-of-text) token it is put in front of each text so
that the first token is scored too. Bits per byte is ``total NLL / ln 2 / UTF-8 bytes of the scored
tokens``: the bytes of a token that is not scored (the first token when there is no start token, the
first token of each window when ``stride == context``) are left out, so that the NLL and the bytes
cover the same text; when every token is scored that is all the bytes of the text.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UsageError


@dataclass
class TextScore:
    """What scoring one text measured."""

    name: str
    tokens: int
    bytes: int
    nll: float

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per scored token)."""
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits over the UTF-8 bytes of the scored tokens."""
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")


@dataclass
class PerplexityResult:
    """Perplexity over several texts (pooled over all scored tokens) and per text."""

    context: int
    stride: int
    texts: list[TextScore] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens scored in all texts."""
        return sum(t.tokens for t in self.texts)

    @property
    def bytes(self) -> int:
        """UTF-8 bytes scored in all texts."""
        return sum(t.bytes for t in self.texts)

    @property
    def nll(self) -> float:
        """Summed negative log-likelihood (nats)."""
        return sum(t.nll for t in self.texts)

    @property
    def perplexity(self) -> float:
        """exp(total NLL / total tokens)."""
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits over total UTF-8 bytes."""
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with the derived figures."""
        return {
            "context": self.context, "stride": self.stride, "tokens": self.tokens, "bytes": self.bytes,
            "nll": self.nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
            "texts": [dict(asdict(t), perplexity=t.perplexity, bits_per_byte=t.bits_per_byte) for t in self.texts],
        }


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_scored)`` over ``n_tokens`` ids: positions ``first_scored..end-1``
    are predicted from ``begin..position-1``; together they score positions 1..n-1 once each (except
    a window's first position when ``stride == context``)."""
    if context < 2:
        raise ValueError("context must be at least 2 tokens")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    plan = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


def unscored_positions(n_tokens: int, context: int, stride: int) -> list[int]:
    """Positions of ``n_tokens`` ids that :func:`window_plan` does not score (always 0, and with
    ``stride == context`` the first position of each later window)."""
    scored = [False] * n_tokens
    for _, end, first in window_plan(n_tokens, context, stride):
        scored[first:end] = [True] * (end - first)
    return [i for i, s in enumerate(scored) if not s]


def token_bytes(tokenizer: Any, ids: list[int], pos: int, start: int = 0, lookback: int = 8) -> int:
    """UTF-8 bytes that the token at ``pos`` adds to the text of ``ids[start:]``.

    Measured as the growth of the decoded text when the token is appended to up to ``lookback``
    tokens before it, so a character split over several byte-level tokens and a word-start marker
    that the decoder drops at the start of a text are counted as in the whole text.
    """
    a = max(start, pos - lookback)

    def size(part: list[int]) -> int:
        return len(tokenizer.decode(part, skip_special_tokens=False).encode("utf-8")) if part else 0

    return max(size(ids[a:pos + 1]) - size(ids[a:pos]), 0)


@torch.no_grad()
def score_ids(model: torch.nn.Module, ids: list[int], context: int, stride: int, batch_size: int = 1,
              progress: tqdm | None = None) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored tokens of one id sequence under ``model``.

    ``model(tokens [B, T]) -> logits [B, T, V]``; windows of equal length are batched together.
    """
    plan = window_plan(len(ids), context, stride)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    data = torch.tensor(ids, dtype=torch.long, device=device)
    total, count = 0.0, 0
    i = 0
    while i < len(plan):
        length = plan[i][1] - plan[i][0]
        group = [plan[i]]
        while len(group) < batch_size and i + len(group) < len(plan) and plan[i + len(group)][1] - plan[i + len(group)][0] == length:
            group.append(plan[i + len(group)])
        tokens = torch.stack([data[b:e] for b, e, _ in group])
        logprobs = F.log_softmax(model(tokens)[:, :-1].float(), dim=-1)
        targets = tokens[:, 1:]
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T-1]; column j predicts token j+1
        for row, (b, e, first) in enumerate(group):
            total += float(nll[row, first - b - 1:].double().sum())
            count += e - first
        if progress is not None:
            progress.update(sum(e - first for _, e, first in group))
        i += len(group)
    return total, count


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Iterable[tuple[str, str]] | Iterable[str],
               context: int | None = None, stride: int | None = None, batch_size: int = 1,
               show_progress: bool = True) -> PerplexityResult:
    """Perplexity and bits per byte of ``model`` on ``texts`` (strings or ``(name, text)`` pairs).

    ``context`` defaults to the model's context length, ``stride`` to half the context (None: the
    default; 0 is refused like any other value below the minimum). ``bytes`` counts the UTF-8 bytes
    of the scored tokens only (see the module docstring).
    """
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if context is None:
        context = max_len or 1024
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if max_len is not None and context > max_len:
        raise ValueError(f"context {context} exceeds the model's context length {max_len}")
    if stride is None:
        stride = max(1, context // 2)
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    items = [(t if isinstance(t, tuple) else (f"text{i}", t)) for i, t in enumerate(texts)]
    if not items:
        raise UsageError("no text to score")
    start_id = getattr(tokenizer, "bos_id", None)
    if start_id is None:
        start_id = getattr(tokenizer, "eos_id", None)
    prefix = [] if start_id is None else [int(start_id)]
    encoded = []
    for name, text in items:
        ids = tokenizer.encode(text)
        if not ids:
            raise UsageError(f"{name}: no tokens (empty text)")
        whole = prefix + ids
        nbytes = len(text.encode("utf-8"))
        for pos in unscored_positions(len(whole), context, stride):
            if pos >= len(prefix):  # the start token is not text: it has no bytes to leave out
                nbytes -= token_bytes(tokenizer, whole, pos, start=len(prefix))
        encoded.append((name, whole, nbytes))
    result = PerplexityResult(context, stride)
    total = sum(len(ids) - 1 for _, ids, _ in encoded)
    with tqdm(total=total, desc="perplexity", unit="tok", disable=not show_progress) as bar:
        for name, ids, nbytes in encoded:
            if len(ids) < 2:
                raise UsageError(f"{name}: too short to score (one token and no start-of-text token)")
            nll, n = score_ids(model, ids, context, stride, batch_size, bar)
            result.texts.append(TextScore(name, n, max(nbytes, 0), nll))
    return result


def read_texts(files: list[str | os.PathLike]) -> list[tuple[str, str]]:
    """``(path, text)`` for each UTF-8 file; missing or undecodable files raise :class:`UsageError`."""
    if not files:
        raise UsageError("give at least one text file to score")
    out = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        try:
            with open(path, encoding="utf-8", newline="") as fh:  # the file's bytes as they are (CRLF stays)
                out.append((str(path), fh.read()))
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e})") from None
    return out


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The model directory to use: ``model``, else ``bittern.train.default_model_path()`` when it exists."""
    if model:
        return Path(model)
    try:
        from ..train import default_model_path  # type: ignore[attr-defined]
    except ImportError:
        default_model_path = None
    path = default_model_path() if default_model_path is not None else None
    if not path:
        raise UsageError("no model given: pass --model DIR (a bittern packed model directory)")
    return Path(path)


def load_model_and_tokenizer(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """A packed bittern model directory opened as (frozen Transformer, Tokenizer)."""
    from ..modelfile import load_packed, read_config
    from ..tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = load_packed(model_dir, dtype=dtype)
    tok_name = config.get("tokenizer") or "tokenizer.json"
    tok_path = model_dir / tok_name
    if not tok_path.is_file():
        raise UsageError(f"{model_dir}: no {tok_name} in the model directory (save it with a tokenizer)")
    tokenizer = load_tokenizer(tok_path)
    check_vocab(model, tokenizer, tok_path)
    return model, tokenizer


def check_vocab(model: torch.nn.Module, tokenizer: Any, where: str | os.PathLike = "the tokenizer") -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding for (UsageError naming both sizes)."""
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if model_vocab is not None and tok_vocab is not None and int(tok_vocab) > int(model_vocab):
        raise UsageError(f"{where}: the tokenizer has {tok_vocab} ids but the model's vocabulary has only "
                         f"{model_vocab}; use the tokenizer the model was trained with")
