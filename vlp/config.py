"""Experiment configuration: YAML files with ``base:`` includes, CLI dotlist overrides, a dataclass schema.

An experiment is one YAML file. ``base:`` (a string or a list) names files merged first, each path relative to the
file that names it; the including file's own keys win over its bases, and CLI overrides win over everything. The
merged tree is validated against the dataclass schema of each section: an unknown key fails naming the key, the file
it came from and the closest valid key; a wrong type fails naming the key, the value and the expected type.

Sections whose schema depends on a value (the ``model`` section's schema is chosen by ``model.name``) use a
*registry*: ``register("model", "tcl", TCLConfig)`` from the module that defines the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import OmegaConf

CLI = "the command line"


class ConfigError(ValueError):
    """A config that cannot be loaded or does not fit its schema. The message names key, file and expectation."""


# --------------------------------------------------------------------------------------------------------------------
# Schema registries: section name -> {variant name -> dataclass}. Filled by the modules that define the variants, and
# imported lazily (see ``_load_registries``) so that config.py stays importable without torch.
_REGISTRIES: dict[str, dict[str, type]] = {}
_REGISTRY_MODULES = {"model": "vlp.models"}


def register(section: str, name: str, schema: type):
    """Declare that ``<section>.name == name`` selects ``schema`` for that section."""
    _REGISTRIES.setdefault(section, {})[name] = schema
    return schema


def _registry(section: str) -> dict[str, type]:
    if section in _REGISTRY_MODULES:
        import importlib

        importlib.import_module(_REGISTRY_MODULES[section])
    return _REGISTRIES.get(section, {})


def registry_field(section: str, default: str | None = None):
    """A dataclass field whose schema is looked up in a registry by its ``name`` key."""
    return field(default=None, metadata={"registry": section, "default_name": default})


# --------------------------------------------------------------------------------------------------------------------
# The shared sections. Model sections live beside their models; data sections beside the data module.


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` (one-to-one) plus checkpoint cadence and the collective timeout."""

    accelerator: str = "auto"
    devices: Any = 1  # int, "auto" or a list of device ids, as Lightning takes it
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: Optional[int] = None
    max_time: Optional[str] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    val_check_interval: Optional[Union[int, float]] = None  # int: every N training batches; float: epoch fraction
    limit_val_batches: Optional[float] = None
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    checkpoint_every_n_steps: int = 200
    throughput: bool = True  # log samples/s, tokens/s, TFLOP/s, MFU, peak memory (vlp.utils.throughput)
    # A NaN/inf loss or gradient: "stop" (one error naming the step and the loss terms, exit 1, no checkpoint of the
    # bad state) or "skip" (drop that update, count it as train/skipped_nonfinite); see vlp.utils.nonfinite.
    nonfinite: str = "stop"
    # Seconds a rank may wait for the others in a collective (the process group's timeout; DDP-family strategies)
    # before the run stops with an error naming the rank; the same command then resumes it. Longer than
    # data.loader_start_timeout_s, so that a rank stuck on its loader reports that first.
    collective_timeout_s: float = 1800.0
    # Seconds for all ranks to start and join the process group (its rendezvous); null: collective_timeout_s.
    rendezvous_timeout_s: Optional[float] = None
    slurm_requeue: bool = True  # in a SLURM batch job, on SIGUSR1: save the step, requeue, exit (slurm/README.md)
    # Where metrics go: csv (<run>/metrics.csv, always: resume, loss.png and vlp compare read it) and optionally
    # tensorboard (<run>/tensorboard/; needs the tensorboard package).
    logger: list[str] = field(default_factory=lambda: ["csv"])

    def __post_init__(self):
        unknown = [name for name in self.logger if name not in ("csv", "tensorboard")]
        if unknown or "csv" not in self.logger:
            raise ValueError(f"trainer.logger must list csv and optionally tensorboard, got {self.logger!r} "
                             "(metrics.csv is what resume, loss.png and vlp compare read)")
        for name in ("collective_timeout_s", "rendezvous_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be > 0")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"trainer.nonfinite must be stop or skip, got {self.nonfinite!r}")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (warm-up, then ``schedule`` down to ``min_lr``)."""

    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant (per optimizer step) | tcl_official (per epoch, below)
    warmup_steps: int = 0  # cosine / linear / constant
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    warmup_start_lr: float = 0.0  # every schedule (official TCL: schedular.warmup_lr)
    min_lr: float = 0.0  # every schedule (official TCL: schedular.min_lr)
    # schedule=tcl_official: the official TCL/ALBEF pre-training schedule (its timm CosineLRScheduler, stepped as
    # Pretrain.py steps it; see vlp.models.base.lr_lambda). warmup_steps / warmup_ratio are not used by it.
    epochs: int = 0  # length of the cosine in epochs (official schedular.epochs); min_lr from this epoch on
    # Warm-up ticks (official schedular.warmup_epochs, a misnomer: ticks of warmup_step_size optimizer steps, all in
    # epoch 0; the paper's 20 ticks x 100 steps = 2000 steps).
    warmup_epochs: int = 0
    warmup_step_size: int = 100  # optimizer steps per warm-up tick (official Pretrain.py step_size)
    steps_per_epoch: int = 0  # optimizer steps per epoch and rank; 0: from the training loader when the run starts
    # Parameter-name substring -> learning-rate multiplier (BridgeTower: cross_modal 5x, heads 5x).
    lr_mult: dict[str, float] = field(default_factory=dict)
    # Parameter-name substrings excluded from weight decay (besides 1-d parameters and biases when enabled).
    no_decay_1d: bool = True
    # How the ranks' gradients combine: "mean" (DDP's average: the gradient of the global-batch mean loss) or "sum"
    # (the loss is scaled by the world size, so DDP's average becomes the sum of the ranks' gradients, as UNITER's
    # official horovod all-reduce; it matters for gradient clipping and for SGD-like optimizers, hardly for Adam).
    grad_reduction: str = "mean"

    def __post_init__(self):
        if self.grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {self.grad_reduction!r}")


@dataclass
class EvalConfig:
    """Zero-shot retrieval after pre-training and in ``vlp evaluate``."""

    split: str = "test"
    k_test: int = 256  # candidates re-ranked by the matching head (ALBEF/TCL: 256 COCO, 128 Flickr)
    batch_size: int = 128
    # Which captions query: "all" (COCO protocol: every caption of every image) or "first" (one per image; the
    # shapes world's first caption identifies its image, so R@1 can reach 100 %).
    captions: str = "all"
    # The ranking protocol; null: the model's own (``retrieval_protocol``: TCL contrastive + itm, BridgeTower with ITC
    # contrastive + max, models without a contrastive head all_pairs + itm). first_stage: contrastive (rank by the
    # contrastive embedding, re-rank the top k_test with ITM) | all_pairs (ITM on every pair); combine: itm (the
    # re-ranked ITM scores, per direction) | itc (the contrastive similarity alone) | max (element-wise max of the
    # two re-ranked directions: BridgeTower's official protocol).
    first_stage: Optional[str] = None
    combine: Optional[str] = None
    subset: Optional[int] = None  # evaluate on the first N images of the split (and their captions); null: all
    progress: bool = True  # a progress bar over the pairs scored by ITM

    def __post_init__(self):
        if self.captions not in ("all", "first"):
            raise ValueError(f"eval.captions must be 'all' or 'first', got {self.captions!r}")
        if self.first_stage not in (None, "contrastive", "all_pairs"):
            raise ValueError(f"eval.first_stage must be contrastive or all_pairs (or null: the model's), got "
                             f"{self.first_stage!r}")
        if self.combine not in (None, "itm", "itc", "max"):
            raise ValueError(f"eval.combine must be itm, itc or max (or null: the model's), got {self.combine!r}")
        if self.first_stage == "all_pairs" and self.combine == "itc":
            raise ValueError("eval.combine=itc ranks by the contrastive head alone; it needs first_stage=contrastive")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"eval.subset must be a positive number of images (or null), got {self.subset}")


@dataclass
class RetrievalObjectiveConfig:
    """``finetune.retrieval``: the retrieval fine-tuning objective (``vlp.tasks.retrieval``). Every field left null
    takes the model's paper default, so an ablation names only what it changes (``finetune.retrieval.loss=hinge``)."""

    loss: Optional[str] = None  # itc_itm | hinge
    itm_negatives: Optional[str] = None  # itc_itm: local-hard (sampled from the similarities) | hardest (argmax)
    margin: Optional[float] = None  # hinge
    candidates: Optional[int] = None  # hinge: negatives drawn per anchor and direction, scored without gradient
    hard_negatives: Optional[int] = None  # hinge: the best-scored candidates trained on, per anchor and direction


@dataclass
class FinetuneConfig:
    """``vlp finetune``: the downstream task named by ``data.task`` (vqa), started from the pre-trained checkpoint
    given as the top-level ``ckpt``; the final evaluation runs on ``data.<eval.split>``."""

    from_scratch: bool = False  # allow no ckpt: train from random initialisation (a baseline), with a warning
    strict: bool = True  # ckpt must hold every weight of the model except the new task head (false: warn instead)
    predictions: bool = True  # write <run>/<task>_<split>_predictions.json ([{question_id, answer}], eval.ai format)
    retrieval: RetrievalObjectiveConfig = field(default_factory=RetrievalObjectiveConfig)  # data.task: retrieval


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    model: Any = registry_field("model")
    data: Any = registry_field("data", default="shards")
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # only read by ``vlp finetune``
    # checkpoint to start from: ``vlp evaluate CONFIG ckpt=PATH``; ``vlp finetune``: the pre-trained weights
    ckpt: Optional[str] = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


_REGISTRY_MODULES["data"] = "vlp.data"


# --------------------------------------------------------------------------------------------------------------------
# Loading and merging, remembering where every leaf key came from.


def _read_yaml(path: Path) -> dict:
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as e:  # yaml syntax errors carry line numbers; keep them
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    data = OmegaConf.to_container(node, resolve=False)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: str, sources: dict, prefix: str = "") -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, sources, dotted + ".")
        else:
            dst[key] = _copy(value)
            _record(value, origin, sources, dotted)


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _record(value, origin: str, sources: dict, dotted: str) -> None:
    sources[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, origin, sources, f"{dotted}.{k}")


def _load_tree(path: Path, sources: dict, stack: tuple = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise ConfigError(f"circular base: include: {chain}")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file path or a list of file paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            raise ConfigError(f"{path}: base file {base!r} not found (looked for {base_path})")
        _merge(merged, _load_tree(base_path, sources, stack + (path,)), "", {})
    # Bases' provenance was recorded by the recursive calls; the file's own keys override it.
    _merge(merged, data, str(path), sources)
    return merged


def parse_overrides(overrides: list[str]) -> dict:
    """``a.b=1`` dotlist -> nested dict, values parsed as YAML (``x=[1,2]``, ``y=null``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        node = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None
    return OmegaConf.to_container(node, resolve=False)


def load_dict(path: str | Path, overrides: list[str] = ()) -> tuple[dict, dict]:
    """Merged (unvalidated) tree and its provenance map {dotted key: file or the command line}."""
    sources: dict[str, str] = {}
    tree = _load_tree(Path(path), sources)
    _merge(tree, parse_overrides(list(overrides)), CLI, sources)
    return tree, sources


def load(path: str | Path, overrides: list[str] = (), schema: type = ExperimentConfig):
    tree, sources = load_dict(path, overrides)
    return build(schema, tree, sources)


def build(schema: type, tree: dict, sources: dict | None = None, prefix: str = ""):
    """Validate ``tree`` against ``schema`` and return the dataclass instance."""
    return _build_dataclass(schema, tree, sources or {}, prefix)


# --------------------------------------------------------------------------------------------------------------------
# Validation


def _where(sources: dict, dotted: str) -> str:
    src = sources.get(dotted)
    return f" (from {src})" if src else ""


def _build_dataclass(schema: type, tree: Any, sources: dict, prefix: str):
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping for {schema.__name__}, got {tree!r}"
            f"{_where(sources, prefix.rstrip('.'))}"
        )
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema)
    for key in tree:
        if key not in fields:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key '{dotted}'{_where(sources, dotted)}{hint}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if "registry" in f.metadata:
            sub = tree.get(name)
            if sub is None and f.metadata.get("default_name") is None:
                kwargs[name] = None
                continue
            kwargs[name] = _build_registered(f.metadata["registry"], f.metadata.get("default_name"), sub or {},
                                             sources, dotted)
        elif name in tree:
            kwargs[name] = _convert(tree[name], hints[name], sources, dotted)
    try:
        return schema(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    except ValueError as e:  # __post_init__ checks
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _build_registered(section: str, default_name: str | None, tree: dict, sources: dict, dotted: str):
    if not isinstance(tree, dict):
        raise ConfigError(f"{dotted}: expected a mapping, got {tree!r}{_where(sources, dotted)}")
    variants = _registry(section)
    name = tree.get("name", default_name)
    if name is None:
        raise ConfigError(f"{dotted}.name is missing; expected one of: {', '.join(sorted(variants))}")
    if name not in variants:
        close = difflib.get_close_matches(str(name), list(variants), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{dotted}.name: unknown {section} {name!r}{_where(sources, dotted + '.name')}{hint}; "
            f"expected one of: {', '.join(sorted(variants))}"
        )
    return _build_dataclass(variants[name], {**tree, "name": name}, sources, dotted + ".")


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, sources: dict, dotted: str):
    def fail():
        raise ConfigError(
            f"'{dotted}' = {value!r}{_where(sources, dotted)}: expected {_type_name(tp)}, "
            f"got {type(value).__name__}"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, sources, dotted)
            except ConfigError:
                continue
        fail()
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, sources, dotted + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, arg, sources, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        _, varg = typing.get_args(tp) or (Any, Any)
        return {k: _convert(v, varg, sources, f"{dotted}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail()


# --------------------------------------------------------------------------------------------------------------------
# Saving


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); ``load`` of that file rebuilds the same config."""
    from vlp.utils.io import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
