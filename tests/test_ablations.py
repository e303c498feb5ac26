"""The ablation suites (experiments/<model>/ablations/*.yaml, `make ablate-<model>`): every file loads, is a delta
over its model's tiny config that changes exactly the keys its row is about, and the model built from it has the
objectives and bridges the row claims."""

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from vlp import config as config_lib

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
UNITER_MIX = {"itm": 6.0, "mlm": 1.0, "mrfr": 0.5, "mrc_kl": 0.5}
UNITER_WEIGHTS = {"itm": 1.0, "ot": 0.1, "mlm": 1.0, "mrfr": 1.0, "mrc_kl": 1.0}

# file -> every config key that differs from the model's tiny.yaml (dotted), with its value
DELTAS = {
    "tcl/ablations/albef.yaml": {"name": "albef-tiny", "model.imc": False, "model.lmi": False},
    "tcl/ablations/cma_imc.yaml": {"name": "tcl-tiny-cma-imc", "model.lmi": False},
    "tcl/ablations/cma_lmi.yaml": {"name": "tcl-tiny-cma-lmi", "model.imc": False},
    "uniter/ablations/mlm_itm.yaml": {
        "name": "uniter-tiny-mlm-itm", "model.task_mix.mrfr": 0.0, "model.task_mix.mrc_kl": 0.0,
        "model.loss_weights.ot": 0.0, "model.loss_weights.mrfr": 0.0, "model.loss_weights.mrc_kl": 0.0},
    "uniter/ablations/plus_mrfr.yaml": {
        "name": "uniter-tiny-plus-mrfr", "model.task_mix.mrc_kl": 0.0, "model.loss_weights.ot": 0.0,
        "model.loss_weights.mrc_kl": 0.0},
    "uniter/ablations/plus_mrc_kl.yaml": {"name": "uniter-tiny-plus-mrc-kl", "model.loss_weights.ot": 0.0},
    "mvptr/ablations/no_mcr.yaml": {"name": "mvptr-tiny-no-mcr", "model.loss_weights.mcr": 0.0},
    "mvptr/ablations/no_wpg.yaml": {"name": "mvptr-tiny-no-wpg", "model.loss_weights.wpg": 0.0},
    "mvptr/ablations/no_phrases.yaml": {"name": "mvptr-tiny-no-phrases", "model.phrase_vocab_size": 0,
                                        "model.loss_weights.wpg": 0.0},
    "bridgetower/ablations/scaled_add.yaml": {"name": "bridgetower-tiny-scaled-add", "model.bridge": "scaled_add"},
    "bridgetower/ablations/interpolate.yaml": {"name": "bridgetower-tiny-interpolate",
                                               "model.bridge": "interpolate"},
    "bridgetower/ablations/meter.yaml": {"name": "meter-tiny", "model.bridge": "none"},
}


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@functools.lru_cache(maxsize=None)
def load(rel: str):  # configs are frozen in use (builds go through dataclasses.replace): one load per file
    return config_lib.load(ROOT / "experiments" / rel)


def test_every_ablation_file_is_listed_and_named_apart():
    on_disk = {p.relative_to(ROOT / "experiments").as_posix() for p in ROOT.glob("experiments/*/ablations/*.yaml")}
    assert on_disk == set(DELTAS)
    names = [load(rel).name for rel in DELTAS] + [load(f"{m}/tiny.yaml").name
                                                   for m in ("tcl", "uniter", "mvptr", "bridgetower")]
    assert len(names) == len(set(names)), "two runs of one suite would share a run directory"


@pytest.mark.parametrize("rel", sorted(DELTAS))
def test_ablation_is_its_delta_over_tiny(rel):
    ablation = flat(config_lib.to_dict(load(rel)))
    tiny = flat(config_lib.to_dict(load(f"{rel.split('/')[0]}/tiny.yaml")))
    changed = {k: ablation.get(k) for k in set(ablation) | set(tiny) if ablation.get(k) != tiny.get(k)}
    assert changed == DELTAS[rel]


def build(cfg, vocab: int = 60):
    """The model of a config, its tokenizer-bound fields filled as `vlp pretrain` would (vocabulary, pad id)."""
    from vlp.models import build as build_model

    model_cfg = cfg.model
    model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, vocab_size=vocab,
                                                                        pad_token_id=0))
    if getattr(model_cfg, "phrase_vocab_size", 0) is None:
        model_cfg = dataclasses.replace(model_cfg, phrase_vocab_size=7)
    return build_model(model_cfg, cfg.optim)


def tcl_batch(b=4, t=10, size=64, vocab=60):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    ids[:, 0] = 1
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    return {"image": torch.randn(b, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones(b, t, dtype=torch.long), "image_ids": torch.arange(b),
            "mlm_input_ids": torch.where(labels != -100, torch.full_like(ids, 3), ids), "mlm_labels": labels}


@pytest.mark.parametrize("rel,terms", [
    ("tcl/tiny.yaml", {"i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text"}),
    ("tcl/ablations/albef.yaml", {"i2t", "t2i"}),
    ("tcl/ablations/cma_imc.yaml", {"i2t", "t2i", "i2i", "t2t"}),
    ("tcl/ablations/cma_lmi.yaml", {"i2t", "t2i", "lmi_image", "lmi_text"}),
])
def test_tcl_rows_average_exactly_their_alignment_terms(rel, terms):
    model = build(load(rel)).eval()
    with torch.no_grad():
        out = model.step(tcl_batch())
    parts = {k[len("ita_"):]: v for k, v in out.metrics.items() if k.startswith("ita_")}
    assert set(parts) == terms
    # ita is the plain mean of the row's terms (TCL's six-term average, ALBEF's two)
    assert torch.allclose(out.losses["ita"], sum(parts.values()) / len(parts))


@pytest.mark.parametrize("rel,tasks,ot", [
    ("uniter/tiny.yaml", ["itm", "mlm", "mrfr", "mrc_kl"], True),
    ("uniter/ablations/plus_mrc_kl.yaml", ["itm", "mlm", "mrfr", "mrc_kl"], False),
    ("uniter/ablations/plus_mrfr.yaml", ["itm", "mlm", "mrfr"], False),
    ("uniter/ablations/mlm_itm.yaml", ["itm", "mlm"], False),
])
def test_uniter_rows_sample_only_their_tasks(rel, tasks, ot):
    model = build(load(rel))
    assert model.active_tasks() == tasks
    assert model.enabled("ot") is ot  # WRA: the OT term of the ITM steps
    drawn = {model.task_of_step(s) for s in range(400)}
    assert drawn == set(tasks)
    # the kept tasks keep the tiny mix's ratios: itm 6 : mlm 1 -> P(itm) = 6 / 7 without the region tasks
    if tasks == ["itm", "mlm"]:
        assert model.task_sampler.probs == pytest.approx({"itm": 6 / 7, "mlm": 1 / 7})


@pytest.mark.parametrize("rel,off", [
    ("mvptr/ablations/no_mcr.yaml", {"mcr"}),
    ("mvptr/ablations/no_wpg.yaml", {"wpg"}),
    ("mvptr/ablations/no_phrases.yaml", {"wpg"}),
])
def test_mvptr_rows_switch_off_their_losses(rel, off):
    from vlp.train import data_for_model

    cfg = load(rel)
    model = build(cfg)
    assert {k for k in ("mcr", "vsc", "itm", "mlm", "wpg") if not model.enabled(k)} == off
    with_phrases = rel != "mvptr/ablations/no_phrases.yaml"
    assert data_for_model(cfg).data.phrases is with_phrases  # the collator appends no phrase tokens
    assert model.phrase_rows == (7 if with_phrases else 0)  # no phrase rows in the word table


@pytest.mark.parametrize("rel,kinds", [
    ("bridgetower/tiny.yaml", {"add"}),
    ("bridgetower/ablations/scaled_add.yaml", {"scaled_add"}),
    ("bridgetower/ablations/interpolate.yaml", {"interpolate"}),
    ("bridgetower/ablations/meter.yaml", set()),
])
def test_bridgetower_rows_build_their_bridges(rel, kinds):
    from vlp.blocks.fusion import BridgeLayer

    model = build(load(rel))
    bridges = [m for m in model.modules() if isinstance(m, BridgeLayer) and m.kind != "none"]
    assert {m.kind for m in bridges} == kinds
    # K = 2 cross layers: one bridge per stream feeds layer 2; METER has none and no bridge parameters at all
    assert len(bridges) == (2 if kinds else 0)
    assert any("bridges" in n for n, _ in model.named_parameters()) is bool(kinds)


@pytest.mark.parametrize("model,steps", [("uniter", "3"), ("tcl", "")])
def test_make_ablate_runs_every_config_of_the_suite_on_one_budget(model, steps):
    """`make -n`: the recipe the target would run (setup and the world taken as built), without running it."""
    import hashlib
    import subprocess

    stamp = ".venv/.installed-" + hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    built = [f"data/shards/shapes/{d}" for d in (".done", ".regions-done", ".phrases-done")] + ["data/raw/shapes/.done"]
    out = subprocess.run(["make", "-n", *[a for f in [stamp, *built] for a in ("-o", f)], f"ablate-{model}",
                          *([f"ABLATE_STEPS={steps}"] if steps else [])], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    recipe = " ".join(out.stdout.split())
    suffix = f"-{steps}steps" if steps else ""
    assert f"out=runs/ablate-{model}{suffix};" in recipe
    assert f"for config in experiments/{model}/tiny.yaml experiments/{model}/ablations/*.yaml" in recipe
    budget = f" trainer.max_steps={steps}" if steps else ""  # default: each config's own (the tiny max_steps)
    assert f".venv/bin/vlp pretrain $config output_dir=$out{budget} ;" in recipe
    assert f".venv/bin/vlp compare $out/*/ --out reports/ablate-{model}{suffix}" in recipe
