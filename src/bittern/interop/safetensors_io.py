"""Safetensors for interchange: sharded checkpoints read lazily, large files written tensor by tensor.

Reading goes through :func:`bittern.modelfile.read_safetensors` (memory-mapped, every header entry
checked against the file size), so opening even a sharded 8B checkpoint touches no weight bytes until
a tensor is used. Writing (:func:`write_safetensors_streaming`) lays down the header from the tensor
specs first and then asks for each tensor in turn, so peak memory is the largest single tensor.

The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to a multiple of 8, then
the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..modelfile import ModelFileError, atomic_write, read_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_CHUNK = 1 << 22  # values per piece when a float tensor is converted while being written

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointTensors:
    """Lazy name -> tensor access over a single or sharded safetensors checkpoint in a directory.

    Shards are opened (memory-mapped) only when one of their tensors is first requested.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        self._shards: dict[str, dict[str, torch.Tensor]] = {}
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelFileError(f"{index_path}: not a valid safetensors index ({e})") from None
            self._where: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
            for shard in set(self._where.values()):
                if Path(shard).name != shard:
                    raise ModelFileError(f"{index_path}: shard name {shard!r} must be a plain file name")
                if not (self.directory / shard).is_file():
                    raise ModelFileError(f"{index_path}: shard {shard!r} is missing from {self.directory}")
        else:
            single = self.directory / SINGLE_FILE
            if not single.is_file():
                found = sorted(p.name for p in self.directory.glob("*.safetensors"))
                if len(found) != 1:
                    raise ModelFileError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} "
                                         f"(found safetensors files: {found or 'none'}; .bin/pickle checkpoints are not read)")
                single = self.directory / found[0]
            tensors, _ = read_safetensors(single)
            self._shards[single.name] = tensors
            self._where = {name: single.name for name in tensors}
        self._layouts: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]] = {}

    def names(self) -> list[str]:
        """All tensor names, in the checkpoint's order."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (memory-mapped); a missing name raises :class:`ModelFileError`."""
        shard = self._where.get(name)
        if shard is None:
            raise ModelFileError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        if shard not in self._shards:
            tensors, _ = read_safetensors(self.directory / shard)
            self._shards[shard] = tensors
        tensors = self._shards[shard]
        if name not in tensors:
            raise ModelFileError(f"{self.directory / shard}: tensor {name!r} listed in the index is not in the shard")
        return tensors[name]


    def load(self, name: str) -> torch.Tensor:
        """A private copy of tensor ``name``, read from the file (for streaming conversion).

        Unlike :meth:`get` nothing stays mapped: once the caller drops the tensor its memory is freed,
        so reading a whole checkpoint this way holds one tensor at a time, not the file's pages.
        """
        view = self.get(name)  # validates the shard's header and the entry (touches no data)
        shard = self._where[name]
        if shard not in self._layouts:
            self._layouts[shard] = _layout(self.directory / shard)
        dtype, shape, offset, nbytes = self._layouts[shard][name]
        if (dtype, shape) != (view.dtype, tuple(view.shape)):
            raise ModelFileError(f"{self.directory / shard}: tensor {name!r} changed while being read")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with open(self.directory / shard, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(buf.numpy()))
            if got != nbytes:
                raise ModelFileError(f"{self.directory / shard}: tensor {name!r} is truncated "
                                     f"({got} of {nbytes} bytes)")
        return buf.view(dtype).reshape(shape)


def _layout(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute byte offset, byte count) of a safetensors file already validated
    by :func:`~bittern.modelfile.read_safetensors`."""
    from ..modelfile import _DTYPES

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = (int(o) for o in info["data_offsets"])
        out[name] = (_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]), 8 + header_len + begin, end - begin)
    return out


@dataclass
class TensorSpec:
    """One tensor to write: its name, dtype, shape and a function producing it when its turn comes.

    A float tensor may be produced in another float dtype: it is converted piece by piece as it is
    written (an overflow to Inf is an error).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def default_permissions(path: Path) -> None:
    """Give a temp-named output the mode a plain ``open(..., "w")`` would (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_streaming(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None) -> None:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            t = spec.produce()
            converts = t.dtype != spec.dtype and t.is_floating_point() and spec.dtype.is_floating_point
            if (t.dtype != spec.dtype and not converts) or tuple(t.shape) != tuple(spec.shape):
                raise ValueError(f"tensor {spec.name!r}: produced {t.dtype} {tuple(t.shape)}, "
                                 f"announced {spec.dtype} {spec.shape}")
            flat = t.detach().cpu().reshape(-1)
            step = _CHUNK if converts else max(flat.numel(), 1)
            for i in range(0, flat.numel(), step):
                part = flat[i:i + step]
                if converts:  # piecewise, so a converted copy of a large tensor never exists whole
                    part = part.to(spec.dtype)
                    if not bool(torch.isfinite(part).all()):
                        raise ValueError(f"tensor {spec.name!r} overflows {spec.dtype} (choose a wider dtype)")
                f.write(memoryview(part.contiguous().view(torch.uint8).numpy()))
                del part
            del t, flat
    default_permissions(path)


def write_safetensors_streaming(path: str | os.PathLike, specs: Iterable[TensorSpec],
                                metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time (temp file + rename: no partial output)."""
    path = Path(path)
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in safetensors output")
    atomic_write(path, lambda tmp: _write_streaming(tmp, specs, metadata))
    return path
