"""Evaluation and measurement: perplexity, lm-eval zero-shot tasks, the paper's cost tables, energy model.

Submodules are imported on demand (lm-eval is an optional dependency):
:mod:`.perplexity`, :mod:`.lm_eval_adapter`, :mod:`.task_data`, :mod:`.paper_bench`, :mod:`.energy`.
"""
