"""The training loop: BitNet b1.58 and FP models, one process or many, resumable exactly.

Read top to bottom: set up (processes, model, data, optimizer), resume from the latest checkpoint if
any, then for each step set the scheduled lr / weight decay / quantisation strength, accumulate
gradients over micro-batches, stop on a non-finite loss, clip, step; validate, log and checkpoint
periodically. The run directory gets ``train_config.json``, ``metrics.jsonl``, ``loss_curve.png``,
``summary.json``, ``tokenizer.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ModelConfig
from ..errors import UsageError
from ..model import Transformer
from ..tokenizer import load_tokenizer
from . import checkpoint as ckpt
from .config import TrainConfig, bittern_run_dir
from .data import WindowLoader, eval_windows, load_split, read_meta, text_bytes
from .distributed import (DistEnv, all_reduce_mean, barrier, full_state, init_distributed, load_full_state,
                          set_grad_sync, shutdown, wrap_model)
from .metrics import MetricsLog, plot_losses
from .schedules import lr_at, quant_ramp, wd_at


class TrainingDiverged(ValueError):
    """The loss (or gradient norm) became NaN or Inf; training stopped without saving."""


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def _enable_activation_checkpointing(model: Transformer) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kw: Any) -> torch.Tensor:
            return checkpoint(_inner, *args, use_reentrant=False, **kw)

        block.forward = forward


def build_model(cfg: TrainConfig) -> Transformer:
    """A fresh model for ``cfg`` (seeded), or the weights ``init_from`` names: a bittern run's latest (or the
    given) checkpoint, or an FP HF checkpoint."""
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config()
    run = bittern_run_dir(cfg.init_from) if cfg.init_from else None
    if run is not None:
        given = Path(cfg.init_from)
        point = given if (given / "state.json").is_file() else ckpt.latest_checkpoint(run)
        if point is None:
            raise UsageError(f"{cfg.init_from}: the run has no checkpoint to start from")
        state, _ = ckpt.load_model_weights(point)
        model = Transformer(mcfg.replace(max_seq_len=max(mcfg.max_seq_len, cfg.seq_len)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and mcfg.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{point}: weights do not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
        return model
    if cfg.init_from:
        from .hf_llama import load_llama_checkpoint

        hf_cfg, state = load_llama_checkpoint(cfg.init_from, linear=mcfg.linear)
        mcfg = hf_cfg.replace(max_seq_len=max(hf_cfg.max_seq_len, cfg.seq_len))
        model = Transformer(mcfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and mcfg.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{cfg.init_from}: weights do not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
        return model
    return Transformer(mcfg)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings), none on norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, cfg: TrainConfig) -> tuple[float, int]:
    """Summed cross-entropy (nats) and the number of predicted tokens over validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        with _autocast(cfg, device):
            logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    return total, count


def _model_state_for_save(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def _check_same_model(run_dir: Path, saved: dict[str, Any] | None, mcfg: ModelConfig) -> None:
    """UsageError naming the fields when the checkpoint's model config differs from the one asked for now."""
    if not saved:
        return
    try:
        saved = ModelConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass
    now = mcfg.to_dict()
    ignore = ("name", "max_seq_len")  # neither changes the weights
    diffs = [f"{k} {saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
             if k not in ignore and saved.get(k) != now.get(k)]
    if diffs:
        raise UsageError(f"{run_dir}: the run was started with a different model config ({'; '.join(diffs)}); use the "
                         "same model settings to resume, another out_dir, or start over with --no-resume")


def _finished_summary(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The run's ``summary.json`` when it describes the run at ``step``, else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


def train(cfg: TrainConfig, resume: bool = True) -> dict[str, Any]:
    """Run (or continue) the training run described by ``cfg``; returns the summary it writes."""
    cfg.validate()
    env = init_distributed(cfg.distributed)
    try:
        return _train(cfg, env, resume)
    finally:
        shutdown(env)


def _train(cfg: TrainConfig, env: DistEnv, resume: bool) -> dict[str, Any]:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    run_dir = Path(cfg.out_dir)
    device = env.device

    # ---- data
    meta = read_meta(cfg.data)
    model = build_model(cfg)
    mcfg = model.config
    if meta["vocab_size"] > mcfg.vocab_size:
        raise ValueError(f"the data's tokenizer has {meta['vocab_size']} ids but the model's vocab_size is {mcfg.vocab_size}")
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {env.world} processes")
    per_rank = cfg.batch_size // env.world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"per-process batch {per_rank} is not divisible by micro_batch_size {micro}")
    n_micro = per_rank // micro
    loader = WindowLoader(load_split(cfg.data, "train"), cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    has_val = meta["splits"]["val"]["tokens"] > cfg.seq_len
    val = eval_windows(load_split(cfg.data, "val"), cfg.seq_len, cfg.eval_windows) if has_val else None
    tokenizer_path = Path(cfg.data) / (meta.get("tokenizer") or "tokenizer.json")
    val_bytes = text_bytes(load_tokenizer(tokenizer_path), val[:, 1:]) if val is not None and tokenizer_path.is_file() else 0

    # ---- model and optimizer
    model.to(device).train()
    if cfg.activation_checkpointing:
        _enable_activation_checkpointing(model)
    wrapped = wrap_model(model, env)
    optimizer = torch.optim.AdamW(param_groups(model), lr=cfg.peak_lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  foreach=True)
    eval_model = wrapped if env.mode == "fsdp" else model

    # ---- resume
    if env.is_main:
        removed = ckpt.remove_stale_temp_dirs(run_dir)
        if removed:
            print(f"removed {len(removed)} incomplete checkpoint(s) left by an interrupted save: "
                  f"{', '.join(p.name for p in removed)}", flush=True)
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        model_state, optim_state, state = ckpt.load_checkpoint(latest)
        _check_same_model(run_dir, state.get("model_config"), mcfg)
        if mcfg.tie_embeddings:
            model_state["lm_head.weight"] = model_state["embed_tokens.weight"]
        rng = optim_state.pop("__rng__", None)
        try:
            load_full_state(wrapped, optimizer, model_state, optim_state, env)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"{latest}: the checkpoint does not fit the model and optimizer ({ckpt.short_reason(e)}); "
                             "remove it to resume from the previous checkpoint, or start over with --no-resume") from None
        loader.load_state_dict(state["loader"])
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens"], state.get("elapsed", 0.0)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
        if start_step >= cfg.steps:
            done = _finished_summary(run_dir, start_step)
            if done is not None:  # nothing to train: keep the run's summary (and its last evaluation) as it is
                if env.is_main:
                    print(f"{run_dir}: already finished at step {start_step} (steps={cfg.steps}); nothing to do. Raise "
                          "steps to train on, or start over with --no-resume", flush=True)
                return done
        if env.is_main:
            print(f"resuming from {latest} (step {start_step})", flush=True)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (run_dir / "model_config.json").write_text(json.dumps(mcfg.to_dict(), indent=2))
        if tokenizer_path.is_file():
            shutil.copyfile(tokenizer_path, run_dir / "tokenizer.json")
    barrier(env)
    log = MetricsLog(run_dir / "metrics.jsonl", start_step if latest is not None else None, enabled=env.is_main)

    def save(step: int, elapsed: float) -> Path | None:
        model_state, optim_state = full_state(wrapped, optimizer, env)
        path = None
        if env.is_main:
            optim_state = dict(optim_state)
            optim_state["__rng__"] = {"cpu": torch.get_rng_state()}
            state = {"loader": loader.state_dict(), "tokens": tokens_seen, "elapsed": elapsed,
                     "model_config": mcfg.to_dict(), "train_config": cfg.to_dict()}
            path = ckpt.save_checkpoint(run_dir, step, _model_state_for_save(model_state, mcfg.tie_embeddings),
                                        optim_state, state, cfg.keep_last)
        barrier(env)
        return path

    def run_eval(step: int) -> dict[str, Any] | None:
        if val is None:
            return None
        nats, count = evaluate(eval_model, val, max(1, micro), device, cfg)
        loss = nats / count
        rec = {"kind": "eval", "step": step, "tokens": tokens_seen, "val_loss": loss,
               "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": nats / math.log(2) / val_bytes if val_bytes else None}
        log.write(rec)
        return rec

    # ---- loop
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t0 = time.perf_counter()
    last_eval: dict[str, Any] | None = None
    bar = None
    if env.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {mcfg.linear}", unit="step", dynamic_ncols=True)
    step = start_step
    stopped_early = False
    while step < cfg.steps:
        t_step = time.perf_counter()
        lr = lr_at(cfg.lr_schedule_name, step, cfg.steps, cfg.peak_lr, cfg.warmup, cfg.stage2_ratio, cfg.final_lr_ratio)
        wd = wd_at(cfg.wd_schedule_name, step, cfg.steps, cfg.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group.get("decay") else 0.0
        strength = quant_ramp(step, cfg.quant_ramp_steps) if cfg.quant_ramp_steps else 1.0
        if mcfg.linear == "bitnet":
            model.set_quant_strength(strength)
        x, y = loader.next_batch(env.rank, env.world)
        loss_sum = torch.zeros((), device=device)
        for m in range(n_micro):
            xs, ys = x[m * micro:(m + 1) * micro].to(device), y[m * micro:(m + 1) * micro].to(device)
            with set_grad_sync(wrapped, env, m == n_micro - 1):
                with _autocast(cfg, device):
                    logits = wrapped(xs)
                loss = loss_fn(logits, ys) / n_micro
                loss.backward()
            loss_sum += loss.detach()
        loss_all = all_reduce_mean(loss_sum, env)
        loss_value = float(loss_all)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            if bar is not None:
                bar.close()
            good = ckpt.latest_checkpoint(run_dir)
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise TrainingDiverged(
                f"{what} is {loss_value if what == 'loss' else grad_norm} at step {step + 1}; training stopped "
                f"without saving. Last good checkpoint: {good if good else 'none'} (lower lr, raise warmup, or "
                f"check the data, then resume)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        if cfg.sleep_per_step > 0:
            time.sleep(cfg.sleep_per_step)
        dt = time.perf_counter() - t_step
        elapsed = elapsed_before + time.perf_counter() - t0
        rec = {"kind": "train", "step": step, "tokens": tokens_seen, "loss": loss_value, "lr": lr, "wd": wd,
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt, "elapsed": elapsed}
        if cfg.quant_ramp_steps:
            rec["quant_strength"] = strength
        log.write(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
        out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t0 >= cfg.max_seconds
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps or out_of_time:
            last_eval = run_eval(step)
            if bar is not None and last_eval is not None:
                bar.write(f"step {step}: val loss {last_eval['val_loss']:.4f}, ppl {last_eval['val_ppl']:.2f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or out_of_time:
            save(step, elapsed)
        if out_of_time:
            stopped_early = step < cfg.steps
            break
    if bar is not None:
        bar.close()
    wall = elapsed_before + time.perf_counter() - t0
    if last_eval is None and val is not None:  # no step ran here (resumed at the end without a summary)
        last_eval = run_eval(step)
    trained = step - start_step
    summary = {"steps": step, "planned_steps": cfg.steps, "stopped_early": stopped_early, "tokens": tokens_seen,
               "wall_seconds": wall,
               "tokens_per_s": trained * tokens_per_step / max(1e-9, time.perf_counter() - t0) if trained else None,
               "params": mcfg.num_params(), "non_embedding_params": mcfg.num_params(include_embeddings=False),
               "linear": mcfg.linear, "model": mcfg.to_dict(), "world_size": env.world, "distributed": env.mode}
    if last_eval is not None:
        summary.update({k: last_eval[k] for k in ("val_loss", "val_ppl", "val_bpb")})
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot and (run_dir / "metrics.jsonl").is_file():
            plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", f"{mcfg.name} ({mcfg.linear})")
    return summary
