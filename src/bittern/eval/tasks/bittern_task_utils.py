"""Helpers the task YAML files in this directory name with ``!function`` (lm-eval loads this file by path)."""

from __future__ import annotations

from typing import Any

from bittern.eval.task_data import load_task_dataset


def _loader(short: str):
    def load(**kwargs: Any) -> Any:
        return load_task_dataset(short, **kwargs)

    load.__name__ = f"load_{short}"
    return load


load_hellaswag = _loader("hellaswag")
load_piqa = _loader("piqa")
load_winogrande = _loader("winogrande")
load_boolq = _loader("boolq")
load_arc_easy = _loader("arc_easy")
load_arc_challenge = _loader("arc_challenge")
load_openbookqa = _loader("openbookqa")
load_lambada = _loader("lambada")


def winogrande_text(doc: dict[str, Any]) -> int:
    """Index of the right context (WinoGrande scores the shared continuation after each option)."""
    return int(doc["gold"])


def winogrande_target(doc: dict[str, Any]) -> str:
    """The continuation scored after each context."""
    return doc["continuation"]


def winogrande_choices(doc: dict[str, Any]) -> list[str]:
    """The two contexts (sentence up to the blank, filled with each option)."""
    return list(doc["contexts"])
