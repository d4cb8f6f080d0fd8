"""Hugging Face checkpoints in and out: ``bitnet`` (2B4T), LLaMA with a BitNet quantization_config,
and LLaMA-layout latent-weight checkpoints (1bitLLM), all as safetensors.

What a linear weight may look like in a checkpoint, and how it is read (transformers'
``integrations/bitnet.py`` defines these; ``quantization_config.linear_class`` tells them apart):

* ``uint8 [out/4, in]``: 2-bit codes packed along dim 0. Stored value ``c + 1``; the 2-bit field
  ``i`` (bits ``2i..2i+1``) of packed row ``r`` holds original row ``i * (out/4) + r``.
  With ``linear_class="bitlinear"`` (2B4T's, and the default) ``weight_scale`` holds ``1/gamma``
  (transformers divides by it); with ``"autobitlinear"`` (offline) it holds ``gamma`` (multiplied).
* float with a ``weight_scale`` (``autobitlinear`` offline, unpacked): the ternary values themselves.
* float with no scale (``autobitlinear`` online, or no quantization_config at all, e.g. 1bitLLM's
  LLaMA-layout checkpoints): latent weights, quantised here with the absmean rule of
  :mod:`bittern.quant` exactly as those models quantise them on the fly.

1bitLLM's sub-norm names (``self_attn.inner_attn_ln``, ``mlp.ffn_layernorm``) are read as
``attn_sub_norm`` / ``ffn_sub_norm``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..configs import ModelConfig
from ..model import Transformer, check_rope_scaling
from ..modelfile import ModelFileError, atomic_write
from ..pack import TernaryWeight
from ..quant import quantize_weight, weight_scale
from .assemble import ModelSource, StreamingSource, TensorSource, as_source, assemble_packed, check_sizes, linear_names
from .safetensors_io import CheckpointTensors, TensorSpec, default_permissions, write_safetensors_streaming

HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
_SUBNORM_ALIASES = {"self_attn.inner_attn_ln": "self_attn.attn_sub_norm", "mlp.ffn_layernorm": "mlp.ffn_sub_norm"}
_ACTIVATIONS = {"relu2": "relu2", "silu": "swiglu", "swish": "swiglu"}


# ----------------------------------------------------------------------------- HF packing (dim-0, 4 rows/byte)


def unpack_hf_weight(packed: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[4 * rows, in]`` of a transformers-packed uint8 weight ``[rows, in]``."""
    p = packed.to(torch.uint8)
    fields = [((p >> (2 * i)) & 3) for i in range(4)]
    return (torch.cat(fields, dim=0).to(torch.int8) - 1)


def pack_hf_weight(codes: torch.Tensor) -> torch.Tensor:
    """transformers' packed uint8 ``[out/4, in]`` of int8 codes ``[out, in]`` (``out % 4 == 0``)."""
    out = codes.shape[0]
    if out % 4:
        raise ValueError(f"transformers' BitNet packing needs out_features divisible by 4, got {out}")
    rows = out // 4
    stored = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros((rows, codes.shape[1]), dtype=torch.uint8)
    for i in range(4):
        packed |= stored[i * rows:(i + 1) * rows] << (2 * i)
    return packed


# ----------------------------------------------------------------------------- config


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory."""
    path = Path(directory) / HF_CONFIG
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{path}: not a JSON object")
    return cfg


def _quant_config(hf: dict[str, Any], where: str) -> dict[str, Any] | None:
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ModelFileError(f"{where}: quantization_config must be an object (got {q!r})")
    if q.get("quant_method") != "bitnet":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ModelFileError(f"{where}: quantization method {method!r} is not supported (only 'bitnet')")
    q = dict(q)
    q.setdefault("linear_class", "bitlinear")
    q.setdefault("quantization_mode", "offline")
    if q["linear_class"] not in ("bitlinear", "autobitlinear"):
        raise ModelFileError(f"{where}: unknown BitNet linear_class {q['linear_class']!r}")
    if q.get("use_rms_norm"):
        raise ModelFileError(f"{where}: quantization_config.use_rms_norm=true (an RMSNorm inside every linear on top of "
                             "the block pre-norms) has no bittern equivalent yet")
    skip = [m for m in (q.get("modules_to_not_convert") or []) if "lm_head" not in m]
    if skip:
        raise ModelFileError(f"{where}: modules_to_not_convert {skip} would keep some linears in high precision; "
                             "bittern needs every block linear ternary")
    return q


def _special_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """The config's BOS / EOS token ids (an int, or a list of ints for EOS), kept for the way back to HF."""
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id"):
        value = hf.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            out[key] = list(value)
    return out


def hf_model_config(hf: dict[str, Any], where: str = "config.json", has_subnorms: bool | None = None) -> ModelConfig:
    """The bittern :class:`ModelConfig` of a Hugging Face ``bitnet``/``llama`` config dict."""
    model_type = hf.get("model_type")
    if model_type not in ("bitnet", "llama"):
        raise ModelFileError(f"{where}: model_type {model_type!r} is not supported (supported: 'bitnet', 'llama')")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        act = hf.get("hidden_act", "relu2" if model_type == "bitnet" else "silu")
        if act not in _ACTIVATIONS:
            raise ModelFileError(f"{where}: hidden_act {act!r} is not supported (relu2 or silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ModelFileError(f"{where}: attention/MLP biases are not supported (BitNet b1.58 has none)")
        head_dim = hf.get("head_dim")
        if head_dim is not None and int(head_dim) != hidden // heads:
            raise ModelFileError(f"{where}: head_dim {head_dim} differs from hidden_size/num_attention_heads")
        rope = hf.get("rope_parameters") or {}
        theta = float(hf.get("rope_theta", rope.get("rope_theta", 500000.0 if model_type == "bitnet" else 10000.0)))
        subln = model_type == "bitnet" if has_subnorms is None else has_subnorms
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            intermediate_size=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)), rope_theta=theta,
            # transformers' defaults when the key is absent: BitNetConfig 1e-5, LlamaConfig 1e-6
            norm_eps=float(hf.get("rms_norm_eps", 1e-5 if model_type == "bitnet" else 1e-6)),
            activation=_ACTIVATIONS[act], subln=subln,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), linear="bitnet",
            name=str(hf.get("_name_or_path") or model_type),
            extra={"hf_model_type": model_type, **_special_ids(hf)},
        )
    except KeyError as e:
        raise ModelFileError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{where}: invalid config ({e})") from None


def hf_rope_scaling(hf: dict[str, Any], where: str = HF_CONFIG) -> dict[str, Any] | None:
    """The config's RoPE scaling (``rope_scaling``, or transformers 5's ``rope_parameters``), checked; None
    for plain RoPE."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if scaling is None:
        return None
    try:
        return check_rope_scaling(scaling)
    except ValueError as e:
        raise ModelFileError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- import


def _hf_name(name: str) -> str:
    """The checkpoint's name of bittern parameter ``name``."""
    return name if name == "lm_head.weight" else f"model.{name}"


def _decode_linear(src: CheckpointTensors, name: str, out: int, inp: int, quant: dict[str, Any] | None,
                   streaming: bool = False) -> TernaryWeight:
    read = src.load if streaming else src.get
    key = f"model.{name}.weight"
    w = read(key)
    gamma = _stored_gamma(src, name, quant, read)
    where = f"{src.directory}: {key}"
    if w.dtype == torch.uint8:
        if tuple(w.shape) != (out // 4, inp) or out % 4:
            raise ModelFileError(f"{where}: packed shape {tuple(w.shape)}, the config expects ({out // 4}, {inp}) "
                                 f"for a ({out}, {inp}) weight")
        if gamma is None:
            raise ModelFileError(f"{where}: packed weight without 'model.{name}.weight_scale'")
        fields = w & 0x55 & (w >> 1)  # a field holding 3 has both bits set
        if bool(fields.any()):
            raise ModelFileError(f"{where}: corrupt packed weight (a 2-bit field holds 3; only 0, 1, 2 are valid)")
        return TernaryWeight.from_codes(unpack_hf_weight(w), gamma)
    if not w.is_floating_point():
        raise ModelFileError(f"{where}: dtype {w.dtype} is neither packed uint8 nor float")
    if tuple(w.shape) != (out, inp):
        raise ModelFileError(f"{where}: shape {tuple(w.shape)}, the config expects ({out}, {inp})")
    if gamma is not None:
        codes = w.float()
        if not bool(((codes == -1) | (codes == 0) | (codes == 1)).all()):
            raise ModelFileError(f"{where}: a weight with weight_scale must hold only -1, 0, 1")
        return TernaryWeight.from_codes(codes.to(torch.int8), gamma)
    try:
        codes, g = quantize_weight(w)
    except ValueError as e:
        raise ModelFileError(f"{where}: {e}") from None
    return TernaryWeight.from_codes(codes, g)


def _stored_gamma(src: CheckpointTensors, name: str, quant: dict[str, Any] | None, read) -> torch.Tensor | None:
    """gamma from linear ``name``'s ``weight_scale`` (per the config's convention), or None without one."""
    scale_key = f"model.{name}.weight_scale"
    if scale_key not in src:
        return None
    scale = read(scale_key).float().reshape(-1)
    where = f"{src.directory}: model.{name}.weight"
    if scale.numel() != 1:
        raise ModelFileError(f"{where}: weight_scale has {scale.numel()} values, expected one per tensor")
    s = float(scale[0].double())
    if not (s > 0 and s != float("inf")):
        raise ModelFileError(f"{where}: weight_scale {s} is not positive and finite")
    inverse = quant is None or quant["linear_class"] == "bitlinear"
    return torch.tensor(1.0 / s if inverse else s, dtype=torch.float64).float()


def _linear_gamma(src: CheckpointTensors, name: str, quant: dict[str, Any] | None) -> float:
    """gamma of linear ``name`` without decoding its codes: the stored scale, or the absmean of latent weights."""
    gamma = _stored_gamma(src, name, quant, src.load)
    if gamma is not None:
        return float(gamma)
    w = src.load(f"model.{name}.weight")
    if not w.is_floating_point():
        raise ModelFileError(f"{src.directory}: model.{name}.weight: dtype {w.dtype} without a weight_scale")
    return float(weight_scale(w))


def _inspect(directory: Path) -> tuple[dict[str, Any], CheckpointTensors, ModelConfig, dict[str, Any] | None]:
    hf = read_hf_config(directory)
    where = str(directory / HF_CONFIG)
    quant = _quant_config(hf, where)
    src = CheckpointTensors(directory)
    names = set(src.names())
    has_sub = any(".attn_sub_norm." in n or ".inner_attn_ln." in n for n in names)
    cfg = hf_model_config(hf, where, has_subnorms=True if hf.get("model_type") == "bitnet" else has_sub)
    last = f"model.layers.{cfg.num_layers - 1}.self_attn.q_proj.weight"
    if last not in names:
        raise ModelFileError(f"{where}: num_hidden_layers is {cfg.num_layers} but the checkpoint has no {last!r}")
    check_sizes(cfg, where)
    return hf, src, cfg, quant


def _float_getter(src: CheckpointTensors, streaming: bool = False):
    read = src.load if streaming else src.get

    def floats(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = _hf_name(name)
        if key not in src:
            for new, old in ((n, o) for o, n in _SUBNORM_ALIASES.items()):
                if new in key and key.replace(new, old) in src:
                    key = key.replace(new, old)
                    break
        if name == "lm_head.weight" and key not in src:
            raise ModelFileError(f"{src.directory}: lm_head.weight is missing and tie_word_embeddings is false")
        return read(key)
    return floats


def _prepare(directory: Path) -> tuple[CheckpointTensors, ModelConfig, dict[str, Any] | None]:
    hf, src, cfg, quant = _inspect(directory)
    scaling = hf_rope_scaling(hf, str(directory / HF_CONFIG))
    if scaling:
        cfg = cfg.replace(extra={**cfg.extra, "rope_scaling": scaling})
    if quant is not None and quant["quantization_mode"] == "online":
        quant = None  # latent weights, quantised on the fly by transformers: same as no config
    expected = {f"model.{n}.weight" for n in linear_names(cfg)}
    unknown = [n for n in src.names() if n.endswith(".weight") and ("_proj." in n) and n not in expected]
    if unknown:
        raise ModelFileError(f"{directory}: tensors not in the config's {cfg.num_layers} layers: {unknown[:3]}")
    return src, cfg, quant


def load_hf(directory: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> Transformer:
    """A frozen packed model from a local Hugging Face checkpoint directory (see the module docstring)."""
    directory = Path(directory)
    src, cfg, quant = _prepare(directory)
    return assemble_packed(cfg, lambda n, o, i: _decode_linear(src, n, o, i, quant), _float_getter(src),
                           str(directory), dtype)


def hf_source(directory: str | os.PathLike) -> StreamingSource:
    """A Hugging Face checkpoint as a :class:`~bittern.interop.assemble.StreamingSource`: every tensor is
    read from disk, decoded and checked when a writer asks for it, and not kept (streaming conversion)."""
    directory = Path(directory)
    src, cfg, quant = _prepare(directory)
    return StreamingSource(cfg, lambda n, o, i: _decode_linear(src, n, o, i, quant, streaming=True),
                           _float_getter(src, streaming=True), str(directory), lambda n: _linear_gamma(src, n, quant))


def load_hf_latent(directory: str | os.PathLike) -> Transformer:
    """A trainable (fake-quant, :class:`~bittern.layers.BitLinear`) model from a latent-weight checkpoint.

    This is the reference twin of :func:`load_hf` for 1bitLLM-style checkpoints.
    """
    directory = Path(directory)
    hf, src, cfg, quant = _inspect(directory)
    model = Transformer(cfg)
    floats = _float_getter(src)
    state = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if any(name == f"{n}.weight" for n in linear_names(cfg)):
            state[name] = src.get(f"model.{name}").float()
        else:
            state[name] = floats(name, tuple(p.shape)).float()
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------- export


def hf_config_of(config: ModelConfig, dtype: str, linear_class: str = "bitlinear",
                 bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` for a bittern model (``bitnet`` with sub-norms, else ``llama``)."""
    if config.bitlinear_norm:
        raise ValueError("a model with RMSNorm inside every linear (bitlinear_norm) has no transformers equivalent")
    if config.subln and config.activation != "relu2":
        raise ValueError("transformers' BitNet models use relu2 with sub-norms; a SiLU model with sub-norms "
                         "(1bitLLM style) cannot be loaded by transformers")
    bitnet = config.subln
    cfg: dict[str, Any] = {
        "architectures": ["BitNetForCausalLM" if bitnet else "LlamaForCausalLM"],
        "model_type": "bitnet" if bitnet else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "relu2" if config.activation == "relu2" else "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False, "torch_dtype": dtype,
        "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": "offline", "modules_to_not_convert": None,
                                "use_rms_norm": False},
    }
    scaling = check_rope_scaling(config.extra.get("rope_scaling"))
    if scaling is not None:
        cfg["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
    # written even when unknown (null): transformers' defaults (128000 / 128001 for bitnet) may lie
    # outside a smaller vocabulary
    cfg["bos_token_id"] = bos_id if bos_id is not None else config.extra.get("bos_token_id")
    cfg["eos_token_id"] = eos_id if eos_id is not None else config.extra.get("eos_token_id")
    return cfg


def ternary_of(model: Transformer, name: str) -> TernaryWeight:
    """The packed ternary weight of linear ``name`` (quantising a latent BitLinear weight if needed)."""
    return ModelSource(model).ternary(name)


def save_hf(model: Transformer | TensorSource, directory: str | os.PathLike, dtype: str = "bfloat16",
            linear_class: str = "bitlinear", tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint that transformers loads (``BitNetForCausalLM`` or
    ``LlamaForCausalLM`` with a BitNet quantization_config). Tensors are written one at a time;
    ``model`` may be a :class:`~bittern.interop.assemble.TensorSource` (streaming conversion).

    ``weight_scale`` is stored in float32 whatever ``dtype`` is, so bittern reads back the exact scale
    (transformers casts it to the model dtype when loading). With ``linear_class="bitlinear"`` the
    stored value is ``float32(1 / gamma)`` computed in float64, which may differ from gamma by one
    float32 ulp on the way back; ``"autobitlinear"`` stores gamma itself (exact round trip).
    """
    if model.config.linear != "bitnet":
        raise ValueError("only a BitNet model can be exported")
    source = as_source(model)
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise ValueError("linear_class must be 'bitlinear' or 'autobitlinear'")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError("dtype must be float32, float16 or bfloat16")
    cfg = model.config
    tok = None
    if tokenizer_dir is not None:
        from ..tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer_dir)
    config = hf_config_of(cfg, dtype, linear_class, tok.bos_id if tok else None, tok.eos_id if tok else None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specs: list[TensorSpec] = []
    for name, shape in source.float_shapes().items():
        specs.append(TensorSpec(_hf_name(name), torch_dtype, shape,
                                lambda name=name: source.floats(name)))  # converted as written
    for name in linear_names(cfg):
        out, inp = source.linear_shape(name)
        if out % 4:
            raise ValueError(f"{name}: out_features {out} is not divisible by 4 (transformers' packing)")
        specs.append(TensorSpec(f"model.{name}.weight", torch.uint8, (out // 4, inp),
                                lambda name=name: pack_hf_weight(source.ternary(name).codes())))

        def scale(name: str = name) -> torch.Tensor:
            g = source.scale(name)
            value = 1.0 / g if linear_class == "bitlinear" else g
            return torch.tensor([value], dtype=torch.float64).float()
        specs.append(TensorSpec(f"model.{name}.weight_scale", torch.float32, (1,), scale))
    write_safetensors_streaming(directory / "model.safetensors", specs, {"format": "pt"})
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        src = src if src.is_dir() else src.parent
        for fname in TOKENIZER_FILES[:2]:
            if (src / fname).is_file():
                data = (src / fname).read_bytes()
                atomic_write(directory / fname, lambda p, data=data: (p.write_bytes(data), default_permissions(p)))
    text = json.dumps(config, indent=2)
    atomic_write(directory / HF_CONFIG, lambda p: (p.write_text(text), default_permissions(p)))
    return directory


def load_tokenizer_if_any(directory: str | os.PathLike, strict: bool = False):
    """The :class:`~bittern.tokenizer.Tokenizer` in ``directory`` (tokenizer.json, else a SentencePiece
    tokenizer.model converted with transformers), or None. A tokenizer file that cannot be read is a
    warning (the model is still usable), or with ``strict`` an error (a conversion would drop it)."""
    directory = Path(directory)

    def broken(what: str, e: Exception) -> None:
        if strict:
            raise ModelFileError(f"{directory}: {what} cannot be read ({e}); fix or remove it") from None
        warnings.warn(f"{directory}: {what} not loaded ({e})")

    if not (directory / "tokenizer.json").is_file():
        if (directory / "tokenizer.model").is_file():
            from .spm import sentencepiece_tokenizer
            try:
                return sentencepiece_tokenizer(directory)
            except Exception as e:  # a broken tokenizer should not hide the model
                broken("SentencePiece tokenizer", e)
                return None
        return None
    from ..tokenizer import load_tokenizer
    try:
        return load_tokenizer(directory)
    except Exception as e:  # a broken tokenizer should not hide the model
        broken("tokenizer", e)
        return None
