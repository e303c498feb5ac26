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
    "bridgetower": ("vlp.models.bridgetower", "BridgeTowerConfig", "BridgeTower"),
    "uniter": ("vlp.models.uniter", "UNITERConfig", "UNITER"),
    "mvptr": ("vlp.models.mvptr", "MVPTRConfig", "MVPTR"),
}


def _import(name: str):
    module_path, cfg_name, cls_name = MODELS[name]
    module = importlib.import_module(module_path)
    return getattr(module, cfg_name), getattr(module, cls_name)


def model_class(name: str):
    """The LightningModule class registered as ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return _import(name)[1]


def build(model_cfg, optim_cfg=None):
    """The LightningModule for ``model_cfg`` (a registered config dataclass with a ``name``)."""
    if model_cfg is None:
        raise ValueError("the experiment has no 'model' section; set model.name to one of " + ", ".join(MODELS))
    _, cls = _import(model_cfg.name)
    return cls(model_cfg, optim_cfg)


def bind_tokenizer(model_cfg, tokenizer):
    """Fill the fields a config leaves ``null`` to mean "from the tokenizer": the text tower's vocabulary size and
    pad id (when it is not a pretrained hub model, whose own config knows them). Special-token ids are the data
    collator's business (masking happens there)."""
    import dataclasses

    changes = {}
    text = getattr(model_cfg, "text", None)
    if text is not None and text.name is None:
        fill = {}
        if text.vocab_size is None:
            fill["vocab_size"] = len(tokenizer)
        if text.pad_token_id is None:
            fill["pad_token_id"] = tokenizer.pad_token_id
        if fill:
            changes["text"] = dataclasses.replace(text, **fill)
    return dataclasses.replace(model_cfg, **changes) if changes else model_cfg


def bind_concepts(model_cfg, phrase_vocab, checkpoint=None):
    """Fill ``phrase_vocab_size: null`` (MVPTR) from the data's phrase vocabulary; data without phrases (VQA
    questions) takes it from the ``checkpoint`` being fine-tuned or evaluated, else 0."""
    import dataclasses

    if getattr(model_cfg, "phrase_vocab_size", 0) is not None:
        return model_cfg
    if phrase_vocab is not None:
        size = phrase_vocab.size
    elif checkpoint:
        from vlp.utils.checkpoint import read_checkpoint

        saved = (read_checkpoint(checkpoint).get("hyper_parameters") or {}).get("model") or {}
        size = int(saved.get("phrase_vocab_size") or 0)
    else:
        size = 0
    return dataclasses.replace(model_cfg, phrase_vocab_size=size)


for _name in MODELS:
    register("model", _name, _import(_name)[0])

from vlp.models.loading import load  # noqa: E402  (vlp.models.load(PATH): a checkpoint's module, in eval mode)
