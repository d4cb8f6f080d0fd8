"""The inference engine: fast generation from packed BitNet b1.58 models on CPU.

``Engine.load(path)`` opens a packed model directory memory-mapped; ``engine.generate(prompt, params)``,
``engine.stream(...)``, ``engine.generate_batch([...])`` and ``engine.batch_generator()`` (the
``add``/``step``/``cancel`` interface of :class:`bittern.batching.BatchGenerator`) generate from it.
See ``docs/engine.md``.
"""

from .generate import (Engine, EngineBatchGenerator, GenerationResult, GenerationStats, peak_rss_bytes,
                       set_threads)
from .head import HEAD_FORMATS, TokenTable
from .kvcache import KV_DTYPES, EngineKVCache
from .model import EngineModel

__all__ = ["Engine", "EngineBatchGenerator", "EngineKVCache", "EngineModel", "GenerationResult", "GenerationStats",
           "HEAD_FORMATS", "KV_DTYPES", "TokenTable", "peak_rss_bytes", "set_threads"]
