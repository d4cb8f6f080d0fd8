"""Random-weight packed models of any named shape, written tensor by tensor (for benchmarks).

The file is the ordinary bittern model directory (``config.json`` + ``model.safetensors``, see
:mod:`bittern.modelfile`). The safetensors header is computed from the config and written first, then
each tensor is generated and appended, so peak memory stays at one tensor's worth even for a
70B-shaped model. Ternary rows are drawn from a pool of random rows per tensor (the speed of a
product does not depend on which ternary codes it reads), packed with the layout's reference pack.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..configs import ModelConfig
from ..modelfile import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, atomic_write, layout_revision
from ..pack import get_layout

_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
POOL_ROWS = 512


def _tensor_plan(cfg: ModelConfig, layout: str, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    lay = get_layout(layout)
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = [("embed_tokens.weight", dtype, (cfg.vocab_size, cfg.hidden_size))]
    h, f = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        if not cfg.bitlinear_norm:
            plan.append((f"{p}.input_layernorm.weight", dtype, (h,)))
            plan.append((f"{p}.post_attention_layernorm.weight", dtype, (h,)))
        if cfg.subln:
            plan.append((f"{p}.self_attn.attn_sub_norm.weight", dtype, (h,)))
            plan.append((f"{p}.mlp.ffn_sub_norm.weight", dtype, (f,)))
        for name, (out_f, in_f) in cfg.linear_shapes().items():
            owner = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            full = f"{p}.{owner}.{name}"
            plan.append((f"{full}.weight_packed", torch.uint8, (out_f, lay.packed_cols(in_f))))
            plan.append((f"{full}.weight_scale", torch.float32, (1,)))
            if cfg.bitlinear_norm:
                plan.append((f"{full}.norm.weight", dtype, (in_f,)))
    plan.append(("norm.weight", dtype, (h,)))
    if not cfg.tie_embeddings:
        plan.append(("lm_head.weight", dtype, (cfg.vocab_size, h)))
    return plan


def _chunks(name: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str, cfg: ModelConfig,
            g: torch.Generator) -> Iterator[torch.Tensor]:
    """The tensor's bytes in row chunks."""
    if name.endswith("weight_packed"):
        out_f, in_f = _linear_shape(name, cfg)
        pack = get_layout(layout).pack
        # chunks of whole 64-row units (the r4 layouts need 4 rows, 1.67bit-lut pairs of 32-row groups, whose
        # blocks are interleaved), the remainder last
        pool_rows = min(POOL_ROWS, out_f - out_f % 64) or out_f
        pool = pack(torch.randint(-1, 2, (pool_rows, in_f), dtype=torch.int8, generator=g))
        done = 0
        while out_f - done >= pool_rows:
            yield pool
            done += pool_rows
        if done < out_f:
            yield pack(torch.randint(-1, 2, (out_f - done, in_f), dtype=torch.int8, generator=g))
    elif name.endswith("weight_scale"):
        out_f, in_f = _linear_shape(name, cfg)
        yield torch.tensor([1.5 / math.sqrt(in_f)], dtype=torch.float32)
    elif name.endswith("norm.weight"):
        yield torch.ones(shape, dtype=dtype)
    else:  # embedding / head: N(0, 1) rows scaled like a trained table
        rows, cols = shape
        for a in range(0, rows, 4096):
            n = min(4096, rows - a)
            yield (torch.randn(n, cols, generator=g) * 0.02).to(dtype)


def _linear_shape(name: str, cfg: ModelConfig) -> tuple[int, int]:
    short = name.split(".")[-2]
    return cfg.linear_shapes()[short]


def create_random_model(directory: str | os.PathLike, config: ModelConfig, layout: str = "1.67bit-lut",
                        dtype: str = "float16", seed: int = 0,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a random-weight packed model of ``config``'s shape to ``directory``; returns the directory.

    Memory use is one tensor chunk at a time; ``progress(bytes_written, total_bytes)`` is called per tensor.
    """
    if config.linear != "bitnet":
        raise ValueError("only BitNet (linear='bitnet') shapes can be packed")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}")
    get_layout(layout)
    directory = Path(directory)
    tdtype = _DTYPE_NAMES[dtype]
    plan = _tensor_plan(config, layout, tdtype)
    header: dict[str, object] = {"__metadata__": {"format": FORMAT}}
    offset = 0
    for name, dt, shape in plan:
        n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    total = offset
    g = torch.Generator().manual_seed(seed)

    def write(path: Path) -> None:
        written = 0
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, dt, shape in plan:
                start = written
                for chunk in _chunks(name, shape, dt, layout, config, g):
                    data = chunk.contiguous().view(torch.uint8).numpy().tobytes()
                    f.write(data)
                    written += len(data)
                expect = header[name]["data_offsets"][1]  # type: ignore[index]
                if written != expect:
                    raise RuntimeError(f"internal error: {name} wrote {written - start} bytes, planned {expect - start}")
                if progress is not None:
                    progress(written, total)

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, write)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict(), "layout": layout,
            "layout_revision": layout_revision(layout), "dtype": dtype, "tokenizer": None, "meta": {"random": True, "seed": seed, "created_by": "bittern model create"}}
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return directory
