"""Write a bittern packed model directory tensor by tensor (same format as :func:`bittern.modelfile.save_packed`).

``save_packed`` gathers every tensor before writing; converting a large foreign checkpoint must not,
so this writer lays down the identical files (``config.json`` + ``model.safetensors``, read back by
:func:`bittern.modelfile.load_packed`) converting one tensor at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..model import Transformer
from ..modelfile import CONFIG_FILE, FORMAT, FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE, atomic_write, layout_revision
from ..pack import get_layout
from .assemble import TensorSource, as_source, linear_names
from .safetensors_io import TensorSpec, default_permissions, write_safetensors_streaming

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_packed_streaming(model: Transformer | TensorSource, directory: str | os.PathLike, layout: str = "2bit",
                          dtype: str = "float16", tokenizer_dir: str | os.PathLike | None = None,
                          meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a model or a :class:`~bittern.interop.assemble.TensorSource`) as a bittern packed
    directory, encoding and writing one tensor at a time."""
    if model.config.linear != "bitnet":
        raise ValueError("only a BitNet model (linear='bitnet') can be saved packed")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    lay = get_layout(layout)
    tdtype = _DTYPES[dtype]
    source = as_source(model)
    directory = Path(directory)
    specs: list[TensorSpec] = []
    for name in linear_names(source.config):
        out, inp = source.linear_shape(name)
        specs.append(TensorSpec(f"{name}.weight_packed", torch.uint8, (out, lay.packed_cols(inp)),
                                lambda name=name: source.ternary(name).to_layout(layout).packed.contiguous()))
        specs.append(TensorSpec(f"{name}.weight_scale", torch.float32, (1,),
                                lambda name=name: source.ternary(name).scale.reshape(1).float()))
    for name, shape in source.float_shapes().items():  # converted to tdtype piecewise as they are written
        specs.append(TensorSpec(name, tdtype, shape, lambda name=name: source.floats(name)))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
              "layout": layout, "layout_revision": layout_revision(layout), "dtype": dtype, "tokenizer": None,
              "meta": meta or {}}
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(directory / WEIGHTS_FILE, specs, {"format": FORMAT})
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        for fname in (TOKENIZER_FILE, "tokenizer_config.json"):
            if (src / fname).is_file():
                def copy(tmp: Path, fname: str = fname) -> None:
                    shutil.copyfile(src / fname, tmp)
                    default_permissions(tmp)
                atomic_write(directory / fname, copy)
        if (directory / TOKENIZER_FILE).is_file():
            config["tokenizer"] = TOKENIZER_FILE
    text = json.dumps(config, indent=2)

    def write_config(tmp: Path) -> None:
        tmp.write_text(text)
        default_permissions(tmp)
    atomic_write(directory / CONFIG_FILE, write_config)
    return directory
