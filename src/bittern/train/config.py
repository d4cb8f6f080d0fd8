"""Training configuration: one dataclass, read from JSON (or YAML when PyYAML is installed), with overrides.

Overrides are ``key=value`` strings; values are parsed as JSON when they parse (``1e-3``, ``true``,
``[0.9, 0.95]``) and kept as strings otherwise; ``model.FIELD=value`` sets a field of the model.
The ``model`` section is ``{"name": "<named config>", ...fields to change...}`` (see
:mod:`bittern.configs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configs import ModelConfig, get_config
from ..errors import UsageError


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``train_config.json`` in the run directory."""

    data: str = ""
    out_dir: str = "runs/train"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "tiny"})
    init_from: str | None = None          # starting weights: an FP LLaMA-family HF checkpoint directory (conversion),
                                          # or a bittern training run / checkpoint directory (continued training)
    quant_ramp_steps: int = 0             # lambda = min(step / quant_ramp_steps, 1); 0 = full quantisation at once
    seq_len: int = 128
    batch_size: int = 16                  # global: sequences per optimizer step, over all processes
    micro_batch_size: int = 0             # per process and forward pass; 0 = batch_size / world (no accumulation)
    steps: int = 1000                     # optimizer steps; the lr / wd schedules are laid out over this (keep it when resuming)
    lr: float | None = None               # None: 1.5e-3 for BitNet, 2.5e-4 for FP (the FAQ's ~6x)
    warmup: int = 100
    lr_schedule: str = "auto"             # auto: "bitnet" (two-stage) for BitNet, "cosine" for FP
    stage2_ratio: float = 2 / 3
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    wd_schedule: str = "auto"             # auto: "two-stage" for BitNet, "constant" for FP
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"               # auto: bf16 autocast on CUDA, fp32 on CPU; or "fp32", "bf16"
    activation_checkpointing: bool = False
    distributed: str = "auto"             # auto: DDP when launched with torchrun (WORLD_SIZE > 1); "none", "ddp", "fsdp"
    eval_every: int = 100
    eval_windows: int = 64
    save_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    max_seconds: float = 0.0              # stop (and save) after this wall time; 0 = no limit
    num_threads: int = 0                  # torch CPU threads; 0 = torch's default
    progress: bool = True
    plot: bool = True
    sleep_per_step: float = 0.0           # testing aid: slow each step down (for kill/resume tests)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        if isinstance(self.model, str):
            self.model = {"name": self.model}

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` of the ``model`` section."""
        spec = dict(self.model)
        run = bittern_run_dir(self.init_from) if self.init_from else None
        if run is not None:
            return ModelConfig.from_dict(json.loads((run / "model_config.json").read_text()))
        if self.init_from:
            from .hf_llama import llama_model_config

            path = Path(self.init_from) / "config.json"
            return llama_model_config(read_config_file(path), linear=spec.get("linear", "bitnet"),
                                      name=Path(self.init_from).name, where=str(path))
        name = spec.pop("name", None)
        try:
            return get_config(name, **spec) if name else ModelConfig.from_dict(spec)
        except (TypeError, ValueError, ZeroDivisionError) as e:  # ZeroDivisionError: e.g. num_heads=0
            raise UsageError(f"bad model section {self.model!r}: {e}") from None

    @property
    def is_bitnet(self) -> bool:
        return self.model_config().linear == "bitnet"

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1.5e-3 if self.is_bitnet else 2.5e-4)

    @property
    def lr_schedule_name(self) -> str:
        return self.lr_schedule if self.lr_schedule != "auto" else ("bitnet" if self.is_bitnet else "cosine")

    @property
    def wd_schedule_name(self) -> str:
        return self.wd_schedule if self.wd_schedule != "auto" else ("two-stage" if self.is_bitnet else "constant")

    def validate(self) -> "TrainConfig":
        """Check the types and ranges of all fields; raises :class:`UsageError` naming the bad field."""
        for name in ("seq_len", "batch_size", "steps", "eval_windows"):
            _check_int(name, getattr(self, name), 1)
        for name in ("micro_batch_size", "warmup", "eval_every", "save_every", "keep_last", "log_every",
                     "quant_ramp_steps", "seed", "num_threads"):
            _check_int(name, getattr(self, name), 0)
        if self.lr is not None:
            _check_float("lr", self.lr, 0.0, positive=True)
        _check_float("stage2_ratio", self.stage2_ratio, 0.0, 1.0, positive=True)
        _check_float("final_lr_ratio", self.final_lr_ratio, 0.0, 1.0)
        for name in ("weight_decay", "grad_clip", "max_seconds", "sleep_per_step"):
            _check_float(name, getattr(self, name), 0.0)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
            raise UsageError(f"betas must be a pair of numbers in [0, 1), e.g. [0.9, 0.95], got {_show(betas)}")
        for name in ("activation_checkpointing", "progress", "plot"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {_show(getattr(self, name))}")
        for name in ("data", "out_dir", "precision", "distributed", "lr_schedule", "wd_schedule"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"{name} must be a string, got {_show(getattr(self, name))}")
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise UsageError(f"init_from must be a directory path, got {_show(self.init_from)}")
        if not isinstance(self.model, dict):
            raise UsageError(f"model must be a named config or an object of model fields, got {_show(self.model)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise UsageError(f"distributed must be auto, none, ddp or fsdp, got {self.distributed!r}")
        if self.lr_schedule not in ("auto", "bitnet", "cosine", "constant"):
            raise UsageError(f"lr_schedule must be auto, bitnet, cosine or constant, got {self.lr_schedule!r}")
        if self.wd_schedule not in ("auto", "two-stage", "constant"):
            raise UsageError(f"wd_schedule must be auto, two-stage or constant, got {self.wd_schedule!r}")
        model = self.model_config()
        if self.seq_len > model.max_seq_len:
            raise UsageError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {model.max_seq_len}")
        if not self.data:
            raise UsageError("no training data: set data=SHARD_DIR (made by `bittern data prepare`)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown training config keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value) if isinstance(value, (str, bool, list, dict)) or value is None else repr(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{name} must be an integer, got {_show(value)}")
    if value < minimum:
        raise UsageError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float | None = None, positive: bool = False) -> None:
    if not _is_real(value):
        raise UsageError(f"{name} must be a finite number, got {_show(value)}")
    if value < low or (positive and value == low) or (high is not None and value > high):
        bound = f"> {low:g}" if positive else f">= {low:g}"
        raise UsageError(f"{name} must be {bound}{f' and <= {high:g}' if high is not None else ''}, got {value!r}")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of config dict ``d`` with ``key=value`` overrides applied (``model.x=`` sets a model field)."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        target = d
        for p in parts[:-1]:
            if not isinstance(target.get(p, {}), dict):
                raise UsageError(f"override {key!r}: {p!r} is not a section")
            target = target.setdefault(p, {})
        target[parts[-1]] = _parse_value(value)
    return d


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config file as a dict: ``.json``, or ``.yaml``/``.yml`` when PyYAML is installed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use JSON") from None
        d = yaml.safe_load(text)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    return d


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a file (or defaults) plus overrides, validated."""
    d = read_config_file(path) if path else TrainConfig().to_dict()
    return TrainConfig.from_dict(apply_overrides(d, overrides or [])).validate()


def bittern_run_dir(path: str | os.PathLike) -> Path | None:
    """The training run directory that ``path`` (a run or one of its checkpoints) belongs to, else None."""
    p = Path(path)
    for d in (p, p.parent.parent):
        if (d / "model_config.json").is_file() and (d / "checkpoints").is_dir():
            return d
    return None
