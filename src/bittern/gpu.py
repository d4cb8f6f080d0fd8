"""GPU-only decoding helpers: a static-shape one-token decode step and its CUDA-graph capture.

Decoding one token launches a few hundred small kernels; on a GPU their launch cost, not the
weights' bandwidth, sets the speed unless the step is replayed as one CUDA graph. A graph needs
static shapes and no host synchronisation, which ``Transformer.forward`` with a growing
``KVCache`` does not have, so :class:`StaticDecoder` runs the same modules with

* the position as a 0-dim int64 *device* tensor (rope rows and cache slots picked by index),
* attention over the whole preallocated cache with a mask hiding positions after the current one
  (its cost grows with ``max_len``, not with the current length: size the cache to the job).

:func:`cuda_graph_decode` captures any such step function. Nothing here runs on the CPU except
``StaticDecoder.step`` itself (which the tests compare with ``Transformer.forward``); capturing
needs CUDA. Use::

    prepare_model(model)                               # weights to the Triton layout, once
    dec = StaticDecoder(model, batch_size=1, max_len=512)
    logits = dec.prefill(prompt)                       # eager, fills dec.cache
    step = cuda_graph_decode(dec.step, tok, pos)       # tok [B, 1] int64, pos 0-dim int64 (device)
    logits = step(next_tok, pos)                       # replays; outputs are reused buffers
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .model import KVCache, Transformer, apply_rope


class StaticDecoder:
    """One-token decode with static shapes over a preallocated KV cache (CUDA-graph capturable)."""

    def __init__(self, model: Transformer, batch_size: int = 1, max_len: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        self.model = model
        ref = model.embed_tokens.weight
        self.cache = KVCache(model.config, batch_size, max_len or model.config.max_seq_len,
                             dtype=dtype or ref.dtype, device=device or ref.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``[B, T]`` through the model (eager), filling the cache; last logits ``[B, V]``."""
        self.cache.reset()
        return self.model(tokens, self.cache, 0)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (float32) of ``tokens [B, 1]`` at position ``pos`` (0-dim int64 tensor)."""
        m, c = self.model, self.model.config
        B = tokens.shape[0]
        idx = pos.reshape(1)
        cos, sin = m.rope_cos.index_select(0, idx), m.rope_sin.index_select(0, idx)
        keep = (torch.arange(self.cache.max_len, device=tokens.device) <= idx).view(1, -1)   # [1, max_len]
        x = m.embed_tokens(tokens)
        for layer, block in enumerate(m.layers):
            attn = block.self_attn
            h = block.input_layernorm(x)
            q = attn.q_proj(h).view(B, 1, c.num_heads, c.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, 1, c.num_kv_heads, c.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, 1, c.num_kv_heads, c.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc, vc = self.cache.k[layer, :B], self.cache.v[layer, :B]
            kc.index_copy_(2, idx, k.to(kc.dtype))
            vc.index_copy_(2, idx, v.to(vc.dtype))
            out = F.scaled_dot_product_attention(q, kc.to(q.dtype), vc.to(q.dtype), attn_mask=keep,
                                                 enable_gqa=c.num_heads != c.num_kv_heads)
            out = out.transpose(1, 2).reshape(B, 1, -1)
            if attn.attn_sub_norm is not None:
                out = attn.attn_sub_norm(out)
            x = x + attn.o_proj(out)
            x = x + block.mlp(block.post_attention_layernorm(x))
        return m.lm_head(m.norm(x)).float()[:, -1]


def prepare_model(model: Transformer, backend: str = "triton") -> Transformer:
    """Convert every packed layer's weight once to the layout ``backend`` reads (in place).

    A model frozen or loaded in another layout (e.g. ``"2bit"``) still runs on the Triton backend,
    but converts on every call; do this once after moving the model to the GPU.
    """
    from .kernels import get_backend

    chosen = get_backend(backend)
    for layer in model.packed_linears().values():
        layer.set_ternary(chosen.prepare(layer.ternary))
    return model


def cuda_graph_decode(step_fn: Callable[..., torch.Tensor], *example_inputs: torch.Tensor,
                      warmup: int = 2) -> Callable[..., torch.Tensor]:
    """Capture ``step_fn(*inputs)`` in a CUDA graph (GPU only) and return a replaying callable.

    ``example_inputs`` are CUDA tensors of the shapes and dtypes of every later call; they are
    copied into static buffers, ``step_fn`` runs ``warmup`` times on a side stream (compiling
    Triton kernels, running autotuners: side effects such as KV-cache writes happen then too, so
    pass inputs whose effects a real step overwrites), then once under capture. The returned
    ``run(*inputs)`` copies ``inputs`` into the buffers, replays, and returns the graph's output
    tensors, which the next replay overwrites (clone what you keep). ``run.graph`` is the graph.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graph_decode needs a CUDA device (none is available)")
    static_in: Sequence[torch.Tensor] = [t.clone() for t in example_inputs]
    if any(t.device.type != "cuda" for t in static_in):
        raise ValueError("cuda_graph_decode: every example input must be a CUDA tensor")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step_fn(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step_fn(*static_in)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return static_out

    run.graph = graph  # type: ignore[attr-defined]
    return run
