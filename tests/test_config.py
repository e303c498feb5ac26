"""Config loading: base includes, overrides, schema errors (messages asserted), save -> load round trip."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from vlp import config
from vlp.config import ConfigError, ExperimentConfig, register


@dataclass
class _ToyModel:
    name: str = "toy"
    width: int = 8
    dropout: float = 0.1
    layers: list[int] = field(default_factory=lambda: [1, 2])
    head: Optional[str] = None


register("model", "toy", _ToyModel)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path):
    write(tmp_path / "defaults" / "paper.yaml", "model: {name: toy, width: 64, dropout: 0.2}\noptim: {lr: 1.0e-4}\n")
    write(tmp_path / "defaults" / "size.yaml", "base: paper.yaml\nmodel: {width: 16}\n")
    exp = write(tmp_path / "exp" / "run.yaml", "base: [../defaults/size.yaml]\nname: run1\noptim: {lr: 3.0e-4}\n")
    return exp


def test_base_includes_merge_in_order_relative_to_including_file(tree):
    cfg = config.load(tree)
    assert cfg.name == "run1"
    assert cfg.model.width == 16  # size.yaml overrides paper.yaml
    assert cfg.model.dropout == 0.2  # inherited from paper.yaml through size.yaml
    assert cfg.optim.lr == 3e-4  # the experiment overrides its bases
    assert isinstance(cfg.model, _ToyModel)


def test_cli_overrides_win_and_parse_yaml_values(tree):
    cfg = config.load(tree, ["model.width=4", "trainer.devices=2", "model.layers=[3,4,5]", "model.head=null"])
    assert cfg.model.width == 4 and cfg.trainer.devices == 2 and cfg.model.layers == [3, 4, 5]
    assert cfg.model.head is None


def test_unknown_key_names_key_file_and_closest(tree, tmp_path):
    bad = write(tmp_path / "exp" / "bad.yaml", "base: run.yaml\nmodel: {widht: 3}\n")
    with pytest.raises(ConfigError) as e:
        config.load(bad)
    msg = str(e.value)
    assert "unknown key 'model.widht'" in msg
    assert str(bad.resolve()) in msg
    assert "did you mean 'model.width'" in msg


def test_unknown_key_from_command_line(tree):
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr' \(from the command line\); did you mean 'optim\.lr'"):
        config.load(tree, ["optim.lrr=1"])


def test_unknown_top_level_section(tree):
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'.*did you mean 'trainer'"):
        config.load(tree, ["trainr.devices=2"])


def test_wrong_type_names_key_value_and_expected_type(tree, tmp_path):
    bad = write(tmp_path / "exp" / "bad2.yaml", "base: run.yaml\nmodel: {width: wide}\n")
    with pytest.raises(ConfigError) as e:
        config.load(bad)
    msg = str(e.value)
    assert "'model.width' = 'wide'" in msg and "expected int" in msg and str(bad.resolve()) in msg


def test_bool_is_not_an_int_and_float_accepts_int(tree):
    with pytest.raises(ConfigError, match="expected int"):
        config.load(tree, ["model.width=true"])
    assert config.load(tree, ["model.dropout=1"]).model.dropout == 1.0


def test_unknown_registry_name_suggests(tree):
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'tyo'.*did you mean 'toy'"):
        config.load(tree, ["model.name=tyo"])


def test_missing_base_file_names_both_files(tmp_path):
    exp = write(tmp_path / "a.yaml", "base: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base file 'nothere\.yaml' not found"):
        config.load(exp)


def test_circular_base_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular base"):
        config.load(tmp_path / "a.yaml")


def test_malformed_override_and_yaml(tree, tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.load(tree, ["model.width"])
    bad = write(tmp_path / "broken.yaml", "model: {name: toy\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        config.load(bad)


def test_saved_config_reproduces_the_run(tree, tmp_path):
    cfg = config.load(tree, ["model.width=5", "seed=7"])
    out = tmp_path / "run" / "config.yaml"
    config.save(cfg, out)
    again = config.load(out)
    assert again == cfg
    assert not list(out.parent.glob(".*tmp"))  # atomic write leaves no temporary file


def test_defaults_without_model_section(tmp_path):
    cfg = config.load(write(tmp_path / "e.yaml", "name: x\n"))
    assert isinstance(cfg, ExperimentConfig) and cfg.model is None
    assert cfg.data.name == "shards" and cfg.data.batch_size == 32


def test_every_experiment_file_validates():
    """Every shipped experiment (paper, tiny, ablation, fine-tuning) loads against the schema: a renamed or removed
    field breaks this test, not a user's run."""
    from pathlib import Path

    from vlp import config
    from vlp.models import MODELS

    root = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        cfg = config.load(path)
        assert cfg.model is not None and cfg.model.name in MODELS, path
