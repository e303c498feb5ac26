"""What a user sees when something is wrong (issue #11, items 8-9): one ``error:`` line naming the file or key and
what was expected, and a non-zero status, for data, trainer-setting and recipe errors (the traceback with
``vlp --debug``; a bug keeps its traceback); the message of a loader worker's error, not the worker's traceback;
Ctrl-C that says at which step the run stopped and from which checkpoint the same command resumes, exits 130 and
evaluates nothing; skipped corrupt samples summed by reason on the console; the corrupt-ratio stop that waits for a
minimum count; recipes that notice changed raw images, and ``--force``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import recipe_fixtures as F
import yaml

from _tiny_runs import ROOT, subprocess_env, tiny_experiment, vlp_command
from vlp.data.shards import read_index, shard_name, write_index, write_shard
from vlp.data.stream import CorruptCounter, CorruptDataError, CorruptSample, CorruptTally, corrupt_reason

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """``vlp --debug`` sets VLP_DEBUG in the environment; restored after each test."""
    monkeypatch.delenv("VLP_DEBUG", raising=False)


def _experiment(tmp_path: Path, shards: Path, data: dict | None = None, **trainer) -> Path:
    """TCL-tiny's experiment file with ``data`` entries replaced."""
    exp = tiny_experiment("tcl", tmp_path, shards, **trainer)
    cfg = yaml.safe_load(exp.read_text())
    cfg["data"].update(data or {})
    exp.write_text(yaml.safe_dump(cfg))
    return exp


def _tokenizer(shards: Path) -> str:
    return str((shards / "coco" / "train" / read_index(shards / "coco" / "train")["tokenizer"]).resolve())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# -- one line per expected error -----------------------------------------------------------------------------------
def test_data_and_trainer_errors_are_one_line_naming_the_file_or_key(shapes_shards, tmp_path, capsys):
    from vlp.cli import main

    tok = _tokenizer(shapes_shards)
    missing = tmp_path / "nowhere"
    exp = _experiment(tmp_path, shapes_shards, {"train": [{"path": str(missing)}], "test": None})
    assert main(["pretrain", str(exp)]) == 2
    assert _one_error_line(capsys) == (f"error: {missing}/index.json: not found (no directory {missing}); expected a "
                                       "shard directory written by a data_recipes recipe")

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "index.json").write_text('{"format": "vlp-shards/1", ')
    exp = _experiment(tmp_path, shapes_shards, {"train": [{"path": str(bad_json)}], "test": None, "tokenizer": tok})
    assert main(["pretrain", str(exp)]) == 2
    assert _one_error_line(capsys).startswith(f"error: {bad_json}/index.json: not valid JSON (")

    # a shard whose samples lack the image the model reads: every sample is corrupt, the stream gives up
    no_image = tmp_path / "no_image"
    write_shard(no_image / shard_name("train", 0), [
        {"__key__": f"x-{i}", "json": {"image_id": i, "source": "x", "split": "train", "captions": ["a red ball"]}}
        for i in range(16)])
    write_index(no_image, source="x", split="train", shards=[{"name": shard_name("train", 0), "samples": 16}],
                skipped={})
    exp = _experiment(tmp_path, shapes_shards, {"train": [{"path": str(no_image)}], "test": None, "tokenizer": tok})
    assert main(["pretrain", str(exp), "--no-eval"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: 9 corrupt samples in a row in source {no_image} (last in {no_image}/train-000000"
                           ".tar)"), line
    assert "has no image member (jpg/jpeg/png/webp); set data.images=false for a region-only model" in line

    # trainer settings Lightning refuses (MPS exists on no Linux machine, GPU or not)
    exp = _experiment(tmp_path, shapes_shards)
    assert main(["pretrain", str(exp), "trainer.accelerator=mps"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: Lightning refused the trainer settings (trainer.accelerator, devices, strategy, "
                           "precision, num_nodes): `MPSAccelerator` can not run on your system"), line
    assert main(["pretrain", str(exp), "trainer.strategy=nonsense"]) == 2
    assert "You selected an invalid strategy name: `strategy='nonsense'`" in _one_error_line(capsys)
    assert not (tmp_path / "tcl" / "checkpoints").exists()


def test_no_tokenizer_is_one_line_naming_the_index(shapes_shards, tmp_path, capsys):
    """Neither data.tokenizer nor the shard directory's index.json names a tokenizer."""
    from vlp.cli import main

    no_tok = tmp_path / "no_tok"
    write_shard(no_tok / shard_name("train", 0), [{"__key__": "x-0", "json": {"captions": ["a"]}, "jpg": b""}])
    write_index(no_tok, source="x", split="train", shards=[{"name": shard_name("train", 0), "samples": 1}],
                skipped={})
    exp = _experiment(tmp_path, shapes_shards, {"train": [{"path": str(no_tok)}], "test": None})
    assert main(["pretrain", str(exp)]) == 2
    assert _one_error_line(capsys) == (f"error: data.tokenizer is not set and {no_tok}/index.json names no tokenizer; "
                                       "set data.tokenizer to a Hugging Face name or a saved tokenizer directory")


def test_debug_shows_the_traceback_and_a_bug_keeps_it(shapes_shards, tmp_path, monkeypatch, capsys):
    from vlp import train
    from vlp.cli import main
    from vlp.data.shards import ShardFormatError

    exp = _experiment(tmp_path, shapes_shards, {"train": [{"path": str(tmp_path / "nowhere")}], "test": None})
    with pytest.raises(ShardFormatError, match="index.json: not found"):
        main(["--debug", "pretrain", str(exp)])
    assert "VLP_DEBUG" not in os.environ  # an in-process caller gets its environment back

    seen = []

    def bug(*args, **kwargs):
        seen.append(os.environ.get("VLP_DEBUG"))  # what the ranks and recipe workers the run starts inherit
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "pretrain", bug)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "pretrain", str(_experiment(tmp_path, shapes_shards))])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback without --debug too
        main(["pretrain", str(_experiment(tmp_path, shapes_shards))])
    assert seen == ["1", None] and "VLP_DEBUG" not in os.environ

    # a recipe's raw input: one line from `vlp data`, the RecipeError itself under --debug
    from data_recipes._common import RecipeError

    args = ["data", "coco", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err == (f"python -m data_recipes.coco: error: expected the COCO root folder at "
                                       f"{tmp_path / 'raw'}, but it does not exist\n")
    with pytest.raises(RecipeError):
        main(["--debug", *args])


def test_a_loader_workers_error_is_its_own_message_not_the_workers_traceback():
    """torch re-raises a worker's exception in the main process as the same type, its message replaced by the
    worker's whole traceback (``ExceptionWrapper``); the line is the original message, once."""
    from torch._utils import ExceptionWrapper

    from vlp.data.shards import ShardFormatError
    from vlp.errors import user_error

    for exc, line in [(ShardFormatError("/d/train-000001.tar: holds 7 samples but index.json says 6"),
                       "error: /d/train-000001.tar: holds 7 samples but index.json says 6"),
                      (CorruptDataError("12 of 100 samples read were corrupt\nsecond line"),
                       "error: 12 of 100 samples read were corrupt\nsecond line")]:
        try:
            raise exc
        except Exception:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
        with pytest.raises(type(exc)) as info:
            wrapped.reraise()
        assert "Original Traceback" in str(info.value)
        assert user_error(info.value) == (line, 2)
    assert user_error(KeyError("bug")) is None and user_error(RuntimeError("bug")) is None


# -- corrupt samples -------------------------------------------------------------------------------------------------
def test_corrupt_ratio_stop_waits_for_the_minimum_count():
    """``data.max_corrupt_ratio=0.01`` with ``data.corrupt_min_samples=100``: one corrupt sample among the first
    three (33 %) does not stop the run; at 100 samples read the ratio applies: 1 of 100 (= 1 %) is allowed, the
    second corrupt one (2 of 100) stops it."""
    c = CorruptCounter(max_ratio=0.01, min_samples=100)
    c.count_seen(3)
    c(CorruptSample("sample a has no 'json' member"), url="s0.tar", key="a")
    c.count_seen(97)
    assert (c.seen, c.corrupt) == (100, 1)
    c.check()  # 1 <= 0.01 * 100
    with pytest.raises(CorruptDataError, match=r"^2 of 100 samples read were corrupt \(2\.0%\), above "
                                               r"data\.max_corrupt_ratio=0\.01"):
        c(CorruptSample("sample b has no 'json' member"), url="s0.tar", key="b")
    from vlp.data.config import ShardsDataConfig

    assert (ShardsDataConfig().max_corrupt_ratio, ShardsDataConfig().corrupt_min_samples) == (0.01, 100)


def test_corrupt_reasons_and_the_summary_line():
    from webdataset.autodecode import DecodingError

    assert [corrupt_reason(e) for e in (
        DecodingError(k="jpg"), DecodingError(k="PNG"), DecodingError(k="json"), DecodingError(k="regions.npz"),
        CorruptSample("sample k has no 'regions.npz' member"), CorruptSample("sample k: json field 'captions' must"),
        CorruptSample("sample k: regions.npz needs 'features' and 'boxes'"), CorruptSample("x", reason="unreadable"),
        ValueError("something else"))] == ["bad_image", "bad_image", "bad_json", "bad_regions", "missing_member",
                                           "bad_json", "bad_regions", "unreadable", "other"]
    c = CorruptCounter(max_ratio=None)
    c.count_seen(600, source="coco/train")
    c(DecodingError(k="jpg"), source="coco/train")
    c.count_seen(604, source="coco/train")
    c(DecodingError(k="jpg"), source="coco/train")
    c(DecodingError(k="json"), source="coco/train")
    c.count_seen(5, source="vg/train")
    t = CorruptTally()
    t.add({"coco/train": {"read": 600, "bad_image": 1}})  # two batches, as two workers send them
    t.add({"coco/train": {"read": 604, "bad_image": 1, "bad_json": 1}, "vg/train": {"read": 5}})
    assert dict(t.counts) == dict(c.counts) and t.corrupt == 3
    assert t.lines("epoch 0") == ["data: epoch 0: skipped 3 corrupt samples of 1,204 read (bad_image=2, bad_json=1) "
                                  "in coco/train"]
    assert CorruptTally().lines("epoch 0") == []


def _corrupted_copy(shards: Path, out: Path, n: int = 48) -> Path:
    """The first ``n`` samples of the shapes world's coco/train, two of them with undecodable images and one
    without its json, in one shard."""
    src = shards / "coco" / "train"
    index = read_index(src)
    samples: dict[str, dict] = {}
    for s in index["shards"]:
        with tarfile.open(src / s["name"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    keys = sorted(samples)[:n]
    samples[keys[5]]["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg"
    samples[keys[20]]["jpg"] = b"GIF89a neither"
    del samples[keys[40]]["json"]
    write_shard(out / shard_name("train", 0), [samples[k] for k in keys])
    write_index(out, source=index["source"], split=index["split"], skipped={},
                shards=[{"name": shard_name("train", 0), "samples": n}])
    return out


# -- Ctrl-C ----------------------------------------------------------------------------------------------------------
def _as_from_a_shell() -> None:
    """In the child before exec: SIGINT as a terminal's shell starts a foreground command (default action, not
    blocked), whatever this test process inherited (a process started with SIGINT ignored -- a background job --
    rightly never sees Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_names_the_step_and_the_checkpoint_exits_130_and_evaluates_nothing(shapes_shards, tmp_path):
    """A real ``vlp pretrain`` with 2 loader workers over shards holding 3 corrupt samples; after its first epoch
    (6 steps) it prints the skipped samples by reason, and SIGINT to its process group (a terminal's Ctrl-C)
    after the step-9 checkpoint ends it with one line and status 130: no worker noise, no traceback, no
    evaluation, no final checkpoint; the newest checkpoint is the one the line names."""
    from vlp import config
    from vlp.resume import is_finished, select_checkpoint

    data = _corrupted_copy(shapes_shards, tmp_path / "bad" / "coco" / "train")
    exp = _experiment(tmp_path, shapes_shards, {"train": [{"path": str(data)}], "num_workers": 2,
                                                "tokenizer": _tokenizer(shapes_shards),
                                                "max_corrupt_ratio": 0.01, "corrupt_min_samples": 100},
                      max_steps=1000)
    run = tmp_path / "tcl"
    log = tmp_path / "out.txt"
    with log.open("wb") as out:
        inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
        proc = subprocess.Popen(vlp_command("pretrain", str(exp)), cwd=ROOT, env=subprocess_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_as_from_a_shell)
        target, deadline = run / "checkpoints" / "step0000009.ckpt", time.time() + 240
        try:
            while not target.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint appeared in time"
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert rc == 130, f"(this process's SIGINT handler and mask: {inherited})\n{text[-3000:]}"
    found = select_checkpoint(run, set_aside_damaged=False)
    assert found is not None and 9 <= found.global_step < 1000
    stops = [line for line in text.splitlines() if line.startswith("stopped by Ctrl-C")]
    assert len(stops) == 1, text[-3000:]
    step = int(stops[0].split("at step ")[1].split(";")[0])
    assert found.global_step <= step < 1000
    assert stops[0] == (f"stopped by Ctrl-C at step {step}; the same command resumes the run from its last "
                        f"checkpoint (step {found.global_step})")
    for noise in ("Traceback", "exited unexpectedly"):
        assert noise not in text, text[-3000:]
    assert not (run / "results.json").exists()
    assert not is_finished(found, config.load(exp).trainer)
    # the first epoch (48 samples read once, 3 of them corrupt, + 3 replacements) and no stop by the ratio (6 %):
    # each worker read fewer than corrupt_min_samples=100
    assert "data: epoch 0: skipped 3 corrupt samples of 51 read (bad_image=2, missing_member=1) in coco/train" in text


def test_a_ctrl_c_lost_where_it_landed_still_stops_training_at_the_next_batch(tmp_path):
    """Python raises Ctrl-C's KeyboardInterrupt wherever the main thread is; raised inside a ``__del__`` it is only
    printed and training would go on (the Ctrl-C test above met this once in CI). The guard raises it again at the
    next batch boundary: here the interrupt lands in a handler that swallows it during step 3."""
    import lightning as L
    import torch

    from vlp.utils.interrupt import ctrl_c_guard, is_ctrl_c

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin, self.steps = torch.nn.Linear(2, 1), []

        def training_step(self, batch, batch_idx):
            self.steps.append(self.global_step)
            if self.global_step == 2:
                try:
                    signal.raise_signal(signal.SIGINT)
                    for _ in range(1000):  # (the handler runs at the next bytecode boundary, in here)
                        pass
                except KeyboardInterrupt:
                    pass  # what an "Exception ignored in __del__" amounts to
            return self.lin(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[ctrl_c_guard()],
                        default_root_dir=str(tmp_path))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (the guard leaves any other alone)
    with pytest.raises(BaseException) as caught:
        trainer.fit(model, torch.utils.data.DataLoader(torch.randn(40, 2), batch_size=2))
    assert is_ctrl_c(caught.value)
    assert model.steps == [0, 1, 2]  # step 3's batch end raised it again: no step 4


def test_loader_workers_leave_ctrl_c_and_sigusr1_to_the_rank():
    """A terminal's Ctrl-C reaches every process of the group: a worker that died of it at start-up would print its
    own traceback; ``WorkerInit`` (run first in every loader worker) makes the worker ignore SIGINT and SIGUSR1."""
    from vlp.utils.stalls import WorkerInit

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    called = []
    try:
        WorkerInit(inner=called.append)(3)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert called == [3]


# -- recipes: changed raw images, --force ----------------------------------------------------------------------------
def _files(d: Path) -> dict[str, tuple[int, int]]:
    """Shard files by name -> (inode, mtime): a rewritten file is a new inode (atomic replace), whatever the
    timestamp granularity."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.iterdir()) if p.suffix == ".tar"}


def test_a_recipe_rewrites_exactly_the_shards_whose_images_changed_and_force_rewrites_all(tmp_path, capsys):
    from data_recipes import coco

    raw = tmp_path / "raw"
    F.make_coco(raw)
    out = tmp_path / "out"
    build = ["--root", str(raw), "--out", str(out), "--split", "train", "--shard-size", "2", "--no-progress"]
    # records 1, 2 | 3, 4 | 6: image 2 is missing, image 3 truncated
    assert coco.main(build) == 0
    first = read_index(out / "train")
    assert first["skipped"] == {"missing_image": 1, "corrupt_image": 1, "empty_caption": 3, "no_caption": 1}
    before = _files(out / "train")

    F.write(raw / "train2017" / "000000000002.jpg", F.jpeg(40, 30))  # the missing image appears
    assert coco.main(build) == 0
    assert "(1 written, 2 already done)" in capsys.readouterr().out
    index, after = read_index(out / "train"), _files(out / "train")
    assert [s["samples"] for s in index["shards"]] == [2, 1, 1]
    assert index["skipped"] == {"corrupt_image": 1, "empty_caption": 3, "no_caption": 1}
    assert after["train-000000.tar"] != before["train-000000.tar"]
    assert {k: after[k] for k in ("train-000001.tar", "train-000002.tar")} == {
        k: before[k] for k in ("train-000001.tar", "train-000002.tar")}

    F.write(raw / "train2017" / "000000000003.jpg", F.jpeg(30, 20))  # the truncated one is replaced
    (raw / "train2017" / "000000000006.png").unlink()  # and another removed
    assert coco.main(build) == 0
    assert "(2 written, 1 already done)" in capsys.readouterr().out
    index, again = read_index(out / "train"), _files(out / "train")
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar"]  # shard 2 now empty
    assert [s["samples"] for s in index["shards"]] == [2, 2]
    assert index["skipped"] == {"missing_image": 1, "empty_caption": 3, "no_caption": 1}
    assert again["train-000000.tar"] == after["train-000000.tar"] and again["train-000001.tar"] != after[
        "train-000001.tar"]

    assert coco.main(build) == 0 and "(0 written, 3 already done)" in capsys.readouterr().out
    assert coco.main([*build, "--force"]) == 0
    assert "(3 written, 0 already done)" in capsys.readouterr().out
    forced = _files(out / "train")
    assert all(forced[k] != again[k] for k in again)
    assert read_index(out / "train") == index
