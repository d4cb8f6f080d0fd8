"""bench/prefill_mix.py's driver on a tiny engine: how many steps a long prompt takes per setting."""

from __future__ import annotations

import pytest
import torch
from conftest import load_bench_script

from bittern.configs import get_config
from bittern.engine import Engine, EngineModel
from bittern.model import Transformer


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("prefill_mix")


@pytest.mark.parametrize("chunk", [None, 7, 1000])
def test_long_prompt_takes_one_step_per_chunk(bench, chunk) -> None:
    torch.manual_seed(0)
    engine = Engine(EngineModel.from_transformer(Transformer(get_config("tiny")).freeze(), head="int8"))
    if not engine.model.use_fast_path and chunk is not None:
        pytest.skip("native library not built")
    running, long, new, warm = 3, 30, 4, 2
    r = bench.one_run(engine, chunk, running, long, new, warm, seed=0)
    # whole: prefilled before the first step after its arrival, which samples its first token
    assert r["steps_after_arrival"] == (new if chunk is None else -(-long // chunk) + new - 1)
    assert r["generated"] == running * r["steps_after_arrival"] + new  # the running requests get a token every step
    assert 0 < r["p50_gap_s"] <= r["p99_gap_s"] <= r["max_gap_s"] and r["long_ttft_s"] > 0
