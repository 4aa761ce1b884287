"""Evaluation: local-data MTEB / C-MTEB tasks run by the ``mteb`` package itself.

- :mod:`.tasks`   the tasks (mteb task classes whose ``load_data`` reads ``../shared/data``)
- :mod:`.encoder` the model as mteb sees it, with an on-disk embedding cache
- :mod:`.run`     ``evaluate(model, tasks, ...) -> {task: main score}`` and the result files
- :mod:`.report`  markdown table, bar chart and ``compare`` of result folders

Import :func:`conan_embedding.evaluation.run.evaluate` directly; this package imports nothing
heavy on its own.
"""
