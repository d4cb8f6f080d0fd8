"""Fuzzing the GGUF and safetensors readers with mutated files: every outcome is a model or a clear error.

The fast run (in the suite) tries a modest number of cases; ``pytest -m slow tests/test_interop_fuzz.py``
runs a few thousand (set BITTERN_FUZZ_CASES to change the count).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bittern.configs import get_config  # noqa: E402
from bittern.interop.gguf_io import load_gguf, save_gguf  # noqa: E402
from bittern.interop.hf import load_hf  # noqa: E402
from bittern.interop.safetensors_io import CheckpointTensors  # noqa: E402
from bittern.model import Transformer  # noqa: E402
from bittern.modelfile import ModelFileError  # noqa: E402

FAST_CASES = 60
SLOW_CASES = int(os.environ.get("BITTERN_FUZZ_CASES", "3000"))
CFG = get_config("tiny", hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2, num_layers=1,
                 vocab_size=64, max_seq_len=32)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Iterator[dict[str, bytes]]:
    from bittern import kernels

    previous = kernels._active
    kernels.set_backend("reference")  # for this module only: later modules expect the native backend
    d = tmp_path_factory.mktemp("fuzzseed")
    torch.manual_seed(0)
    model = Transformer(CFG).freeze()
    gguf_bytes = save_gguf(model, d / "m.gguf", weight_type="TQ2_0").read_bytes()
    from bittern.interop.hf import save_hf
    hf_dir = save_hf(model, d / "hf", dtype="float16")
    yield {"gguf": gguf_bytes, "safetensors": (hf_dir / "model.safetensors").read_bytes(),
           "config": (hf_dir / "config.json").read_bytes()}
    kernels._active = previous


def _mutations():
    flip = st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255))
    cut = st.tuples(st.just("cut"), st.integers(0, 10**9), st.just(0))
    put = st.tuples(st.just("put32"), st.integers(0, 10**9), st.integers(0, 2**32 - 1))
    return st.lists(st.one_of(flip, cut, put), min_size=1, max_size=4)


def _mutate(data: bytes, ops, header_bias: bool) -> bytes:
    b = bytearray(data)
    for kind, pos, value in ops:
        if not b:
            break
        # most interesting bytes are in the header: bias half the positions there
        limit = min(len(b), 4096) if header_bias and pos % 2 == 0 else len(b)
        i = pos % limit
        if kind == "flip":
            b[i] ^= value
        elif kind == "cut":
            del b[i:]
        else:
            b[i:i + 4] = value.to_bytes(4, "little")
    return bytes(b)


def _check_gguf(tmp: Path, data: bytes) -> str:
    p = tmp / "fuzz.gguf"
    p.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_gguf(p)
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
        return "loaded"
    except ModelFileError:
        return "error"


def _check_safetensors(tmp: Path, data: bytes, config: bytes) -> str:
    d = tmp / "hf"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(data)
    (d / "config.json").write_bytes(config)
    try:
        CheckpointTensors(d)
        model = load_hf(d)
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
        return "loaded"
    except ModelFileError:
        return "error"


def _run(seeds: dict[str, bytes], tmp: Path, cases: int, verbose: bool = False) -> dict[str, int]:
    counts = {"gguf:loaded": 0, "gguf:error": 0, "safetensors:loaded": 0, "safetensors:error": 0}

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(["gguf", "safetensors"]), ops=_mutations(), header_bias=st.booleans())
    def one(kind, ops, header_bias):
        data = _mutate(seeds[kind], ops, header_bias)
        if kind == "gguf":
            outcome = _check_gguf(tmp, data)
        else:
            outcome = _check_safetensors(tmp, data, seeds["config"])
        counts[f"{kind}:{outcome}"] += 1
        done = sum(counts.values())
        if verbose and done % 250 == 0:
            print(f"fuzz: {done} cases, {counts}", flush=True)

    one()
    return counts


def test_fuzz_readers_fast(seeds, tmp_path):
    counts = _run(seeds, tmp_path, FAST_CASES)
    assert sum(counts.values()) >= FAST_CASES
    assert counts["gguf:error"] > 0 and counts["safetensors:error"] > 0  # the mutations do break files


def test_fuzz_truncation_every_region(seeds, tmp_path):
    """Cutting a file anywhere (header, metadata, tensor infos, data) is always a clear error."""
    for kind in ("gguf", "safetensors"):
        data = seeds[kind]
        step = max(1, len(data) // 97)
        for cut in list(range(0, min(len(data), 512), 7)) + list(range(512, len(data) - 32, step)):
            if kind == "gguf":
                assert _check_gguf(tmp_path, data[:cut]) == "error", (kind, cut)
            else:
                assert _check_safetensors(tmp_path, data[:cut], seeds["config"]) == "error", (kind, cut)


@pytest.mark.slow
def test_fuzz_readers_many(seeds, tmp_path):
    counts = _run(seeds, tmp_path, SLOW_CASES, verbose=True)
    print(f"\nfuzz outcomes over {sum(counts.values())} cases: {counts}")
    assert sum(counts.values()) >= SLOW_CASES
