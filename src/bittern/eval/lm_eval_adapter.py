"""An lm-evaluation-harness model adapter for bittern models, registered as ``"bittern"``.

Importing this module registers the adapter (``lm_eval.api.registry.register_model``). From Python::

    import lm_eval
    from bittern.eval.lm_eval_adapter import BitternLM
    from bittern.eval.task_data import tasks_dir
    lm = BitternLM(pretrained="runs/demo")                # or BitternLM(model=m, tokenizer=tok)
    tm = lm_eval.tasks.TaskManager(include_path=str(tasks_dir()))
    out = lm_eval.simple_evaluate(model=lm, tasks=["bittern_piqa"], limit=50, task_manager=tm)

From the shell (``python -m bittern.eval.lm_eval_cli`` is the ``lm_eval`` CLI with this adapter
registered and bittern's local task configs on the include path)::

    python -m bittern.eval.lm_eval_cli run --model bittern --model_args pretrained=DIR,batch_size=8 --tasks bittern_piqa

Model arguments: ``pretrained`` (a bittern packed model directory holding ``tokenizer.json``),
``batch_size`` (sequences per forward pass), ``max_batch_tokens`` (cap on padded tokens per forward
pass), ``max_length`` (context; default the model's), ``dtype`` (float32, bfloat16, float16).
``batch_size`` and ``device`` may be given in ``--model_args`` as well as through lm-eval's own
``--batch_size``/``--device``; the ``--model_args`` value wins.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..errors import UsageError
from ..generate import generate_ids
from ..sampling import SamplingParams
from .perplexity import check_vocab, load_model_and_tokenizer, resolve_model_path, score_ids

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("bittern")
class BitternLM(TemplateLM):
    """lm-eval ``LM`` over a bittern :class:`~bittern.model.Transformer` and :class:`~bittern.tokenizer.Tokenizer`."""

    def __init__(self, pretrained: str | None = None, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 batch_size: int | str = 8, max_batch_tokens: int | str = 8192, max_length: int | str | None = None,
                 dtype: str = "float32", device: str | None = None, **_: Any) -> None:
        super().__init__()
        if model is None:
            if dtype not in _DTYPES:
                raise UsageError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            model, tokenizer = load_model_and_tokenizer(resolve_model_path(pretrained), _DTYPES[dtype])
        elif tokenizer is None:
            raise UsageError("give the tokenizer together with the model")
        else:
            check_vocab(model, tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's CLI asks for CUDA by default; stay on the CPU when there is none
        if device:
            self.model.to(device)
        self._device = next(self.model.parameters()).device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        limit = model.config.max_seq_len
        self.max_length = min(int(max_length), limit) if max_length else limit
        if self.batch_size < 1 or self.max_batch_tokens < 1 or self.max_length < 2:
            raise UsageError("batch_size and max_batch_tokens must be positive and max_length at least 2")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> "BitternLM":
        """The adapter from lm-eval's ``--model_args`` (``arg_dict``) and its own options (``additional_config``:
        batch_size, max_batch_size, device). A key given in both takes the ``--model_args`` value: lm-eval
        always passes its ``--batch_size`` (default 1), which would otherwise clash with ``batch_size=N``
        in ``--model_args``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> "BitternLM":
        """The adapter from ``--model_args key=value,...``; see :meth:`create_from_arg_obj`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        """End-of-text id (used as the context of an empty prompt and as the rolling prefix)."""
        for tid in (self.tokenizer.eos_id, self.tokenizer.bos_id):
            if tid is not None:
                return int(tid)
        raise UsageError("the tokenizer has no end-of-text or beginning-of-text token")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (no special tokens added)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring

    def _batches(self, items: list[tuple[int, list[int], int]]) -> list[list[tuple[int, list[int], int]]]:
        """Group ``(index, input ids, n continuation)`` longest first, within batch_size and max_batch_tokens."""
        items = sorted(items, key=lambda it: -len(it[1]))
        batches: list[list[tuple[int, list[int], int]]] = []
        for it in items:
            if batches:
                cur = batches[-1]
                width = len(cur[0][1])
                if len(cur) < self.batch_size and width * (len(cur) + 1) <= self.max_batch_tokens:
                    cur.append(it)
                    continue
            batches.append([it])
        return batches

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context, and whether greedy decoding gives it."""
        items = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("empty continuation: nothing to score")
            whole = (context + continuation)[-(self.max_length + 1):]
            items.append((i, whole[:-1], min(len(continuation), len(whole) - 1)))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(items), desc="loglikelihood", disable=disable_tqdm) as bar:
            for batch in self._batches(items):
                width = len(batch[0][1])
                tokens = torch.zeros(len(batch), width, dtype=torch.long, device=self._device)
                for row, (_, inp, _) in enumerate(batch):
                    tokens[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits = self.model(tokens)
                for row, (i, inp, n) in enumerate(batch):
                    key, context, continuation = requests[i]
                    target = torch.tensor(continuation[-n:], dtype=torch.long, device=self._device)
                    logprobs = F.log_softmax(logits[row, len(inp) - n: len(inp)].float(), dim=-1)
                    score = float(logprobs.gather(-1, target.unsqueeze(-1)).sum())
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    results[i] = (score, greedy)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, results[i])
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole string (after an end-of-text token), sliding-window scored."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (string,) = req.args
            ids = [self.eot_token_id] + self.tok_encode(string)
            if len(ids) < 2:
                out.append(0.0)
                continue
            nll, _ = score_ids(self.model, ids, self.max_length, max(1, self.max_length // 2), self.batch_size)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), -nll)
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, end of text or ``max_gen_toks`` tokens."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(temperature=temperature, top_k=int(gen_kwargs.pop("top_k", 0) or 0),
                                    top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0), seed=gen_kwargs.pop("seed", 1234),
                                    max_tokens=max(1, min(max_new, self.max_length - 1)))
            prompt = self.tok_encode(context) or [self.eot_token_id]
            prompt = prompt[-(self.max_length - params.max_tokens):]
            generated: list[int] = []
            text = ""
            for token in generate_ids(self.model, prompt, params, self.tokenizer.eos_id):
                if token == self.tokenizer.eos_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(s in text for s in until):
                    break
            for s in until:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out


def evaluate_tasks(model_dir: str | None, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   num_fewshot: int | None = None, dtype: str = "float32", model: torch.nn.Module | None = None,
                   tokenizer: Any = None, log_samples: bool = False) -> dict[str, Any]:
    """Run bittern's local zero-shot tasks (short or ``bittern_`` names) with lm-eval; its results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .task_data import task_name, tasks_dir

    names = [task_name(t) for t in tasks]
    if not names:
        raise UsageError("no tasks given")
    if limit is not None and limit <= 0:
        raise UsageError("--limit must be a positive number of documents")
    lm = BitternLM(pretrained=model_dir, model=model, tokenizer=tokenizer, batch_size=batch_size, dtype=dtype)
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, log_samples=log_samples, bootstrap_iters=0)
