"""Downstream tasks: a LightningModule per task, wrapping any pre-trained model that implements the task's interface
(DESIGN §5), and what ``vlp finetune`` needs to run it.

A task module (``TASKS[data.task]``) provides:

* ``prepare(cfg, dm) -> cfg``: fill what the data decides (e.g. ``model.num_answers``), before the config is saved;
* ``build(cfg, dm, init: bool) -> LightningModule``: the task on a model built from ``cfg.model``, with the weights
  of ``cfg.ckpt`` loaded when ``init`` (not when resuming a fine-tuning run: its own checkpoint brings them);
* ``evaluate_run(cfg, task, dm, trainer) -> dict``: evaluate on ``data.<eval.split>``, merge into results.json.
"""

from __future__ import annotations

import importlib

from vlp.config import ConfigError

TASKS = {"vqa": "vlp.tasks.vqa", "retrieval": "vlp.tasks.retrieval"}


def get_task(name: str):
    """The task module for ``data.task``."""
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is not a downstream task; `vlp finetune` runs one of: "
                          f"{', '.join(TASKS)} (set data.task, and point data.train/val/test at that task's shards)")
    return importlib.import_module(TASKS[name])


__all__ = ["TASKS", "get_task"]
