"""The engine's model: packed ternary layers, norms, RoPE, GQA attention, embedding and LM head.

:class:`EngineModel` is a flat, inference-only representation of a packed bittern model. It runs
the same arithmetic as the frozen :class:`bittern.model.Transformer` (the reference path), with the
linear layers grouped by shared input (q/k/v, gate/up), preallocated decode buffers and a
:class:`~bittern.engine.kvcache.EngineKVCache`. Prefill runs each layer as one GEMM over all prompt
tokens; decode runs one GEMV per layer per token, or one GEMM for a batch of sequences.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..configs import ModelConfig
from ..errors import UsageError
from ..hugepages import HugePageArena, huge_pages_available, mem_available_bytes, read_into
from ..modelfile import WEIGHTS_FILE, ModelFileError, read_config, read_safetensors
from ..model import Transformer, config_rope_tables
from ..pack import TernaryWeight, get_layout
from .head import TokenTable
from .kvcache import EngineKVCache
from .linear import LinearGroup, rms_norm


@dataclass
class EngineLayer:
    """One transformer block as the engine holds it."""

    attn_norm: torch.Tensor | None
    qkv: LinearGroup
    attn_sub_norm: torch.Tensor | None
    o: LinearGroup
    ffn_norm: torch.Tensor | None
    gate_up: LinearGroup
    ffn_sub_norm: torch.Tensor | None
    down: LinearGroup


#: rows per pass of a prefill (and of many sequences' rows): the activations of a pass take ~131 KB per
#: row at 2B4T shape, so a 4096-token prompt in one pass would hold ~0.5 GB; at 512 rows the GEMM is as
#: fast as in one pass (2048-token prompt, two threads: 113-116 tok/s for 256, 512 or 2048 rows a pass)
PASS_ROWS = 512


class _Buffers:
    """Preallocated activations for decode steps of ``rows`` tokens."""

    def __init__(self, cfg: ModelConfig, rows: int) -> None:
        h, kv, f = cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size
        self.x = torch.empty(rows, h)
        self.qkv = torch.empty(rows, h + 2 * kv)
        self.rot = torch.empty(rows, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        self.attn = torch.empty(rows, h)
        self.o = torch.empty(rows, h)
        self.gu = torch.empty(rows, 2 * f)
        self.down = torch.empty(rows, h)
        self.logits = torch.empty(rows, cfg.vocab_size)


class _FastBuffers:
    """Preallocated buffers (and their addresses) of the C decode path for ``rows`` tokens."""

    def __init__(self, cfg: ModelConfig, rows: int, kp_h: int, kp_f: int, logit_rows: int | None = None) -> None:
        h, kv, f = cfg.hidden_size, cfg.kv_dim, cfg.intermediate_size
        self.x = torch.empty(rows, h)
        self.xn = torch.empty(rows, h)
        self.qkv = torch.empty(rows, h + 2 * kv)
        self.attn = torch.empty(rows, h)
        self.o = torch.empty(rows, h)
        self.gu = torch.empty(rows, 2 * f)
        self.down = torch.empty(rows, h)
        self.logits = torch.empty(rows if logit_rows is None else logit_rows, cfg.vocab_size)
        self.scores = torch.empty(cfg.max_seq_len)
        self.qh = torch.zeros(rows, kp_h, dtype=torch.int8)  # zero padding columns stay zero
        self.qf = torch.zeros(rows, kp_f, dtype=torch.int8)
        self.s = torch.empty(rows)
        self.rs = torch.empty(rows, dtype=torch.int32)
        self.qh_args = (self.qh.data_ptr(), kp_h, self.s.data_ptr(), self.rs.data_ptr())
        self.qf_args = (self.qf.data_ptr(), kp_f, self.s.data_ptr(), self.rs.data_ptr())
        self.plan: list[tuple] | None = None
        self.c_plan: torch.Tensor | None = None
        self.c_bufs: tuple[tuple, torch.Tensor] | None = None  # (cache key, bt_eng_decode_layers' bufs array)


def keep_weights_mapped(ternary_bytes: int, mmap_weights: bool | None = None) -> bool:
    """Whether ternary weights of ``ternary_bytes`` stay in the file mapping (see :meth:`EngineModel.load`)."""
    if mmap_weights is not None:
        return mmap_weights
    if not huge_pages_available():
        return True
    available = mem_available_bytes()
    return available is None or ternary_bytes > available // 2


_KV_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}


def _f32_bits(v: float) -> int:
    """The float32 bit pattern of ``v`` as an int (how bt_eng_decode_layers takes floats)."""
    return int(torch.tensor([v], dtype=torch.float32).view(torch.int32).item()) & 0xFFFFFFFF


class EngineModel:
    """A packed BitNet b1.58 model ready for fast CPU inference."""

    def __init__(self, config: ModelConfig, layers: list[EngineLayer], embed: TokenTable, head: TokenTable,
                 final_norm: torch.Tensor, source_bytes: int = 0) -> None:
        self.config = config
        self.layers = layers
        self.embed = embed
        self.head = head
        self.final_norm = final_norm
        self.source_bytes = source_bytes
        self.eps = config.norm_eps
        c = config
        self.H, self.KVH, self.hd = c.num_heads, c.num_kv_heads, c.head_dim
        self.rep = c.num_heads // c.num_kv_heads
        self.cos, self.sin = config_rope_tables(c)  # honours extra["rope_scaling"]
        self._buffers: dict[int, _Buffers] = {}
        self._fast: dict[int, _FastBuffers] = {}
        self.use_fast_path = self.fast_path_available()
        self.weights_mapped = False  # the ternary weights are views of a file mapping
        self.weights_on_huge_pages = False  # the ternary weights were copied into a huge-page arena
        self.native_layer_loop = True  # the fast path runs all blocks of a step in one C call (False: a Python loop)
        self.pass_rows = PASS_ROWS  # rows per pass of a prefill on the fast path

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_transformer(cls, model: Transformer, head: str = "f32", embed: str | None = None,
                         backend: str | None = None) -> "EngineModel":
        """Build from a frozen (packed) :class:`Transformer`, e.g. one from :func:`bittern.modelfile.load_packed`."""
        if not model.is_packed:
            raise ValueError("the model is not packed: call model.freeze() first")
        state = {n: t.detach() for n, t in model.state_dict().items()}
        for name, lin in model.packed_linears().items():
            state[f"{name}.weight_packed"] = lin.weight_packed
            state[f"{name}.weight_scale"] = lin.weight_scale.reshape(1)
            state["__layout__"] = lin.layout  # type: ignore[assignment]
        layout = state.pop("__layout__", "2bit")  # type: ignore[arg-type]
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return cls._build(model.config, state, str(layout), head, embed, backend, 0)

    @classmethod
    def load(cls, path: str | os.PathLike, head: str = "auto", embed: str | None = None,
             backend: str | None = None, mmap_weights: bool | None = None) -> "EngineModel":
        """Open a packed model directory.

        ``mmap_weights``: True keeps the ternary weights in the file mapping (nothing copied); False
        reads them from the file into anonymous memory on transparent huge pages where the OS offers
        them (fewer TLB misses: faster decode); None (default) copies when huge pages are available and
        the weights take at most half of the available memory, else maps.
        """
        directory = Path(path)
        if not directory.exists():
            raise UsageError(f"{directory}: no such model directory")
        meta = read_config(directory)
        cfg: ModelConfig = meta["model"]
        if cfg.linear != "bitnet":
            raise ModelFileError(f"{directory}: the engine runs BitNet (ternary) models only")
        offsets: dict[str, tuple[int, int]] = {}
        tensors, _ = read_safetensors(directory / WEIGHTS_FILE, offsets=offsets)
        size = (directory / WEIGHTS_FILE).stat().st_size
        ternary_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.endswith(".weight_packed"))
        resident = not keep_weights_mapped(ternary_bytes, mmap_weights)
        return cls._build(cfg, tensors, meta.get("layout", "2bit"), head, embed, backend, size, directory / WEIGHTS_FILE,
                          mapped=True, file_offsets=offsets if resident else None)

    @classmethod
    def _build(cls, cfg: ModelConfig, t: dict[str, torch.Tensor], layout: str, head: str, embed: str | None,
               backend: str | None, size: int, where: Path | str = "state", mapped: bool = False,
               file_offsets: dict[str, tuple[int, int]] | None = None) -> "EngineModel":
        """``mapped``: ``t`` views a private read-only file mapping. ``file_offsets`` (byte offset and count
        of each tensor in the file ``where``): read the packed ternary weights from the file into a
        huge-page arena, and every other tensor but the embedding into ordinary memory, so none of the
        weights' pages is mapped into this process (reading the norms and scales through the mapping
        mapped the page-cache folios around them: ~60% of the weights)."""
        lay = get_layout(layout)
        arena = source = None
        if file_offsets is not None:
            arena = HugePageArena(HugePageArena.bytes_for([v for n, v in t.items() if n.endswith(".weight_packed")]))
            source = open(where, "rb", buffering=0)

        used: set[str] = set()
        floats = (torch.float32, torch.float16, torch.bfloat16)

        def take(name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[torch.dtype, ...] = floats) -> torch.Tensor:
            if name not in t:
                raise ModelFileError(f"{where}: tensor {name!r} is missing")
            if shape is not None and tuple(t[name].shape) != shape:
                raise ModelFileError(f"{where}: tensor {name!r} has shape {tuple(t[name].shape)}, the config expects {shape}")
            if t[name].dtype not in dtypes:
                raise ModelFileError(f"{where}: tensor {name!r} has dtype {t[name].dtype}, expected {dtypes[0]}")
            used.add(name)
            if arena is None or source is None or file_offsets is None or name in ("embed_tokens.weight", "lm_head.weight"):
                return t[name]  # the embedding: its pages are dropped as the head table is converted
            offset, nbytes = file_offsets[name]
            shape, dtype = t[name].shape, t[name].dtype
            out = arena.empty(shape, dtype) if name.endswith(".weight_packed") else torch.empty(shape, dtype=dtype)
            return read_into(source, offset, out, nbytes, where)

        def finite(name: str, x: torch.Tensor) -> torch.Tensor:
            if not bool(torch.isfinite(x).all()):
                raise ModelFileError(f"{where}: tensor {name!r} holds NaN or Inf")
            return x

        def norm(name: str, width: int = cfg.hidden_size) -> torch.Tensor:
            return finite(name, take(name, (width,)).float())

        def ternary(name: str, out_f: int, in_f: int) -> TernaryWeight:
            packed = take(f"{name}.weight_packed", (out_f, lay.packed_cols(in_f)), (torch.uint8,))
            scale = finite(f"{name}.weight_scale", take(f"{name}.weight_scale", (1,), (torch.float32,)).float().reshape(()))
            if float(scale) <= 0:
                raise ModelFileError(f"{where}: tensor {name + '.weight_scale'!r} is not a positive scale")
            return TernaryWeight(packed, scale, out_f, in_f, layout)

        shapes = cfg.linear_shapes()
        inner = cfg.bitlinear_norm
        layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}"
            names = {"q_proj": f"{p}.self_attn.q_proj", "k_proj": f"{p}.self_attn.k_proj", "v_proj": f"{p}.self_attn.v_proj",
                     "o_proj": f"{p}.self_attn.o_proj", "gate_proj": f"{p}.mlp.gate_proj", "up_proj": f"{p}.mlp.up_proj",
                     "down_proj": f"{p}.mlp.down_proj"}
            w = {k: ternary(n, *shapes[k]) for k, n in names.items()}
            nrm = {k: (norm(f"{n}.norm.weight", shapes[k][1]) if inner else None) for k, n in names.items()}

            def group(keys: list[str]) -> LinearGroup:
                return LinearGroup([w[k] for k in keys], [nrm[k] for k in keys], backend, cfg.norm_eps)

            layers.append(EngineLayer(
                attn_norm=None if inner else norm(f"{p}.input_layernorm.weight"),
                qkv=group(["q_proj", "k_proj", "v_proj"]),
                attn_sub_norm=norm(f"{p}.self_attn.attn_sub_norm.weight") if cfg.subln else None,
                o=group(["o_proj"]),
                ffn_norm=None if inner else norm(f"{p}.post_attention_layernorm.weight"),
                gate_up=group(["gate_proj", "up_proj"]),
                ffn_sub_norm=norm(f"{p}.mlp.ffn_sub_norm.weight", cfg.intermediate_size) if cfg.subln else None,
                down=group(["down_proj"]),
            ))
        emb_w = take("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        if cfg.tie_embeddings:
            table = TokenTable(emb_w, head, release_source=mapped)
            if embed not in (None, head):
                raise ValueError("a tied model shares one table for embedding and head: use head= only")
            emb_table = head_table = table
        else:
            head_table = TokenTable(take("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)), head, release_source=mapped)
            stored = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(emb_w.dtype, "f32")
            emb_table = TokenTable(emb_w, embed or stored)
        final_norm = norm("norm.weight")
        if source is not None:
            source.close()
        extra = set(t) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set())
        if extra:
            raise ModelFileError(f"{where}: tensors the config does not have (does num_layers match the file?): "
                                 f"{sorted(extra)[:5]}")
        model = cls(cfg, layers, emb_table, head_table, final_norm, size)
        model.weights_mapped = mapped and arena is None
        model.weights_on_huge_pages = arena is not None and arena.huge
        return model

    # ------------------------------------------------------------------ sizes

    @property
    def bytes_per_token(self) -> int:
        """Weight bytes read by one decode step (ternary layers plus LM head)."""
        n = sum(g.nbytes for L in self.layers for g in (L.qkv, L.o, L.gate_up, L.down))
        return n + self.head.nbytes

    def new_cache(self, slots: int = 1, max_len: int | None = None, dtype: str = "f16") -> EngineKVCache:
        """A KV cache for ``slots`` sequences of up to ``max_len`` positions (default: the context)."""
        return EngineKVCache(self.config, slots, min(max_len or self.config.max_seq_len, self.config.max_seq_len), dtype)

    def fast_path_available(self) -> bool:
        """Whether decode can run on the C path (native kernels, the engine's C helpers, pre-norm blocks)."""
        from .headkernel import load_head_kernel

        if self.config.bitlinear_norm or load_head_kernel() is None:
            return False
        return all(g.fused for L in self.layers for g in (L.qkv, L.o, L.gate_up, L.down))

    def _bufs(self, rows: int) -> _Buffers:
        b = self._buffers.get(rows)
        if b is None:
            b = self._buffers[rows] = _Buffers(self.config, rows)
        return b

    # ------------------------------------------------------------------ forward

    def _rope(self, qk: torch.Tensor, rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate ``qk [N, heads, hd]`` in place (rotate-half convention); cos/sin ``[N, 1, hd]``."""
        half = self.hd // 2
        torch.neg(qk[..., half:], out=rot[..., :half])
        rot[..., half:].copy_(qk[..., :half])
        qk.mul_(cos)
        rot.mul_(sin)
        qk.add_(rot)

    def _mlp(self, L: EngineLayer, h: torch.Tensor, gu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        f = self.config.intermediate_size
        L.gate_up(h, gu)
        gate, up = gu[:, :f], gu[:, f:]
        if self.config.activation == "swiglu":
            F.silu(gate, inplace=True)
        else:
            torch.relu_(gate)
            gate.square_()
        gate.mul_(up)
        if L.ffn_sub_norm is not None:
            gate = rms_norm(gate, L.ffn_sub_norm, self.eps)
        return L.down(gate, out)

    def _norm(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return x if w is None else rms_norm(x, w, self.eps)

    @torch.inference_mode()
    def prefill(self, tokens: list[int] | torch.Tensor, cache: EngineKVCache, slot: int = 0, start: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Run ``T`` tokens of one sequence from position ``start``; logits of the last (or every) position."""
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        T = ids.numel()
        end = start + T
        if T == 0:
            raise ValueError("no tokens to run")
        if end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache length {cache.max_len}")
        if self.use_fast_path:  # the decode C path, PASS_ROWS rows a pass: one GEMM per weight each
            rows = list(range(T)) if all_logits else [T - 1]
            return self.run_rows(ids.tolist(), cache, [slot] * T, list(range(start, end)), rows)
        H, KVH, hd = self.H, self.KVH, self.hd
        hdim, kvd = self.config.hidden_size, self.config.kv_dim
        x = self.embed.embed(ids)
        cos = self.cos[start:end].unsqueeze(1)
        sin = self.sin[start:end].unsqueeze(1)
        qkv = torch.empty(T, hdim + 2 * kvd)
        rot = torch.empty(T, H + KVH, hd)
        gu = torch.empty(T, 2 * self.config.intermediate_size)
        tmp = torch.empty(T, hdim)
        mask = None
        if start > 0:
            mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
        for i, L in enumerate(self.layers):
            L.qkv(self._norm(x, L.attn_norm), qkv)
            qk = qkv[:, : hdim + kvd].view(T, H + KVH, hd)
            self._rope(qk, rot, cos, sin)
            k_new = qkv[:, hdim : hdim + kvd].view(T, KVH, hd).transpose(0, 1)
            v_new = qkv[:, hdim + kvd :].view(T, KVH, hd).transpose(0, 1)
            cache.write(i, slot, start, k_new, v_new)
            k, v = cache.read(i, slot, end)
            q = qkv[:, :hdim].view(T, H, hd).transpose(0, 1).unsqueeze(0)
            if mask is None:
                a = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True)
            else:
                a = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, enable_gqa=True)
            a = a[0].transpose(0, 1).reshape(T, hdim)
            if L.attn_sub_norm is not None:
                a = rms_norm(a, L.attn_sub_norm, self.eps)
            x += L.o(a, tmp)
            x += self._mlp(L, self._norm(x, L.ffn_norm), gu, tmp)
        if not all_logits:
            x = x[-1:]
        return self.head.logits(rms_norm(x, self.final_norm, self.eps))

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[list[int]], cache: EngineKVCache, slots: list[int],
                      starts: list[int] | None = None, max_rows: int | None = None) -> torch.Tensor:
        """Run several sequences' tokens (``prompts[i]`` into ``slots[i]`` from position ``starts[i]``, default
        0) in passes of at most ``max_rows`` rows in all (default :attr:`pass_rows`), one GEMM per weight
        per pass; returns
        ``[len(prompts), vocab]``, the logits of each sequence's last token.

        The numbers equal :meth:`prefill` of each sequence on its own; many short prompts (a server's new
        requests) share the weight reads and run at the GEMM's speed instead of a short prompt's.
        """
        n = len(prompts)
        starts = [0] * n if starts is None else list(starts)
        if len(slots) != n or len(starts) != n:
            raise ValueError("give one slot and one start position per prompt")
        if len(set(slots)) != n:
            raise ValueError("two prompts share a cache slot")
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        for ids, slot, start in zip(prompts, slots, starts):
            if len(ids) == 0:
                raise ValueError("no tokens to run")
            if not 0 <= slot < cache.slots:
                raise ValueError(f"slot {slot} is outside the cache's {cache.slots} slots")
            if start < 0 or start + len(ids) > cache.max_len:
                raise ValueError(f"sequence of {start + len(ids)} tokens exceeds the cache length {cache.max_len}")
        if n == 0:
            return torch.empty(0, self.config.vocab_size)
        if not self.use_fast_path or n == 1:
            return torch.cat([self.prefill(ids, cache, slot, start).clone()
                              for ids, slot, start in zip(prompts, slots, starts)])
        tokens = [int(t) for ids in prompts for t in ids]
        row_slots = [slot for ids, slot in zip(prompts, slots) for _ in ids]
        positions = [start + j for ids, start in zip(prompts, starts) for j in range(len(ids))]
        ends = list(itertools.accumulate(len(ids) for ids in prompts))
        return self.run_rows(tokens, cache, row_slots, positions, [e - 1 for e in ends], max_rows)

    @torch.inference_mode()
    def run_rows(self, tokens: list[int], cache: EngineKVCache, slots: list[int], positions: list[int],
                 logit_rows: list[int], max_rows: int | None = None) -> torch.Tensor:
        """Token ``tokens[b]`` at ``positions[b]`` of ``slots[b]`` for every row ``b``, in passes of at most
        ``max_rows`` rows (default :attr:`pass_rows`; one GEMM per weight per pass); returns the logits of the rows listed in
        ``logit_rows`` (rising), ``[len(logit_rows), vocab]``.

        Rows of one slot must come in rising positions, each following what the cache holds; rows of
        different slots mix freely (a decode step's rows with chunks of new prompts).
        """
        B = len(tokens)
        if len(slots) != B or len(positions) != B:
            raise ValueError("give one slot and one position per row")
        if any(b < 0 or b >= B for b in logit_rows) or any(a >= b for a, b in zip(logit_rows, logit_rows[1:])):
            raise ValueError("logit_rows must be rising row indices")
        if not self.use_fast_path:
            raise RuntimeError("run_rows needs the native engine path")
        if B and (min(slots) < 0 or max(slots) >= cache.slots):
            raise ValueError(f"a slot is outside the cache's {cache.slots} slots")
        if B and (min(positions) < 0 or max(positions) >= cache.max_len):
            raise ValueError(f"a position is outside the cache length {cache.max_len}")
        max_rows = max_rows or self.pass_rows
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        out = torch.empty(len(logit_rows), self.config.vocab_size)
        done = 0
        kp_h, kp_f = self.layers[0].qkv._kp, self.layers[0].down._kp
        for a in range(0, B, max_rows):
            b = min(B, a + max_rows)
            last = [r - a for r in logit_rows if a <= r < b]
            fb = _FastBuffers(self.config, b - a, kp_h, kp_f, logit_rows=max(1, len(last)))
            logits = self._run_fast(fb, tokens[a:b], cache, slots[a:b], positions[a:b], logit_rows=last)
            out[done : done + len(last)] = logits
            done += len(last)
        return out

    @torch.inference_mode()
    def decode(self, tokens: list[int], cache: EngineKVCache, slots: list[int], positions: list[int]) -> torch.Tensor:
        """One new token for each of ``B`` sequences (token ``tokens[b]`` at ``positions[b]`` of ``slots[b]``).

        Returns logits ``[B, vocab]`` in a buffer reused by the next call with the same ``B``.
        """
        for p in positions:
            if p + 1 > cache.max_len:
                raise ValueError(f"sequence of {p + 1} tokens exceeds the cache length {cache.max_len}")
        if self.use_fast_path:
            return self._decode_fast(tokens, cache, slots, positions)
        return self._decode_torch(tokens, cache, slots, positions)

    def _decode_fast(self, tokens: list[int], cache: EngineKVCache, slots: list[int], positions: list[int]) -> torch.Tensor:
        B = len(tokens)
        fb = self._fast.get(B)
        if fb is None:
            fb = self._fast[B] = _FastBuffers(self.config, B, self.layers[0].qkv._kp, self.layers[0].down._kp)
        return self._run_fast(fb, tokens, cache, slots, positions)

    def _run_fast(self, fb: "_FastBuffers", tokens: list[int], cache: EngineKVCache, slots: list[int],
                  positions: list[int], logit_rows: list[int] | None = None) -> torch.Tensor:
        """Rows ``tokens[b]`` at ``positions[b]`` of ``slots[b]`` on the C path, in order (so rows of one slot
        at consecutive positions attend causally); logits of every row, or of the rows listed in
        ``logit_rows`` (in that order)."""
        from .headkernel import load_head_kernel

        C = load_head_kernel()
        B = len(tokens)
        cfg = self.config
        h, H, KVH, hd, eps = cfg.hidden_size, self.H, self.KVH, self.hd, self.eps
        norm_quant, act_quant, attend = C.norm_quant, C.act_quant, C.attend
        mm = self.layers[0].qkv._mm  # bt_matmul_mode; its arguments were checked when the plan was built
        fb.x.copy_(self.embed.embed(torch.tensor(tokens, dtype=torch.long)))
        xp, xnp, qkvp, attnp, downp = fb.x.data_ptr(), fb.xn.data_ptr(), fb.qkv.data_ptr(), fb.attn.data_ptr(), fb.down.data_ptr()
        dt = _KV_CODES[cache.k.dtype]
        es = cache.k.element_size()
        max_len, slots_n = cache.max_len, cache.slots
        plane = KVH * max_len * hd * es
        kbase, vbase = cache.k.data_ptr(), cache.v.data_ptr()
        splane = KVH * max_len * 4  # int8 cache: one float32 scale per cached row
        ksbase, vsbase = (cache.k_scale.data_ptr(), cache.v_scale.data_ptr()) if cache.quantized else (0, 0)
        cbase, sbase = self.cos.data_ptr(), self.sin.data_ptr()
        row_qkv = (h + 2 * cfg.kv_dim) * 4
        scores = fb.scores.data_ptr()
        plan = fb.plan
        if plan is None:
            plan = fb.plan = self._plan(fb, B)
            fb.c_plan = self._c_plan(plan) if self.native_layer_loop else None
        if fb.c_plan is not None:  # every block in one C call
            cache_key = (kbase, vbase, ksbase, vsbase, dt, max_len, slots_n)
            if fb.c_bufs is None or fb.c_bufs[0] != cache_key:  # buffers and cache: fixed while the cache is
                fb.c_bufs = (cache_key, torch.tensor([
                    xp, xnp, qkvp, attnp, fb.o.data_ptr(), fb.gu.data_ptr(), downp, fb.qh_args[0], fb.qh_args[1],
                    fb.qf_args[0], fb.qf_args[1], fb.s.data_ptr(), fb.rs.data_ptr(), scores, cbase, sbase, h,
                    cfg.intermediate_size, H, KVH, hd, 0 if cfg.activation == "swiglu" else 1, _f32_bits(eps), kbase,
                    vbase, ksbase, vsbase, dt, max_len, slots_n, plane, splane], dtype=torch.int64))
            rows = torch.tensor([v for b in range(B) for v in (slots[b], positions[b])], dtype=torch.int64)
            rc = C.decode_layers(fb.c_bufs[1].data_ptr(), fb.c_plan.data_ptr(), len(self.layers), rows.data_ptr(), B)
            if rc != 0:
                raise RuntimeError(f"decode step failed in the native library ({rc})")
            plan = []
        for i, (nq1, mm_qkv, nq2, mm_o, nq3, mm_gu, aq, mm_down) in enumerate(plan):
            norm_quant(*nq1)
            for a in mm_qkv:
                mm(*a)
            for b in range(B):
                p = positions[b]
                plane_i = i * slots_n + slots[b]
                ks = (ksbase + plane_i * splane, vsbase + plane_i * splane) if ksbase else (None, None)
                attend(qkvp + b * row_qkv, H, KVH, hd, p, cbase + p * hd * 4, sbase + p * hd * 4, kbase + plane_i * plane,
                       vbase + plane_i * plane, *ks, dt, max_len, attnp + b * h * 4, scores)
            norm_quant(*nq2)
            for a in mm_o:
                mm(*a)
            norm_quant(*nq3)
            for a in mm_gu:
                mm(*a)
            act_quant(*aq)
            for a in mm_down:
                mm(*a)
        if logit_rows is not None:
            if not logit_rows:
                return fb.logits[:0]
            norm_quant(xp, downp, self.final_norm.data_ptr(), eps, B, h, xnp, None, 0, None, None)
            picked = fb.xn.index_select(0, torch.tensor(logit_rows, dtype=torch.long))
            return self.head.logits(picked, fb.logits[: len(logit_rows)])
        norm_quant(xp, downp, self.final_norm.data_ptr(), eps, B, h, xnp, None, 0, None, None)
        return self.head.logits(fb.xn, fb.logits)

    @staticmethod
    def _c_plan(plan: list[tuple]) -> torch.Tensor | None:
        """The per-layer part of ``plan`` as the int64 array of ``bt_eng_decode_layers`` (bittern.h), or
        None when a layer has more products than that call takes (then the Python loop runs)."""
        max_mm, per_layer = 8, 8 + 7 * 8
        rows = []
        for nq1, mm_qkv, nq2, mm_o, nq3, mm_gu, aq, mm_down in plan:
            stages = (mm_qkv, mm_o, mm_gu, mm_down)
            if sum(len(st) for st in stages) > max_mm:
                return None
            row = [nq1[2] or 0, nq2[2] or 0, nq3[2] or 0, aq[4] or 0] + [len(st) for st in stages]
            for st in stages:
                for a in st:
                    _, fmt, wp, n, k, _qp, _ldq, _rsp, _sp, _B, gamma, optr, _yi, ldy = a
                    row += [fmt, wp, n, k, _f32_bits(gamma), optr, ldy]
            rows.append(row + [0] * (per_layer - len(row)))
        return torch.tensor(rows, dtype=torch.int64).reshape(-1)

    def _plan(self, fb: "_FastBuffers", B: int) -> list[tuple]:
        """Every argument of the per-layer C calls of a ``B``-row decode step that does not change per step."""
        cfg = self.config
        h, f, eps = cfg.hidden_size, cfg.intermediate_size, self.eps
        qh, ldh, sp, rsp = fb.qh_args
        qf, ldf = fb.qf_args[0], fb.qf_args[1]
        xp, xnp, attnp, op, gup, downp = (fb.x.data_ptr(), fb.xn.data_ptr(), fb.attn.data_ptr(), fb.o.data_ptr(),
                                          fb.gu.data_ptr(), fb.down.data_ptr())
        act = 0 if cfg.activation == "swiglu" else 1

        def mms(group: LinearGroup, qp: int, ldq: int, out: torch.Tensor) -> list[tuple]:
            optr, ldy = out.data_ptr(), out.stride(0)
            return [(0, fmt, wp, n, k, qp, ldq, rsp, sp, B, gamma, optr + 4 * off, None, ldy)
                    for (fmt, wp, n, k, gamma), off in zip(group._wargs, group.offsets)]

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        plan = []
        for i, L in enumerate(self.layers):
            plan.append((
                (xp, downp if i else None, ptr(L.attn_norm), eps, B, h, xnp, qh, ldh, sp, rsp),
                mms(L.qkv, qh, ldh, fb.qkv),
                (attnp, None, ptr(L.attn_sub_norm), eps, B, h, None, qh, ldh, sp, rsp),
                mms(L.o, qh, ldh, fb.o),
                (xp, op, ptr(L.ffn_norm), eps, B, h, xnp, qh, ldh, sp, rsp),
                mms(L.gate_up, qh, ldh, fb.gu),
                (gup, B, f, act, ptr(L.ffn_sub_norm), eps, qf, ldf, sp, rsp),
                mms(L.down, qf, ldf, fb.down),
            ))
        return plan

    def _decode_torch(self, tokens: list[int], cache: EngineKVCache, slots: list[int], positions: list[int]) -> torch.Tensor:
        B = len(tokens)
        bufs = self._bufs(B)
        H, KVH, hd, rep = self.H, self.KVH, self.hd, self.rep
        hdim, kvd = self.config.hidden_size, self.config.kv_dim
        ids = torch.tensor(tokens, dtype=torch.long)
        x = bufs.x
        x.copy_(self.embed.embed(ids))
        pos = torch.tensor(positions, dtype=torch.long)
        cos = self.cos[pos].unsqueeze(1)
        sin = self.sin[pos].unsqueeze(1)
        qkv, rot, attn, gu, tmp = bufs.qkv, bufs.rot, bufs.attn, bufs.gu, bufs.o
        qk = qkv[:, : hdim + kvd].view(B, H + KVH, hd)
        for i, L in enumerate(self.layers):
            L.qkv(self._norm(x, L.attn_norm), qkv)
            self._rope(qk, rot, cos, sin)
            for b in range(B):
                p, s = positions[b], slots[b]
                row = qkv[b]
                cache.write(i, s, p, row[hdim : hdim + kvd].view(KVH, 1, hd), row[hdim + kvd :].view(KVH, 1, hd))
                k, v = cache.read(i, s, p + 1)
                q = row[:hdim].view(1, KVH, rep, hd)  # the rep query heads of a KV head act as rep "queries"
                a = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0))
                attn[b].copy_(a.reshape(hdim))
            a = attn if L.attn_sub_norm is None else rms_norm(attn, L.attn_sub_norm, self.eps)
            x += L.o(a, tmp)
            x += self._mlp(L, self._norm(x, L.ffn_norm), gu, tmp)
        return self.head.logits(rms_norm(x, self.final_norm, self.eps), bufs.logits)
