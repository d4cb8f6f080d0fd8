"""Interoperability: Hugging Face checkpoints and GGUF files in and out of bittern.

``from_pretrained(source)`` opens any of: a bittern packed model directory, a Hugging Face checkpoint
directory (``bitnet`` / ``llama`` model types; packed or latent weights), a ``.gguf`` file, or a Hub
repo id (downloaded). ``convert(src, dst, to=...)`` writes a bittern directory, a HF checkpoint or a
GGUF file. See docs/interop.md for the formats and how each was verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UsageError
from ..model import Transformer
from ..modelfile import FORMAT, load_packed
from ..output_dir import check_output_path, fresh_output_dir
from .bittern_io import save_packed_streaming
from .gguf_io import load_gguf, load_gguf_tokenizer, save_gguf
from .hf import hf_source, load_hf, load_tokenizer_if_any, save_hf
from .hub import download, looks_like_repo_id

__all__ = ["LoadedModel", "from_pretrained", "convert", "detect_format", "load_hf", "save_hf", "load_gguf",
           "save_gguf"]

TARGETS = ("bittern", "hf", "gguf")


class LoadedModel(NamedTuple):
    """A frozen packed model, its tokenizer (or None) and the format it was read from."""

    model: Transformer
    tokenizer: object | None
    source_format: str


def detect_format(path: str | os.PathLike) -> str:
    """``"bittern"``, ``"hf"`` or ``"gguf"`` for a local path; UsageError when it is none of them."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return "gguf"
        raise UsageError(f"{path}: a file that is not GGUF (give a model directory or a .gguf file)")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UsageError(f"{path}: no config.json (neither a bittern nor a Hugging Face model directory)")
        import json
        try:
            fmt = json.loads(config.read_text()).get("format")
        except (ValueError, AttributeError):
            fmt = None
        return "bittern" if fmt == FORMAT else "hf"
    raise UsageError(f"{path}: no such file or directory")


def from_pretrained(source: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                    revision: str | None = None) -> LoadedModel:
    """Open a model from a local path (bittern dir, HF dir, .gguf) or a Hub repo id, as a frozen packed model.

    Float parameters are converted to ``dtype``; ``None`` keeps them as stored (memory-mapped where the
    source allows), which is what conversion uses.

    Returns ``(model, tokenizer, source_format)``; the tokenizer is None when the source has none.
    """
    src = str(source)
    path = Path(src).expanduser()
    if not path.exists() and looks_like_repo_id(src):
        path = download(src, revision=revision)
    fmt = detect_format(path)
    if fmt == "bittern":
        if dtype is None:
            from ..modelfile import _DTYPE_NAMES, read_config
            dtype = _DTYPE_NAMES.get(read_config(path).get("dtype"), torch.float32)
        return LoadedModel(load_packed(path, dtype=dtype), load_tokenizer_if_any(path), fmt)
    if fmt == "hf":
        return LoadedModel(load_hf(path, dtype=dtype), load_tokenizer_if_any(path), fmt)
    return LoadedModel(load_gguf(path, dtype=dtype), load_gguf_tokenizer(path), fmt)


def _tokenizer_dir(tokenizer: object | None, tmp: Path) -> Path | None:
    if tokenizer is None:
        return None
    tokenizer.save(tmp)
    return tmp


def convert(source: str | os.PathLike, dest: str | os.PathLike, to: str | None = None, layout: str = "2bit",
            weight_type: str = "TQ2_0", dtype: str | None = None, hf_linear_class: str = "bitlinear",
            revision: str | None = None, overwrite: bool = False) -> Path:
    """Convert ``source`` (anything :func:`from_pretrained` opens) to ``to`` at ``dest``.

    ``to``: None means ``"gguf"`` when ``dest`` ends in ``.gguf``, else ``"bittern"``.
    ``to="bittern"``: packed model directory (``layout``, float ``dtype`` default float16);
    ``to="hf"``: transformers checkpoint directory (``dtype`` default bfloat16, ``hf_linear_class``);
    ``to="gguf"``: a GGUF file (``weight_type`` TQ2_0/TQ1_0/F16; ``dtype`` float16 or float32 for embeddings).
    A Hugging Face source is streamed tensor by tensor (peak memory about the largest tensor). The output
    appears only when it is complete; an existing ``dest`` is refused unless ``overwrite`` (then replaced
    whole: no file of the old model stays beside the new one).
    """
    import tempfile

    if to is None:
        to = "gguf" if str(dest).endswith(".gguf") else "bittern"
    if to not in TARGETS:
        raise UsageError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    dest = Path(dest)
    if dest.resolve() == Path(source).expanduser().resolve():
        raise UsageError("destination and source are the same path")
    local = [Path(source).expanduser()] if Path(source).expanduser().exists() else []
    check_output_path(dest, overwrite, "file" if to == "gguf" else "directory", sources=local)
    path = Path(source).expanduser()
    if not path.exists() and looks_like_repo_id(str(source)):
        path = download(str(source), revision=revision)
    if detect_format(path) == "hf":
        # streamed: each tensor is read, converted and written in turn; the model is never built
        model, tokenizer, fmt = hf_source(path), load_tokenizer_if_any(path, strict=True), "hf"
    else:
        if detect_format(path) == "bittern":
            load_tokenizer_if_any(path, strict=True)  # a damaged tokenizer stops the conversion, not dropped
        model, tokenizer, fmt = from_pretrained(path, dtype=None)
    with tempfile.TemporaryDirectory(prefix="bittern-tok-") as tmp:
        tok_dir = _tokenizer_dir(tokenizer, Path(tmp))
        if to == "bittern":
            with fresh_output_dir(dest, overwrite) as out:
                save_packed_streaming(model, out, layout=layout, dtype=dtype or "float16", tokenizer_dir=tok_dir,
                                      meta={"converted_from": str(source), "source_format": fmt})
            return dest
        if to == "hf":
            with fresh_output_dir(dest, overwrite) as out:
                save_hf(model, out, dtype=dtype or "bfloat16", linear_class=hf_linear_class, tokenizer_dir=tok_dir)
            return dest
        ftype = {None: "F16", "float16": "F16", "float32": "F32"}.get(dtype)
        if ftype is None:
            raise UsageError("for GGUF, --dtype is float16 or float32 (the embeddings' type)")
        return save_gguf(model, dest, weight_type=weight_type, float_type=ftype, tokenizer_dir=tok_dir)
