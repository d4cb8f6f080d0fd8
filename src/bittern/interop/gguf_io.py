"""GGUF (llama.cpp) in and out: ternary linears as TQ2_0 / TQ1_0 (or F16), the rest F16/F32.

Architectures, as llama.cpp defines them (``src/models/*.cpp``, gguf-py ``constants.py``):

* ``bitnet``: pre-norms plus ``attn_sub_norm`` / ``ffn_sub_norm``, NeoX (rotate-half) RoPE, output
  tied to ``token_embd``, and a **SiLU**-gated FFN (1bitLLM's models). A bittern model with sub-norms
  and tied embeddings is written with this arch. 2B4T-style models (ReLU²) are written with it too —
  it is what upstream's ``convert_hf_to_gguf.py`` does for ``BitNetForCausalLM`` — but upstream
  llama.cpp then runs their FFN with SiLU, so its outputs differ from the model's; the file records
  ``bittern.activation = "relu2"`` so bittern reads it back faithfully.
* ``llama``: no sub-norms, SiLU FFN, optional separate ``output.weight``. llama.cpp applies RoPE to
  adjacent pairs, so ``attn_q``/``attn_k`` rows are permuted on export (and back on import) exactly as
  llama.cpp's converter does.

TQ types store one fp16 scale per 256-weight block and need rows that are a multiple of 256 long.
A bittern tensor (one gamma) is written with every block scale ``fp16(gamma)`` (an all-zero block gets
scale 0, which changes nothing): the codes round-trip exactly, the scale is rounded to fp16 (relative
error at most 2**-11). The exact float32 gamma is also stored as ``bittern.scale.<tensor>``, which
llama.cpp ignores and bittern uses on import when it agrees with the blocks, so bittern -> GGUF ->
bittern is exact. A foreign tensor whose blocks carry different scales is not single-scale ternary:
it is re-quantised (absmean) with a warning.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs import ModelConfig
from ..model import Transformer, check_rope_scaling, rope_inv_freq
from ..modelfile import ModelFileError, atomic_write
from ..pack import TernaryWeight
from ..quant import quantize_weight
from .assemble import TensorSource, as_source, assemble_packed, linear_names
from .safetensors_io import default_permissions

QK_K = 256
WEIGHT_TYPES = ("TQ2_0", "TQ1_0", "F16")
FLOAT_TYPES = ("F16", "F32")
_PART = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_FLOAT_PART = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelFileError("GGUF support needs the 'gguf' package: pip install gguf") from None
    return gguf


def gguf_name(name: str) -> str:
    """The GGUF tensor name of bittern parameter ``name`` (e.g. ``blk.0.attn_q.weight``)."""
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[0] == "layers" and parts[-1] == "weight":
        bid, inner = parts[1], ".".join(parts[2:-1])
        leaf = inner.split(".")[-1]
        if leaf in _PART:
            return f"blk.{bid}.{_PART[leaf]}.weight"
        if inner in _FLOAT_PART:
            return f"blk.{bid}.{_FLOAT_PART[inner]}.weight"
    raise ValueError(f"parameter {name!r} has no GGUF name")


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp adjacent-pair order (rows of one q/k projection)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def choose_arch(config: ModelConfig) -> str:
    """``bitnet`` for models with sub-norms, else ``llama``; raises where neither can hold the model."""
    if config.bitlinear_norm:
        raise ValueError("a model with RMSNorm inside every linear (bitlinear_norm) has no llama.cpp architecture")
    if config.subln:
        if not config.tie_embeddings:
            raise ValueError("llama.cpp's bitnet architecture ties the output to token_embd; this model has an "
                             "untied LM head")
        return "bitnet"
    if config.activation != "swiglu":
        raise ValueError("llama.cpp's llama architecture uses a SiLU-gated FFN; this model uses relu2 without sub-norms")
    return "llama"


# ----------------------------------------------------------------------------- tokenizer metadata


def _pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    pre = json.dumps(tok_json.get("pre_tokenizer"))
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre:
        return "llama-bpe"
    if '"ByteLevel"' in pre:
        return "gpt-2"
    return "default"


SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space inside tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _walk(node: Any) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder and, for a Sequence, its members (flattened)."""
    if not isinstance(node, dict):
        return []
    members = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
    return [node] + [m for child in members for m in _walk(child)]


def sentencepiece_style(tok_json: dict[str, Any]) -> dict[str, Any] | None:
    """``{"add_space_prefix": bool}`` for a SentencePiece-style BPE tokenizer.json (Llama-2 / 1bitLLM:
    spaces written as "▁" by a Metaspace pre-tokenizer or a Replace normalizer), else None."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        return None
    parts = _walk(tok_json.get("normalizer")) + _walk(tok_json.get("pre_tokenizer"))
    meta = [n for n in parts if n.get("type") == "Metaspace" and n.get("replacement", SPACE) == SPACE]
    replaces = [n for n in parts if n.get("type") == "Replace" and n.get("content") == SPACE
                and (n.get("pattern") or {}).get("String") == " "]
    if not meta and not replaces:
        return None
    prepend = any(n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never") != "never"
                  for n in meta)
    prepend |= any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in parts)
    return {"add_space_prefix": prepend}


def _spm_scores(tok_json: dict[str, Any], vocab: dict[str, int], special: set[int]) -> dict[int, float]:
    """SentencePiece-style scores of a BPE vocab: a token made by merge ``r`` scores ``-r`` (llama.cpp's
    tokenizer merges the adjacent pair whose result scores highest, which replays the merges in order);
    tokens no merge makes score below every merged one; special and byte tokens 0."""
    merges = tok_json["model"].get("merges") or []
    scores: dict[int, float] = {}
    for rank, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(left + right)
        if i is not None and i not in scores:
            scores[i] = -float(rank)
    for text, i in vocab.items():
        if i in special or _BYTE_TOKEN.fullmatch(text):
            scores[i] = 0.0
        elif i not in scores:
            scores[i] = -float(len(merges) + i)
    return scores


def _add_tokenizer(writer: Any, tokenizer_dir: Path, vocab_size: int) -> None:
    gguf = _gguf()
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_dir}: only BPE tokenizers are exported to GGUF (found {model.get('type')!r})")
    n = tok.vocab_size
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    special = set()
    for added in tok_json.get("added_tokens", []):
        if 0 <= added["id"] < vocab_size:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            if added.get("special"):
                special.add(added["id"])
    spm = sentencepiece_style(tok_json)
    pre = _pre_tokenizer_name(tok_json)
    if spm is None and pre == "default":
        warnings.warn(f"{tokenizer_dir}: neither a byte-level BPE nor a SentencePiece-style tokenizer; the GGUF is "
                      "written without a tokenizer")
        writer.add_tokenizer_model("none")
        return
    if spm is not None:
        # llama.cpp's "llama" (SentencePiece) tokenizer: tokens, scores and types; no merges
        unk = model.get("unk_token")
        unk_id = vocab.get(unk) if unk else None
        if unk_id is not None:
            types[unk_id] = gguf.TokenType.UNKNOWN
        if model.get("byte_fallback"):
            for text, i in vocab.items():
                if _BYTE_TOKEN.fullmatch(text):
                    types[i] = gguf.TokenType.BYTE
        scores = _spm_scores(tok_json, vocab, special | ({unk_id} if unk_id is not None else set()))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([scores.get(i, -1e9) for i in range(vocab_size)])
        writer.add_token_types(types)
        writer.add_add_space_prefix(spm["add_space_prefix"])
        if unk_id is not None:
            writer.add_unk_token_id(unk_id)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
        writer.add_add_bos_token(True)
    else:
        writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# ----------------------------------------------------------------------------- export


def _encode_ternary(codes: np.ndarray, gamma: float, qtype: str) -> tuple[np.ndarray, Any]:
    """Raw GGUF bytes (or an F16 array) of int8 codes ``[out, in]`` with one scale ``gamma``."""
    gguf = _gguf()
    if qtype == "F16":
        return (codes.astype(np.float32) * np.float32(gamma)).astype(np.float16), None
    if codes.shape[1] % QK_K:
        raise ValueError(f"{qtype} needs rows that are a multiple of {QK_K} long; this tensor's rows have "
                         f"{codes.shape[1]} values (use --weight-type F16, or a model whose widths are multiples of 256)")
    g16 = np.float32(np.float16(gamma))
    if not np.isfinite(g16) or g16 <= 0:
        raise ValueError(f"scale {gamma} is not representable as a positive fp16 block scale")
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    data = gguf.quants.quantize(codes.astype(np.float32) * g16, qt)
    return data, qt


ROPE_FREQS = "rope_freqs.weight"
_CHUNK = 1 << 22


class _Converting:
    """A float tensor written to a GGUF in another float dtype, converted piece by piece as it is written
    (so no converted copy of a large embedding exists whole). GGUFWriter.write_tensor_data only needs
    ``nbytes`` and ``tofile`` of what it is given."""

    def __init__(self, t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
        self.flat, self.dtype, self.name = t.detach().reshape(-1), dtype, name
        self.nbytes = self.flat.numel() * torch.empty((), dtype=dtype).element_size()

    def tofile(self, f: Any) -> None:
        for i in range(0, self.flat.numel(), _CHUNK):
            part = self.flat[i:i + _CHUNK].to(self.dtype)
            if not bool(torch.isfinite(part).all()):
                raise ValueError(f"tensor {self.name!r} overflows {self.dtype} (choose F32)")
            f.write(memoryview(part.contiguous().numpy()).cast("B"))


def _rope_plan(cfg: ModelConfig, arch: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """llama.cpp's RoPE scaling metadata and, for "llama3" scaling, its ``rope_freqs`` factors.

    llama.cpp divides each RoPE frequency by ``rope_freqs[i]`` (what its converter writes for Llama-3
    models), and scales positions by ``1/factor`` for ``rope.scaling.type = "linear"``.
    """
    scaling = check_rope_scaling(cfg.extra.get("rope_scaling"))
    if scaling is None:
        return {}, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        keys: dict[str, Any] = {"type": "linear", "factor": float(scaling["factor"])}
        if "original_max_position_embeddings" in scaling:
            keys["original_context_length"] = int(scaling["original_max_position_embeddings"])
        return keys, None
    if arch != "llama":
        warnings.warn(f"llama.cpp's {arch} architecture has no rope_freqs tensor: upstream llama.cpp will run this "
                      f"model without its {kind!r} RoPE scaling (bittern reads the file back correctly)")
        return {}, None
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)
    return {}, (plain / scaled).numpy().astype(np.float32)


def save_gguf(model: Transformer | TensorSource, path: str | os.PathLike, weight_type: str = "TQ2_0",
              float_type: str = "F16", tokenizer_dir: str | os.PathLike | None = None, arch: str | None = None,
              name: str | None = None) -> Path:
    """Write ``model`` as a GGUF file llama.cpp loads; tensors are encoded and written one at a time.

    ``model`` is a model or a :class:`~bittern.interop.assemble.TensorSource` (streaming conversion).
    ``weight_type`` applies to the ternary linears (TQ2_0, TQ1_0 or F16), ``float_type`` to the
    embeddings and an untied head (norms are always F32, as llama.cpp's converter writes them).
    HF ``rope_scaling`` is written as llama.cpp expects it: ``rope.scaling.*`` keys for "linear", a
    ``rope_freqs`` tensor for "llama3" (``llama`` arch only; ``bitnet`` warns).
    """
    gguf = _gguf()
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float type must be one of {FLOAT_TYPES}, got {float_type!r}")
    cfg = model.config
    if cfg.linear != "bitnet":
        raise ValueError("only a BitNet model can be exported to GGUF")
    source = as_source(model)
    arch = arch or choose_arch(cfg)
    if arch not in ("bitnet", "llama"):
        raise ValueError(f"arch must be 'bitnet' or 'llama', got {arch!r}")
    if arch == "bitnet" and cfg.activation == "relu2":
        warnings.warn("llama.cpp's bitnet architecture runs the FFN with SiLU; this relu2 (2B4T-style) model will "
                      "give different outputs in upstream llama.cpp (bittern reads the file back correctly)")
    rope_keys, rope_freqs = _rope_plan(cfg, arch)
    path = Path(path)
    fdt = np.float16 if float_type == "F16" else np.float32
    # (gguf name, shape for the header, numpy dtype, byte count, raw quant type, producer)
    plan: list[tuple[str, tuple[int, ...], Any, int, Any, Any]] = []
    for pname, shape in source.float_shapes().items():
        dt = np.float32 if len(shape) == 1 else fdt
        tdt = torch.float32 if dt is np.float32 else torch.float16

        def produce_float(pname: str = pname, tdt: torch.dtype = tdt) -> "_Converting":
            return _Converting(source.floats(pname), tdt, pname)
        plan.append((gguf_name(pname), shape, dt, int(np.prod(shape)) * np.dtype(dt).itemsize, None, produce_float))
    if rope_freqs is not None:
        plan.append((ROPE_FREQS, rope_freqs.shape, np.float32, rope_freqs.nbytes, None, lambda: rope_freqs))
    for lname in linear_names(cfg):
        gname = gguf_name(f"{lname}.weight")
        leaf = lname.split(".")[-1]
        heads = cfg.num_heads if leaf == "q_proj" else cfg.num_kv_heads
        out, inp = source.linear_shape(lname)

        def produce(lname: str = lname, leaf: str = leaf, heads: int = heads) -> np.ndarray:
            tw = source.ternary(lname)
            codes = tw.codes().numpy()
            if arch == "llama" and leaf in ("q_proj", "k_proj"):
                codes = _permute_rope(codes, heads)
            data, _ = _encode_ternary(codes, float(tw.scale), weight_type)
            return data
        if weight_type == "F16":
            plan.append((gname, (out, inp), np.float16, out * inp * 2, None, produce))
        else:
            if inp % QK_K:
                raise ValueError(f"{lname}: {weight_type} needs rows that are a multiple of {QK_K} long; this "
                                 f"tensor's rows have {inp} values (use --weight-type F16)")
            qt = getattr(gguf.GGMLQuantizationType, weight_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
            plan.append((gname, (out, inp // block * type_size), np.uint8, out * (inp // block) * type_size, qt,
                         produce))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or cfg.name)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        if rope_keys:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope_keys["factor"])
            if "original_context_length" in rope_keys:
                writer.add_rope_scaling_orig_ctx_len(rope_keys["original_context_length"])
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        ftype = {"TQ2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "TQ1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                 "F16": gguf.LlamaFileType.MOSTLY_F16}[weight_type]
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("bittern.activation", cfg.activation)
        writer.add_string("bittern.model_config", json.dumps(cfg.to_dict()))
        if tokenizer_dir is not None:
            tdir = Path(tokenizer_dir)
            _add_tokenizer(writer, tdir if tdir.is_dir() else tdir.parent, cfg.vocab_size)
        else:
            writer.add_tokenizer_model("none")
        for lname in linear_names(cfg):
            writer.add_float32(f"bittern.scale.{gguf_name(lname + '.weight')}", source.scale(lname))
        for gname, shape, dt, nbytes, qt, _ in plan:
            writer.add_tensor_info(gname, shape, np.dtype(dt), nbytes, raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, _, _, nbytes, _, produce in plan:
            data = produce()
            if data.nbytes != nbytes:
                raise ValueError(f"{gname}: encoded {data.nbytes} bytes, announced {nbytes}")
            writer.write_tensor_data(data)
            del data
        writer.close()
        default_permissions(tmp)

    atomic_write(path, write)
    return path


# ----------------------------------------------------------------------------- import


class GGUFFile:
    """A validated, memory-mapped GGUF file: metadata fields and tensors by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
        if len(head) < 8 or head[:4] != b"GGUF":
            raise ModelFileError(f"{self.path}: not a GGUF file (bad magic {head[:4]!r}, expected b'GGUF')")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            raise ModelFileError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
            raise ModelFileError(f"{self.path}: corrupted GGUF ({type(e).__name__}: {e})") from None
        self.tensors = {}
        for t in self.reader.tensors:
            try:
                qt = gguf.GGMLQuantizationType(int(t.tensor_type))
                block, type_size = gguf.GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise ModelFileError(f"{self.path}: tensor {t.name!r} has unknown type {int(t.tensor_type)}") from None
            ne = [int(d) for d in t.shape]
            if not ne or any(d <= 0 for d in ne) or ne[0] % block:
                raise ModelFileError(f"{self.path}: tensor {t.name!r} has invalid shape {ne} for {qt.name}")
            expected = int(np.prod(ne)) // block * type_size
            if int(t.n_bytes) != expected or int(t.data_offset) + expected > size or t.data.nbytes != expected:
                raise ModelFileError(f"{self.path}: tensor {t.name!r} needs {expected} bytes at offset {t.data_offset} "
                                     f"but the file has {size} bytes (truncated or corrupted)")
            self.tensors[t.name] = t

    def field(self, key: str, default: Any = None) -> Any:
        """A scalar, string or array metadata value (``default`` when absent)."""
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ModelFileError(f"{self.path}: metadata {key!r} is corrupted ({e})") from None

    def array(self, name: str) -> tuple[np.ndarray, str]:
        """Tensor ``name`` decoded to float32 in numpy row-major order ``[..., ne0]``, and its type name."""
        gguf = _gguf()
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        shape = tuple(reversed([int(d) for d in t.shape]))
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            arr = gguf.quants.dequantize(np.asarray(t.data), qt) if qt == gguf.GGMLQuantizationType.BF16 else np.asarray(t.data)
            return np.asarray(arr, dtype=np.float32).reshape(shape), qt.name
        raw = np.asarray(t.data, dtype=np.uint8)
        try:
            # TQ1_0 / TQ2_0 exactly; other block types (llama-quantize writes the embedding and output of a
            # TQ2_0 file as Q6_K) dequantised as llama.cpp does (the float tensors then hold those values)
            return np.asarray(gguf.quants.dequantize(raw, qt), dtype=np.float32).reshape(shape), qt.name
        except NotImplementedError:
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {qt.name}, which the gguf package cannot "
                                 "dequantise; re-quantise the file with llama-quantize to TQ1_0/TQ2_0 weights and "
                                 "F16 token_embd/output (--token-embedding-type f16 --output-tensor-type f16)") from None


def _config_from_gguf(g: GGUFFile) -> ModelConfig:
    cfg = _config_from_fields(g)
    blocks = {n.split(".")[1] for n in g.tensors if n.startswith("blk.")}
    if len(blocks) != cfg.num_layers or f"blk.{cfg.num_layers - 1}.attn_q.weight" not in g.tensors:
        raise ModelFileError(f"{g.path}: the config has {cfg.num_layers} layers but the file has tensors for {len(blocks)}")
    return cfg


def _config_from_fields(g: GGUFFile) -> ModelConfig:
    arch = g.field("general.architecture")
    if arch not in ("bitnet", "llama"):
        raise ModelFileError(f"{g.path}: architecture {arch!r} is not supported (bitnet or llama)")
    stored = g.field("bittern.model_config")
    if stored is not None:
        try:
            return ModelConfig.from_dict(json.loads(stored))
        except (TypeError, ValueError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{g.path}: bittern.model_config is invalid ({e})") from None
    def required(key: str) -> int:
        value = g.field(key)
        if value is None:
            raise ModelFileError(f"{g.path}: metadata {key!r} is missing")
        return int(value)

    try:
        emb = g.tensors["token_embd.weight"]
        vocab = int(emb.shape[1])
        heads = required(f"{arch}.attention.head_count")
        cfg = ModelConfig(
            vocab_size=vocab, hidden_size=required(f"{arch}.embedding_length"),
            num_layers=required(f"{arch}.block_count"), num_heads=heads,
            num_kv_heads=int(g.field(f"{arch}.attention.head_count_kv", heads)),
            intermediate_size=required(f"{arch}.feed_forward_length"),
            max_seq_len=int(g.field(f"{arch}.context_length", 2048)),
            rope_theta=float(g.field(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(g.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            activation=str(g.field("bittern.activation", "swiglu")), subln=arch == "bitnet",
            tie_embeddings=arch == "bitnet" or "output.weight" not in g.tensors,
            name=str(g.field("general.name", arch)),
        )
        scaling = _rope_scaling_from_fields(g, arch)
        if scaling is not None:
            cfg = cfg.replace(extra={"rope_scaling": scaling})
    except KeyError as e:
        raise ModelFileError(f"{g.path}: missing tensor {e.args[0]!r}") from None
    except ModelFileError:
        raise
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{g.path}: missing or invalid {arch} metadata ({e})") from None
    return cfg


def _rope_scaling_from_fields(g: GGUFFile, arch: str) -> dict[str, Any] | None:
    """HF-style ``rope_scaling`` of a foreign GGUF's ``rope.scaling.*`` keys (None when unscaled)."""
    kind = g.field(f"{arch}.rope.scaling.type", "none")
    if ROPE_FREQS in g.tensors:
        raise ModelFileError(f"{g.path}: a {ROPE_FREQS!r} tensor (per-frequency RoPE factors, e.g. Llama-3 scaling) "
                             "is only read from GGUFs that bittern wrote; convert the Hugging Face checkpoint instead")
    if kind in ("none", None):
        return None
    if kind != "linear":
        raise ModelFileError(f"{g.path}: RoPE scaling type {kind!r} is not supported (only linear)")
    scaling: dict[str, Any] = {"rope_type": "linear", "factor": float(g.field(f"{arch}.rope.scaling.factor", 1.0))}
    orig = g.field(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    try:
        return check_rope_scaling(scaling)
    except ValueError as e:
        raise ModelFileError(f"{g.path}: {e}") from None


def _ternary_from_array(w: np.ndarray, exact_scale: float | None, where: str) -> TernaryWeight:
    if not bool(np.isfinite(w).all()):
        raise ModelFileError(f"{where}: holds NaN or Inf (a corrupted block scale or value)")
    a = np.abs(w)
    g = float(a.max()) if a.size else 0.0
    if g > 0 and bool(np.all((a == 0) | (a == g))):
        codes = torch.from_numpy(np.sign(w).astype(np.int8))
        gamma = g
        if exact_scale is not None and float(np.float16(exact_scale)) == g:
            gamma = exact_scale
        return TernaryWeight.from_codes(codes, gamma)
    if g == 0:
        return TernaryWeight.from_codes(torch.zeros(w.shape, dtype=torch.int8), exact_scale or 1e-5)
    warnings.warn(f"{where}: not a single-scale ternary tensor; re-quantised with the absmean rule (lossy)")
    codes, gamma = quantize_weight(torch.from_numpy(np.ascontiguousarray(w)))
    return TernaryWeight.from_codes(codes, gamma)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> Transformer:
    """A frozen packed model from a GGUF file (arch ``bitnet`` or ``llama``; TQ1_0/TQ2_0/F16/BF16/F32)."""
    g = GGUFFile(path)
    cfg = _config_from_gguf(g)
    arch = g.field("general.architecture")
    where = str(g.path)

    def ternary(lname: str, out: int, inp: int) -> TernaryWeight:
        gname = gguf_name(f"{lname}.weight")
        w, _ = g.array(gname)
        if w.shape != (out, inp):
            raise ModelFileError(f"{where}: tensor {gname!r} has shape {w.shape}, the config expects {(out, inp)}")
        leaf = lname.split(".")[-1]
        if arch == "llama" and leaf in ("q_proj", "k_proj"):
            w = _unpermute_rope(w, cfg.num_heads if leaf == "q_proj" else cfg.num_kv_heads)
        exact = g.field(f"bittern.scale.{gname}")
        return _ternary_from_array(w, None if exact is None else float(exact), f"{where}: {gname}")

    def floats(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gname = gguf_name(name)
        w, _ = g.array(gname)
        return torch.from_numpy(np.array(w, dtype=np.float32, copy=True))

    known = {gguf_name(n) for n in _all_param_names(cfg)} | {ROPE_FREQS}  # rope_freqs: already in cfg.extra
    extra = [n for n in g.tensors if n not in known]
    if extra:
        raise ModelFileError(f"{where}: tensors that do not match the config: {sorted(extra)[:5]}")
    return assemble_packed(cfg, ternary, floats, where, dtype)


def _all_param_names(cfg: ModelConfig) -> list[str]:
    from .assemble import float_param_shapes
    return [f"{n}.weight" for n in linear_names(cfg)] + list(float_param_shapes(cfg))


def _sentencepiece_tokenizer(g: GGUFFile):
    """A ``tokenizers`` BPE equivalent to llama.cpp's "llama" (SentencePiece) tokenizer of a GGUF.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is the highest-scoring token; the
    same merges, ranked by that score, make a BPE model that tokenizes identically (this is how
    transformers converts SentencePiece BPE models too). Spaces become "▁" (plus one in front with
    ``add_space_prefix``); ``<0xXX>`` byte tokens give byte fallback for characters not in the vocab.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import AddedToken, decoders, models, normalizers

    from ..tokenizer import Tokenizer

    tokens = [str(t) for t in (g.field("tokenizer.ggml.tokens") or [])]
    if not tokens:
        raise ModelFileError(f"{g.path}: tokenizer.ggml.model is 'llama' but there are no tokens")
    scores = [float(x) for x in (g.field("tokenizer.ggml.scores") or [0.0] * len(tokens))]
    types = [int(t) for t in (g.field("tokenizer.ggml.token_type") or [1] * len(tokens))]
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise ModelFileError(f"{g.path}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types")
    vocab: dict[str, int] = {}
    special, user = [], []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == 5 or t in vocab:  # UNUSED padding rows
            continue
        vocab[t] = i
        if ty == 3:
            special.append(t)
        elif ty == 4:
            user.append(t)
    mergeable = {t: i for t, i in vocab.items() if types[i] == 1}  # NORMAL: no byte, control or unknown pieces
    candidates = []
    for t, i in mergeable.items():
        if types[i] != 1:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in mergeable and right in mergeable:
                candidates.append((-scores[i], i, vocab[left], vocab[right], left, right))
    candidates.sort()
    merges = [(c[4], c[5]) for c in candidates]
    unk_id = g.field("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    has_bytes = any(ty == 6 for ty in types)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=has_bytes,
                                fuse_unk=True))
    prefix = bool(g.field("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    if special:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def tok_at(key: str) -> str | None:
        i = g.field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
    return Tokenizer(hf, tok_at("tokenizer.ggml.eos_token_id"), tok_at("tokenizer.ggml.bos_token_id"),
                     g.field("tokenizer.chat_template"))


def load_gguf_tokenizer(path: str | os.PathLike):
    """A :class:`~bittern.tokenizer.Tokenizer` rebuilt from a GGUF's vocab (``gpt2`` byte-level BPE or
    ``llama`` SentencePiece), or None when it has none."""
    g = GGUFFile(path)
    kind = g.field("tokenizer.ggml.model")
    if kind in (None, "none", "no_vocab"):
        return None
    if kind == "llama":
        return _sentencepiece_tokenizer(g)
    if kind != "gpt2":
        warnings.warn(f"{path}: tokenizer type {kind!r} is not rebuilt (only gpt2 and llama); no tokenizer")
        return None
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from ..tokenizer import Tokenizer

    tokens = list(g.field("tokenizer.ggml.tokens") or [])
    types = list(g.field("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in (g.field("tokenizer.ggml.merges") or [])]
    vocab, special, user = {}, [], []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if int(ty) == 5:  # UNUSED padding rows
            continue
        vocab[t] = i
        if int(ty) == 3:
            special.append(t)
        elif int(ty) == 4:
            user.append(t)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = g.field("tokenizer.ggml.pre", "default")
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(
            pattern=__import__("tokenizers").Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            behavior="isolated")
        hf.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if special:
        hf.add_special_tokens([AddedToken(t, special=True) for t in special])
    if user:
        hf.add_tokens([AddedToken(t, special=False) for t in user])

    def tok_at(key: str) -> str | None:
        i = g.field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
    return Tokenizer(hf, tok_at("tokenizer.ggml.eos_token_id"), tok_at("tokenizer.ggml.bos_token_id"),
                     g.field("tokenizer.chat_template"))
