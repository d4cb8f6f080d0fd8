"""lm-evaluation-harness task configs (YAML) for the zero-shot tasks, on local data (see :mod:`bittern.eval.task_data`)."""
