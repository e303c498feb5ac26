"""No checkpoint runs code: every file a user or a run directory hands to vlp is read with weights_only=True.

A pickle payload (an object whose ``__reduce__`` would create a marker file) goes, through ``vlp.cli.main``, into
every place that reads a checkpoint: ``vlp evaluate ckpt=``, a run directory's ``checkpoints/last.ckpt`` and SLURM
``hpc_ckpt_1.ckpt`` on the resume of ``vlp pretrain`` and ``vlp finetune``, ``vlp finetune ckpt=`` and every
converter. Each must refuse it: no marker, a non-zero exit, one ``error:`` line naming the file. Damaged files
(a truncated real checkpoint, junk bytes) get the same one-line treatment instead of torch's internals, except in a
run directory being resumed, where they are moved aside with a warning naming them (``vlp.resume``).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from test_pretrain_cli import TINY as TCL_TINY  # the tiny sizes the CLI tests train in seconds
from test_pretrain_cli import data_args as tcl_data
from test_vqa_finetune import TINY as VQA_TINY
from test_vqa_finetune import TINY_YAML as VQA_YAML
from test_vqa_finetune import data_args as vqa_data
from vlp.cli import main
from vlp.utils.checkpoint import CheckpointError, load_file, read_checkpoint, read_weights

ROOT = Path(__file__).resolve().parents[1]
TCL_YAML = ROOT / "experiments/tcl/tiny.yaml"


class Payload:
    """Unpickled by a full unpickler, this creates ``marker``: proof that loading the file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def write_payload(path: Path, marker: Path, how: str = "torch") -> Path:
    """A plausible checkpoint dict with the payload inside: ``torch.save`` (zip) or a raw ``pickle`` stream (no
    tensors there: a raw pickle reduces them through a torch global that would be refused before the payload)."""
    obj = {"state_dict": {"w": torch.zeros(2) if how == "torch" else 0.0}, "optimizer_states": [], "global_step": 3,
           "hyper_parameters": {"model": {"name": "tcl"}}, "extra": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch":
        torch.save(obj, path)
    else:
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=int(how[-1]))
    return path


def assert_refused(rc: int, capsys, path: Path, marker: Path, says: str = "could run code") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and not marker.exists()
    assert len(lines) == 1, err[-3000:]
    assert str(path) in lines[0] and says in lines[0], lines[0]
    return lines[0]


def test_the_payload_runs_code_under_a_full_unpickler(tmp_path, marker):
    """The control: without weights_only the same file does run code, so the refusals below are not vacuous."""
    path = write_payload(tmp_path / "p.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch", "pickle2", "pickle4"])
def test_reader_refuses_payloads_naming_the_file_and_the_global(tmp_path, marker, how):
    path = write_payload(tmp_path / "p.ckpt", marker, how)
    for read in (read_checkpoint, read_weights, load_file):
        with pytest.raises(CheckpointError) as e:
            read(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}: refused to load") and "could run code" in msg
        # torch names the callable (exec, or builtins.exec); protocol 4 is refused at its first frame opcode
        assert re.search(r"Python global (builtins\.)?exec,", msg) or how == "pickle4", msg
    assert not marker.exists()


def test_damaged_files_get_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}, "global_step": 1}, good)
    assert read_checkpoint(good)["global_step"] == 1
    data = good.read_bytes()
    cases = {"trunc.ckpt": (data[: len(data) // 2], "truncated or corrupt"), "empty.ckpt": (b"", "empty file"),
             "junk.ckpt": (b"not a checkpoint at all" * 8, "not a torch file")}
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=says) as e:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / name))
        assert "central directory" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "gone.ckpt")
    torch.save({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"other\.ckpt: no 'state_dict' in the file .*expected a vlp"):
        read_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"good\.ckpt: no 'optimizer_states'"):
        read_checkpoint(good, require=("optimizer_states",))


# ---------------------------------------------------------------------------------------------------------------------
# through the CLI


@pytest.fixture(scope="module")
def world(shapes_shards):
    return shapes_shards


def tcl_args(world, out: Path, name: str = "run") -> list[str]:
    return [str(TCL_YAML), *TCL_TINY, *tcl_data(world), f"output_dir={out}", f"name={name}", "trainer.max_steps=2"]


def vqa_args(world, out: Path, name: str = "run") -> list[str]:
    return [str(VQA_YAML), *VQA_TINY, *vqa_data(world), f"output_dir={out}", f"name={name}", "trainer.max_steps=2"]


@pytest.mark.parametrize("how", ["torch", "pickle2"])
def test_evaluate_refuses_a_payload_ckpt(world, tmp_path, marker, capsys, how):
    bad = write_payload(tmp_path / "bad.ckpt", marker, how)
    assert_refused(main(["evaluate", *tcl_args(world, tmp_path), f"ckpt={bad}"]), capsys, bad, marker)


@pytest.mark.parametrize("where", ["checkpoints/last.ckpt", "hpc_ckpt_1.ckpt"])
def test_pretrain_resume_refuses_a_payload_in_the_run_directory(world, tmp_path, marker, capsys, where):
    bad = write_payload(tmp_path / "run" / where, marker)
    line = assert_refused(main(["pretrain", *tcl_args(world, tmp_path), "--no-eval"]), capsys, bad, marker)
    assert "Lightning training checkpoint" in line


@pytest.mark.parametrize("where", ["checkpoints/last.ckpt", "hpc_ckpt_1.ckpt"])
def test_finetune_resume_refuses_a_payload_in_the_run_directory(world, tmp_path, marker, capsys, where):
    bad = write_payload(tmp_path / "run" / where, marker)
    assert_refused(main(["finetune", *vqa_args(world, tmp_path), "ckpt=null", "--no-eval"]), capsys, bad, marker)


def test_finetune_refuses_a_payload_ckpt(world, tmp_path, marker, capsys):
    bad = write_payload(tmp_path / "pre.ckpt", marker)
    assert_refused(main(["finetune", *vqa_args(world, tmp_path), f"ckpt={bad}", "--no-eval"]), capsys, bad, marker)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_converter_refuses_a_payload(tmp_path, marker, capsys):
    bad = write_payload(tmp_path / "official.pth", marker)
    for kind in ("tcl", "bridgetower", "clip-visual"):
        dst = tmp_path / f"{kind}.out"
        assert_refused(main(["convert", kind, str(bad), str(dst)]), capsys, bad, marker)
        assert not dst.exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    torch.save({"bridgetower.text_model.embeddings.word_embeddings.weight": torch.zeros(2), "x": Payload(marker)},
               hf / "pytorch_model.bin")
    assert_refused(main(["convert", "bridgetower-hf", str(hf), str(tmp_path / "bt.ckpt")]), capsys,
                   hf / "pytorch_model.bin", marker)
    assert not (tmp_path / "bt.ckpt").exists()


def test_a_truncated_real_checkpoint_is_named_on_evaluate_and_on_resume(world, tmp_path, capsys, caplog):
    from vlp import config as config_lib
    from vlp.models import build
    from vlp.models.loading import save
    from vlp.train import resolve

    cfg, _ = resolve(config_lib.load(TCL_YAML, tcl_args(world, tmp_path)[1:]))
    real = save(build(cfg.model), tmp_path / "real.ckpt")
    data = real.read_bytes()
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(data[: len(data) * 2 // 3])
    assert_refused(main(["evaluate", *tcl_args(world, tmp_path), f"ckpt={trunc}"]), capsys, trunc,
                   tmp_path / "none", says="truncated or corrupt")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(data[:100])
    # On resume a damaged checkpoint is not fatal (vlp.resume): it is moved aside with a warning naming it, and the
    # next intact one is used -- here there is none, so the run starts afresh.
    assert main(["pretrain", *tcl_args(world, tmp_path), "--no-eval"]) == 0
    assert str(last) in caplog.text and "truncated or corrupt" in caplog.text
    assert last.with_name("last.ckpt.corrupt").is_file() and read_checkpoint(last)["global_step"] == 2


def test_models_and_training_import_nothing_from_the_converters():
    """The one reader lives in vlp.utils.checkpoint: loading a model never pulls in vlp.convert."""
    import subprocess
    import sys

    code = ("import sys, vlp.models, vlp.models.loading, vlp.models.tcl, vlp.models.bridgetower, vlp.tasks.vqa, "
            "vlp.train; print(sorted(m for m in sys.modules if m.startswith('vlp.convert')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
