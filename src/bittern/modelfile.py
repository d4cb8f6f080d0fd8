"""Packed model files: a directory with ``config.json``, ``model.safetensors`` and tokenizer files.

``config.json``::

    {"format": "bittern-packed", "format_version": 1,
     "model": {...ModelConfig...}, "layout": "2bit", "layout_revision": 1, "dtype": "float16",
     "tokenizer": "tokenizer.json" | null, "meta": {...free-form provenance...}}

``model.safetensors`` holds, for every ternary linear layer ``L``, ``L.weight_packed`` (uint8, in
``layout``; see :mod:`bittern.pack`) and ``L.weight_scale`` (float32, shape [1]); every other
parameter (embeddings, norms, an untied LM head) in ``dtype``. A tied LM head is not stored.

Files are read by :func:`read_safetensors`, which maps the file into memory (copy-on-write: nothing
is read until used, and nothing is unpickled) and checks every header entry against the file size, so
a truncated or corrupted file fails with a message naming the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configs import ModelConfig
from .layers import BitLinear, PackedLinear
from .model import Transformer, config_rope_tables
from .pack import TernaryWeight, get_layout

FORMAT = "bittern-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Packed layouts whose byte order changed since format_version 1: a file records the revision of its
# layout (``layout_revision``, 1 when absent). 1.67bit-lut revision 2 (bittern session 6) stores full
# 32-row groups in interleaved pairs, which revision-1 readers would misread.
LAYOUT_REVISIONS = {"1.67bit-lut": 2}


def layout_revision(layout: str) -> int:
    """The revision of ``layout`` this version of bittern writes and reads."""
    return LAYOUT_REVISIONS.get(layout, 1)


_MAX_HEADER = 100 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupted or does not match its config."""


# ----------------------------------------------------------------------------- safetensors reading


def read_safetensors(path: str | os.PathLike, mmap_file: bool = True,
                     offsets: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, memory-mapped (zero-copy) by default.

    Every header entry is validated (dtype, shape, offsets inside the file, sizes consistent);
    problems raise :class:`ModelFileError` naming the file and the tensor. ``offsets``, when given,
    receives each tensor's ``(byte offset in the file, byte count)``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    if size < 8:
        raise ModelFileError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise ModelFileError(f"{path}: header length {header_len} does not fit the file of {size} bytes (truncated or not safetensors)")
        raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: corrupted header ({e})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: corrupted header (not a JSON object)")
        data_start = 8 + header_len
        metadata = header.pop("__metadata__", None) or {}
        if size == data_start:
            buf = b""
        elif mmap_file:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        else:
            f.seek(0)
            buf = bytearray(f.read())
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{where}: malformed header entry {info!r}") from None
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise ModelFileError(f"{where}: invalid shape or offsets {info!r}")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize:
            raise ModelFileError(f"{where}: {end - begin} bytes stored but shape {shape} of {info['dtype']} needs {numel * itemsize}")
        if data_start + end > size:
            raise ModelFileError(f"{where}: data ends at byte {data_start + end} but the file has only {size} bytes (truncated)")
        if offsets is not None:
            offsets[name] = (data_start + begin, end - begin)
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        tensors[name] = t.view(dtype).reshape(shape) if (data_start + begin) % itemsize == 0 else t.clone().view(dtype).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (no partial files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        # mkstemp creates 0600, and some writers (safetensors' save_file) recreate the file 0600 too:
        # give the result the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- packed models


def _float_state(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[name] = p.detach().to(dtype).contiguous()
    return state


def save_packed(model: Transformer, directory: str | os.PathLike, layout: str = "2bit", dtype: str = "float16",
                tokenizer_file: str | os.PathLike | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Pack a BitNet model (training or already frozen) and write it as a bittern model directory."""
    directory = Path(directory)
    if model.config.linear != "bitnet":
        raise ValueError("only a BitNet model (linear='bitnet') can be saved packed")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}")
    get_layout(layout)
    tensors: dict[str, torch.Tensor] = {}
    float_params: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            weight = TernaryWeight.from_float(module.weight.detach().float(), layout)
        elif isinstance(module, PackedLinear):
            weight = module.ternary.to_layout(layout)
        else:
            continue
        tensors[f"{name}.weight_packed"] = weight.packed.contiguous()
        tensors[f"{name}.weight_scale"] = weight.scale.reshape(1).float()
    for name, p in _float_state(model, _DTYPE_NAMES[dtype]).items():
        owner = name.rsplit(".", 1)[0]
        if f"{owner}.weight_packed" in tensors and name == f"{owner}.weight":
            continue  # latent weight of a BitLinear: replaced by its packed codes
        float_params[name] = p
    tensors.update(float_params)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
              "layout": layout, "layout_revision": layout_revision(layout), "dtype": dtype, "tokenizer": None,
              "meta": meta or {}}
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    if tokenizer_file is not None:
        data = Path(tokenizer_file).read_bytes()
        atomic_write(directory / TOKENIZER_FILE, lambda p: p.write_bytes(data))
        config["tokenizer"] = TOKENIZER_FILE
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory, checked for format and version."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.exists():
        raise ModelFileError(f"{directory}: no such model directory")
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (a bittern model directory holds config.json and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a bittern packed model (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: format_version {config.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    layout = config.get("layout", "2bit")
    revision = config.get("layout_revision", 1)
    if isinstance(layout, str) and revision != layout_revision(layout):
        raise ModelFileError(f"{path}: its {layout} weights are in revision {revision!r} of that layout; this bittern "
                             f"reads revision {layout_revision(layout)} (re-create or re-convert the model)")
    try:
        config["model"] = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: invalid model section ({e})") from None
    return config


def load_packed(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, mmap_file: bool = True) -> Transformer:
    """Open a packed model directory as a frozen :class:`Transformer` (ternary codes stay memory-mapped).

    Float parameters are converted to ``dtype`` (pass the stored dtype to keep them mapped too).
    """
    directory = Path(directory)
    config = read_config(directory)
    cfg: ModelConfig = config["model"]
    layout = config.get("layout", "2bit")
    get_layout(layout)
    weights_path = directory / WEIGHTS_FILE
    tensors, _ = read_safetensors(weights_path, mmap_file)
    with torch.device("meta"):
        model = Transformer(cfg)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
        if name not in tensors:
            raise ModelFileError(f"{weights_path}: tensor {name!r} is missing")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise ModelFileError(f"{weights_path}: tensor {name!r} has shape {tuple(t.shape)}, config expects {tuple(shape)}")
        if t.dtype not in dtypes:
            raise ModelFileError(f"{weights_path}: tensor {name!r} has dtype {t.dtype}, expected {dtypes[0]}")
        used.add(name)
        return t

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, BitLinear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            cols = get_layout(layout).packed_cols(child.in_features)
            packed = take(f"{full}.weight_packed", (child.out_features, cols), (torch.uint8,))
            scale = take(f"{full}.weight_scale", (1,), (torch.float32,))
            if not bool(torch.isfinite(scale).all()) or float(scale) <= 0:
                raise ModelFileError(f"{weights_path}: tensor {full + '.weight_scale'!r} is not a positive finite scale")
            weight = TernaryWeight(packed, scale.reshape(()), child.out_features, child.in_features, layout)
            setattr(module, child_name, PackedLinear(weight, child.norm))
    float_state = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = take(name, tuple(p.shape), (torch.float32, torch.float16, torch.bfloat16))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{weights_path}: tensor {name!r} holds NaN or Inf")
        float_state[name] = nn.Parameter(t if t.dtype == dtype else t.to(dtype), requires_grad=False)
    extra = set(tensors) - used
    if extra:
        raise ModelFileError(f"{weights_path}: unexpected tensors not in the config: {sorted(extra)[:5]}")
    model.load_state_dict(float_state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    try:
        cos, sin = config_rope_tables(cfg)  # honours extra["rope_scaling"] of an imported HF model
    except ValueError as e:
        raise ModelFileError(f"{directory / CONFIG_FILE}: {e}") from None
    model.rope_cos, model.rope_sin = cos, sin
    model.requires_grad_(False)
    return model.eval()
