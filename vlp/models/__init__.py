"""One LightningModule per paper, built by name from the ``model`` config section.

Importing this package registers every model's config schema with ``vlp.config`` (section ``model``), so that
``model.name: tcl`` validates against ``TCLConfig``. ``build(model_cfg, optim_cfg)`` constructs the module.
"""

from __future__ import annotations

import importlib

from vlp.config import register

# name -> (module path, config class name, module class name)
MODELS = {
    "tcl": ("vlp.models.tcl", "TCLConfig", "TCL"),
}


def _import(name: str):
    module_path, cfg_name, cls_name = MODELS[name]
    module = importlib.import_module(module_path)
    return getattr(module, cfg_name), getattr(module, cls_name)


def build(model_cfg, optim_cfg=None):
    """The LightningModule for ``model_cfg`` (a registered config dataclass with a ``name``)."""
    if model_cfg is None:
        raise ValueError("the experiment has no 'model' section; set model.name to one of " + ", ".join(MODELS))
    _, cls = _import(model_cfg.name)
    return cls(model_cfg, optim_cfg)


for _name in MODELS:
    register("model", _name, _import(_name)[0])
