"""The benchmarks cannot rot: ``bash benchmarks/gpu.sh --dry-run`` runs the GPU script's steps on CPU (every model,
unit size, one step) and its JSON is checked against the arithmetic that defines each figure; retrieval_cost's
claim (top-k re-ranking gives the all-pairs R@K when the matching score agrees with the contrastive ranking) is
checked against ranks computed here from the embeddings; the base-size text towers build without the hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import retrieval_cost  # noqa: E402


def test_gpu_script_dry_run_measures_every_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PY": sys.executable}
    out = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.parent.parent == tmp_path  # a temp dir, never benchmarks/results/
    report = json.loads(path.read_text())
    assert report["dry_run"] is True and report["train_step_rc"] == 0
    assert report["tests"]["skipped"].startswith("dry run") and "pytest" in report["tests"]["command"]
    runs = report["runs"]
    assert sorted(r["model"] for r in runs) == sorted(MODELS)
    for r in runs:
        assert "error" not in r and "skipped" not in r, r
        assert (r["size"], r["precision"], r["compile"], r["batch"]) == ("unit", "fp32", False, 2)
        for key in ("samples_per_s", "ms_per_step", "tflops_per_s", "flops_per_step", "peak_flops", "peak_mem_mib",
                    "params_m"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, (r["model"], key, r[key])
        sec = r["ms_per_step"] / 1e3
        assert r["samples_per_s"] == pytest.approx(r["batch"] / sec, rel=1e-3)
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / sec / r["peak_flops"], rel=1e-3, abs=1e-5)
        assert 0 < r["mfu"] <= 1
    assert set(report["mfu_goal"]) == {"tcl", "bridgetower"}
    assert all(g["met"] is False for g in report["mfu_goal"].values())  # unit models on a CPU: far below 40 %


def _hand_ranks(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the true pair (the diagonal) for each image (row) and each caption (column)."""
    diag = sim.diag()
    return (sim > diag[:, None]).sum(1), (sim > diag[None, :]).sum(0)


def test_top_k_reranking_gives_the_all_pairs_recall():
    n, k = 40, 8
    row = retrieval_cost.measure(n, k=k)
    assert row["equal_r_at_k"] is True
    assert row["all_pairs"]["itm_pairs"] == n * n
    assert n * k <= row["top_k"]["itm_pairs"] <= 2 * n * k  # i2t and t2i candidates, shared pairs scored once
    # The recall both protocols report is the one the contrastive similarity implies.
    visual, text, captions = retrieval_cost.gallery(n)
    e_img = torch.nn.functional.normalize(visual.features.mean(1), dim=-1)
    e_txt = torch.nn.functional.normalize(captions.mean(1), dim=-1)
    rank_i2t, rank_t2i = _hand_ranks(e_img @ e_txt.T)
    for K in (1, 5):
        for protocol in ("top_k", "all_pairs"):
            recall = row[protocol]["recall"]
            assert recall[f"txt_r{K}"] == pytest.approx(100 * (rank_i2t < K).double().mean().item(), abs=1e-3)
            assert recall[f"img_r{K}"] == pytest.approx(100 * (rank_t2i < K).double().mean().item(), abs=1e-3)
    assert 0 < row["all_pairs"]["recall"]["img_r1"] < 100  # neither trivial nor hopeless


def test_base_text_towers_build_offline():
    import train_step
    from vlp.blocks.text import TextConfig

    bert = train_step.offline_text(TextConfig.base(), "base")
    assert (bert.name, bert.pretrained, bert.arch, bert.vocab_size, bert.hidden, bert.layers, bert.fusion_layers,
            bert.encoder_width) == (None, False, "bert", 30522, 768, 12, 6, 768)
    roberta = train_step.offline_text(TextConfig(name="roberta-base", pretrained=True), "base")
    assert (roberta.arch, roberta.vocab_size, roberta.max_position, roberta.pad_token_id) == ("roberta", 50265, 514, 1)
    with pytest.raises(SystemExit, match=r"text.name 'gpt2': no offline architecture for it in "
                                         r"benchmarks/train_step.py HUB_TEXT \(known: bert-base-uncased, "
                                         r"bert-base-cased, roberta-base\)"):
        train_step.offline_text(TextConfig(name="gpt2"), "base")
