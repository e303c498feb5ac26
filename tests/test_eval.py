"""vlp.eval: retrieval ranking / re-ranking / R@K, VQA score and accuracy, results.json."""

from __future__ import annotations

import io
import json
import math
import os
import random

import pytest
import torch

from vlp.eval import retrieval as R
from vlp.eval.results import (
    format_retrieval_table,
    print_retrieval_table,
    read_results,
    results_path,
    write_results,
)
from vlp.eval.retrieval import recall_at_k, retrieval_ranks, retrieval_scores
from vlp.eval.vqa import VQAScore, normalize_answer, vqa_accuracy, vqa_score

# ------------------------------------------------------------------------------------------ hand-worked recall ---
# 3 images x 6 captions; image i owns captions 2i and 2i+1.
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]
HAND = torch.tensor([
    #  t0   t1   t2   t3   t4   t5
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # img0: best positive t0 (0.9), nothing above          -> rank 0
    [0.7, 0.6, 0.5, 0.1, 0.4, 0.3],  # img1: best positive t2 (0.5), negatives 0.7, 0.6 above -> rank 2
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],  # img2: best positive t4 (0.5), 4 negatives above       -> rank 4
])
# Text -> image on the same matrix (score_t2i = HAND.T), column by column:
#   t0: [0.9, 0.7, 0.9] positive img0 = 0.9, ties with img2 (counted above it)  -> rank 1
#   t1: [0.1, 0.6, 0.8] positive img0 = 0.1, two above                          -> rank 2
#   t2: [0.8, 0.5, 0.7] positive img1 = 0.5, two above                          -> rank 2
#   t3: [0.2, 0.1, 0.6] positive img1 = 0.1, two above                          -> rank 2
#   t4: [0.3, 0.4, 0.5] positive img2 = 0.5                                     -> rank 0
#   t5: [0.0, 0.3, 0.1] positive img2 = 0.1, img1 above                         -> rank 1


def test_ranks_hand_worked():
    ri, rt = retrieval_ranks(HAND, HAND.T, IMG2TXT, TXT2IMG)
    assert ri.tolist() == [0, 2, 4]
    assert rt.tolist() == [1, 2, 2, 2, 0, 1]


def test_recall_hand_worked():
    r = recall_at_k(HAND, HAND.T, IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    # TR: ranks [0, 2, 4] -> R@1 1/3, R@2 1/3, R@3 2/3.  IR: ranks [1, 2, 2, 2, 0, 1] -> R@1 1/6, R@2 3/6, R@3 6/6.
    expected = {"txt_r1": 100 / 3, "txt_r2": 100 / 3, "txt_r3": 200 / 3,
                "img_r1": 100 / 6, "img_r2": 50.0, "img_r3": 100.0}
    expected["txt_r_mean"] = (100 / 3 + 100 / 3 + 200 / 3) / 3  # 44.44
    expected["img_r_mean"] = (100 / 6 + 50 + 100) / 3  # 55.56
    expected["r_mean"] = 50.0
    expected["rsum"] = 100 / 3 + 100 / 3 + 200 / 3 + 100 / 6 + 50 + 100
    assert set(r) == set(expected)
    for key, v in expected.items():
        assert r[key] == pytest.approx(v), key


def test_recall_default_ks_keys_and_k_beyond_candidates():
    r = recall_at_k(HAND, HAND.T, IMG2TXT, TXT2IMG)
    assert list(r) == ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
                       "txt_r_mean", "img_r_mean", "r_mean", "rsum"]
    # TR@5: ranks [0, 2, 4] all < 5; IR@5: all < 5; R@10 beyond the 6 / 3 candidates: everything is a hit.
    assert r["txt_r1"] == pytest.approx(100 / 3) and r["txt_r5"] == 100.0 and r["txt_r10"] == 100.0
    assert r["img_r1"] == pytest.approx(100 / 6) and r["img_r5"] == 100.0 and r["img_r10"] == 100.0


def test_recall_constant_scores_are_not_hits():
    # Pessimistic ties: a scorer that says nothing gets R@1 = 0, not 100 (each image has 4 negatives tied above).
    r = recall_at_k(torch.zeros(3, 6), torch.zeros(6, 3), IMG2TXT, TXT2IMG, ks=(1, 4, 5))
    assert r["txt_r1"] == 0.0 and r["txt_r4"] == 0.0 and r["txt_r5"] == 100.0
    assert r["img_r1"] == 0.0


def _random_world(n_img: int, max_caps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(1, max_caps + 1, (n_img,), generator=g).tolist()
    txt2img = [i for i, c in enumerate(caps) for _ in range(c)]
    random.Random(seed).shuffle(txt2img)  # captions of one image are not contiguous
    img2txt = [[] for _ in range(n_img)]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    return img2txt, txt2img, g


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x - x.min() + 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_torchmetrics(seed):
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalRecall

    img2txt, txt2img, g = _random_world(25, 4, seed)
    n_img, n_txt = len(img2txt), len(txt2img)
    si, st = torch.randn(n_img, n_txt, generator=g), torch.randn(n_txt, n_img, generator=g)
    ks = (1, 3, 5, 10)
    ours = recall_at_k(si, st, img2txt, txt2img, ks=ks)
    pos = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, ts in enumerate(img2txt):
        pos[i, ts] = True
    q_img = torch.arange(n_img).repeat_interleave(n_txt)
    q_txt = torch.arange(n_txt).repeat_interleave(n_img)
    for k in ks:
        # Image -> text with several captions: the official metric is "any positive in the top K", i.e. the hit
        # rate (torchmetrics' RetrievalRecall would count the fraction of captions found instead).
        hit = RetrievalHitRate(top_k=k)(si.flatten(), pos.flatten(), indexes=q_img)
        assert ours[f"txt_r{k}"] == pytest.approx(100 * hit.item(), abs=1e-4)
        # Text -> image has one positive per query: recall == hit rate. (torchmetrics 1.9's recall ignores
        # positives scored <= 0, so the scores are shifted above 0; the ranking is unchanged.)
        rec = RetrievalRecall(top_k=k)(_positive(st).flatten(), pos.T.flatten(), indexes=q_txt)
        assert ours[f"img_r{k}"] == pytest.approx(100 * rec.item(), abs=1e-4)
    assert 0 < ours["txt_r3"] < 100 and 0 < ours["img_r3"] < 100  # the comparison is not trivially 0 or 100


def test_recall_matches_torchmetrics_recall_one_caption_each():
    from torchmetrics.retrieval import RetrievalRecall

    g = torch.Generator().manual_seed(3)
    n = 30
    perm = torch.randperm(n, generator=g)  # caption perm[i] belongs to image i
    txt2img = torch.empty(n, dtype=torch.long)
    txt2img[perm] = torch.arange(n)
    si = torch.randn(n, n, generator=g)
    ours = recall_at_k(si, si.T, [[int(p)] for p in perm], txt2img.tolist(), ks=(1, 5, 10))
    pos = torch.zeros(n, n, dtype=torch.bool)
    pos[torch.arange(n), perm] = True
    q = torch.arange(n).repeat_interleave(n)
    sp = _positive(si)  # see test_recall_matches_torchmetrics
    for k in (1, 5, 10):
        tr = RetrievalRecall(top_k=k)(sp.flatten(), pos.flatten(), indexes=q).item()
        ir = RetrievalRecall(top_k=k)(sp.T.flatten(), pos.T.flatten(), indexes=q).item()
        assert ours[f"txt_r{k}"] == pytest.approx(100 * tr, abs=1e-4)
        assert ours[f"img_r{k}"] == pytest.approx(100 * ir, abs=1e-4)
    assert 0 < ours["txt_r5"] < 100 and 0 < ours["img_r5"] < 100


def test_recall_rejects_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((3, 6), float("nan")), HAND.T, IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(HAND, HAND.T, [[0, 1], [], [2, 3, 4, 5]], TXT2IMG)
    with pytest.raises(ValueError, match="N_txt, N_img"):
        recall_at_k(HAND, HAND, IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(HAND, HAND.T, IMG2TXT, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(HAND, HAND.T, [[0, 1], [2, 3], [4, 6]], TXT2IMG)


# -------------------------------------------------------------------------------------------------- re-ranking ---
def _embeddings(n_img=12, caps=2, dim=16, signal=0.35, seed=0):
    g = torch.Generator().manual_seed(seed)
    txt2img = torch.arange(n_img).repeat_interleave(caps)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    noise = torch.randn(len(txt2img), dim, generator=g) / dim**0.5
    txt = torch.nn.functional.normalize(signal * img[txt2img] + noise, dim=1)
    img2txt = [list(range(i * caps, (i + 1) * caps)) for i in range(n_img)]
    return img, txt, img2txt, txt2img


def _pair_scorer(fn, log=None):
    def score_pairs(i, t):
        assert i.dtype == torch.long and t.dtype == torch.long and i.shape == t.shape
        if log is not None:
            log.append((i.clone(), t.clone()))
        return fn(i, t)
    return score_pairs


def test_rerank_with_truthful_scorer_hits_iff_positive_in_topk():
    img, txt, img2txt, txt2img = _embeddings()
    k = 3
    itc_i, itc_t = retrieval_ranks(img @ txt.T, txt @ img.T, img2txt, txt2img.tolist())
    truth = _pair_scorer(lambda i, t: (txt2img[t] == i).float() * 5.0)
    si, st = retrieval_scores(img, txt, truth, k=k)
    rr_i, rr_t = retrieval_ranks(si, st, img2txt, txt2img.tolist())
    in_i, in_t = itc_i < k, itc_t < k
    # The test means something only if both cases occur.
    assert in_i.any() and (~in_i).any() and in_t.any() and (~in_t).any()
    assert torch.equal(rr_i == 0, in_i) and torch.equal(rr_t == 0, in_t)
    # Outside the top-k the positive stays at -100, below all k candidates: a miss for every K <= k, as with ITC.
    assert (rr_i[~in_i] >= k).all() and (rr_t[~in_t] >= k).all()
    r = recall_at_k(si, st, img2txt, txt2img.tolist(), ks=(1, k))
    itc = recall_at_k(img @ txt.T, txt @ img.T, img2txt, txt2img.tolist(), ks=(1, k))
    assert r["txt_r1"] == pytest.approx(100 * in_i.float().mean().item()) == pytest.approx(itc[f"txt_r{k}"])
    assert r["img_r1"] == pytest.approx(100 * in_t.float().mean().item()) == pytest.approx(itc[f"img_r{k}"])
    assert r["txt_r1"] > itc["txt_r1"]


def _distinct(i, t):
    return (i * 1000 + t + 1).float()  # identifies the pair it was called for


def test_rerank_fills_outside_topk_and_scores_the_right_pairs():
    img, txt, _, _ = _embeddings(n_img=5, caps=3, seed=1)
    sim = img @ txt.T
    k = 2
    si, st = retrieval_scores(img, txt, _pair_scorer(_distinct), k=k)
    expect_i = torch.full_like(sim, -100.0)
    for i in range(sim.shape[0]):
        for t in sim[i].topk(k).indices.tolist():
            expect_i[i, t] = i * 1000 + t + 1
    expect_t = torch.full_like(sim.T, -100.0)
    for t in range(sim.shape[1]):
        for i in sim[:, t].topk(k).indices.tolist():
            expect_t[t, i] = i * 1000 + t + 1
    assert torch.equal(si, expect_i) and torch.equal(st, expect_t)
    assert ((si != -100).sum(1) == k).all() and ((st != -100).sum(1) == k).all()

    # add_itc: the contrastive similarity is added to the candidates; the rest stays -100.
    si2, st2 = retrieval_scores(img, txt, _pair_scorer(_distinct), k=k, add_itc=True)
    m = expect_i != -100
    assert torch.allclose(si2[m], expect_i[m] + sim[m]) and (si2[~m] == -100).all()
    m = expect_t != -100
    assert torch.allclose(st2[m], expect_t[m] + sim.T[m]) and (st2[~m] == -100).all()

    # A different fill value is honoured, and a scorer at or below it is flagged.
    si3, _ = retrieval_scores(img, txt, _pair_scorer(_distinct), k=k, fill_value=-1e4)
    assert torch.equal(si3 == -1e4, expect_i == -100)
    with pytest.warns(UserWarning, match="fill_value"):
        retrieval_scores(img, txt, _pair_scorer(lambda i, t: torch.full(i.shape, -200.0)), k=k)


def test_combine_max_hand_worked():
    sim = torch.tensor([[0.9, 0.8],
                        [0.1, 0.5]])
    table = torch.tensor([[1.0, 2.0],
                          [3.0, 4.0]])
    scorer = _pair_scorer(lambda i, t: table[i, t])
    # k=1. i2t: img0 -> t0, img1 -> t1.  t2i: t0 -> img0 (0.9 > 0.1), t1 -> img0 (0.8 > 0.5).
    si, st = retrieval_scores(sim=sim, score_pairs=scorer, k=1)
    assert si.tolist() == [[1.0, -100.0], [-100.0, 4.0]]
    assert st.tolist() == [[1.0, -100.0], [2.0, -100.0]]
    # BridgeTower: S = max(i2t, t2i.T) = [[1, 2], [-100, 4]], and both directions rank from S.
    mi, mt = retrieval_scores(sim=sim, score_pairs=scorer, k=1, combine="max")
    assert mi.tolist() == [[1.0, 2.0], [-100.0, 4.0]]
    assert torch.equal(mt, mi.T)
    # img0 now ranks t1 first (found only by the t2i pass); separate kept t0 first.
    assert mi[0].argmax() == 1 and si[0].argmax() == 0


def test_combine_max_is_elementwise_max_of_separate():
    img, txt, _, _ = _embeddings(n_img=9, caps=3, seed=2)
    scorer = _pair_scorer(lambda i, t: torch.sin(i.float() * 1.3 + t.float() * 0.7) * 3)
    si, st = retrieval_scores(img, txt, scorer, k=4)
    mi, mt = retrieval_scores(img, txt, scorer, k=4, combine="max")
    assert torch.equal(mi, torch.maximum(si, st.T)) and torch.equal(mt, mi.T)
    assert not torch.equal(mi, si)  # the t2i pass contributed entries


@pytest.mark.parametrize("dedup", [True, False])
def test_chunked_scorer_equals_unchunked(dedup):
    img, txt, _, _ = _embeddings(n_img=10, caps=3, seed=4)
    n_img, n_txt, k, chunk = 10, 30, 4, 7
    calls_big, calls, totals = [], [], []
    big = retrieval_scores(img, txt, _pair_scorer(_distinct, calls_big), k=k, chunk=10**6, dedup=dedup)
    small = retrieval_scores(img, txt, _pair_scorer(_distinct, calls), k=k, chunk=chunk, dedup=dedup,
                             on_total=totals.append)
    assert torch.equal(big[0], small[0]) and torch.equal(big[1], small[1])
    sizes = [i.numel() for i, _ in calls]
    assert max(sizes) <= chunk and len(calls) > 1
    pairs = [(a, b) for i, t in calls for a, b in zip(i.tolist(), t.tolist())]
    pairs_big = [(a, b) for i, t in calls_big for a, b in zip(i.tolist(), t.tolist())]
    assert pairs == pairs_big  # chunking splits the same sequence of pairs
    assert totals == [len(pairs)]  # announced once, before scoring: a progress bar's total
    if dedup:
        assert len(pairs) == len(set(pairs)) < n_img * k + n_txt * k
        assert pairs == sorted(pairs)  # grouped by image
    else:
        assert len(pairs) == n_img * k + n_txt * k


def test_dedup_gives_same_scores():
    img, txt, _, _ = _embeddings(n_img=8, caps=2, seed=5)
    a = retrieval_scores(img, txt, _pair_scorer(_distinct), k=3, dedup=True)
    b = retrieval_scores(img, txt, _pair_scorer(_distinct), k=3, dedup=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_k_clamped_and_all_pairs():
    img, txt, _, _ = _embeddings(n_img=4, caps=2, seed=6)
    full = _distinct(torch.arange(4)[:, None], torch.arange(8)[None, :])
    for k in (1000, None):
        si, st = retrieval_scores(img, txt, _pair_scorer(_distinct), k=k)
        assert torch.equal(si, full) and torch.equal(st, full.T)
    # Single-stream models without a contrastive head: score all pairs, no first stage.
    si, st = retrieval_scores(sim=torch.zeros(4, 8), score_pairs=_pair_scorer(_distinct), k=None)
    assert torch.equal(si, full) and torch.equal(st, full.T)


def test_no_rerank_and_argument_errors():
    img, txt, _, _ = _embeddings(n_img=4, caps=2, seed=7)
    si, st = retrieval_scores(img, txt)  # no scorer: contrastive similarity only
    assert torch.allclose(si, img @ txt.T) and torch.equal(st, si.T)
    si, _ = retrieval_scores(img, txt, _pair_scorer(_distinct), rerank=False)
    assert torch.allclose(si, img @ txt.T)
    with pytest.raises(ValueError, match="score_pairs"):
        retrieval_scores(img, txt, rerank=True)
    with pytest.raises(ValueError, match="one score per pair"):
        retrieval_scores(img, txt, _pair_scorer(lambda i, t: torch.zeros(i.numel(), 2)), k=2)
    with pytest.raises(ValueError, match="combine"):
        retrieval_scores(img, txt, _pair_scorer(_distinct), combine="mean")
    with pytest.raises(ValueError, match="embeddings"):
        retrieval_scores(img, txt[:, :3])


def test_row_split_across_simulated_ranks(monkeypatch):
    img, txt, _, _ = _embeddings(n_img=7, caps=2, seed=8)  # 7 images, 14 texts
    k, world = 3, 5  # 7 images over 5 ranks: step 2 -> rank 4 owns none
    ref = retrieval_scores(img, txt, _pair_scorer(_distinct), k=k)
    total = [torch.zeros(7, 14), torch.zeros(14, 7)]
    for rank in range(world):
        reduced, calls = [], []
        monkeypatch.setattr(R, "_dist_env", lambda group=None, r=rank: (r, world, True))
        monkeypatch.setattr(R, "_all_reduce_sum", lambda t, group=None: reduced.append(t.clone()) or t)
        retrieval_scores(img, txt, _pair_scorer(_distinct, calls), k=k)
        part_i, part_t = reduced
        i0, i1 = min(7, 2 * rank), min(7, 2 * rank + 2)
        t0, t1 = min(14, 3 * rank), min(14, 3 * rank + 3)
        # Only own rows are non-zero before the reduction.
        assert (part_i[:i0] == 0).all() and (part_i[i1:] == 0).all()
        assert (part_t[:t0] == 0).all() and (part_t[t1:] == 0).all()
        # The scorer saw only pairs of own images (i2t) or own texts (t2i).
        for i, t in calls:
            assert (((i >= i0) & (i < i1)) | ((t >= t0) & (t < t1))).all()
        total[0] += part_i
        total[1] += part_t
    assert torch.equal(total[0], ref[0]) and torch.equal(total[1], ref[1])


def test_real_process_group_single_rank(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    img, txt, img2txt, txt2img = _embeddings(n_img=6, caps=2, seed=9)
    ref = retrieval_scores(img, txt, _pair_scorer(_distinct), k=3, combine="max")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = retrieval_scores(img, txt, _pair_scorer(_distinct), k=3, combine="max")
    finally:
        dist.destroy_process_group()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --------------------------------------------------------------------------------------------------------- VQA ---
def test_vqa_score_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0],    # -> answer 0, target 1.0
                           [0.0, 0.0, 3.0, 1.0],    # -> answer 2, target 0.3
                           [0.0, 5.0, 0.0, 0.0]])   # -> answer 1, target 0.0 (its best answer 3 scores 1.0)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.3, 0.6],
                            [0.0, 0.0, 0.0, 1.0]])
    assert vqa_score(logits, targets) == pytest.approx(100 * (1.0 + 0.3 + 0.0) / 3)  # 43.33
    assert math.isnan(vqa_score(torch.zeros(0, 4), torch.zeros(0, 4)))
    with pytest.raises(ValueError):
        vqa_score(logits, targets[:, :3])


def test_vqa_metric_accumulates_and_merges():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(20, 7, generator=g), torch.rand(20, 7, generator=g)
    m = VQAScore()
    m.update(logits[:8], targets[:8])
    m.update(logits[8:], targets[8:])
    assert m.compute().item() == pytest.approx(vqa_score(logits, targets), rel=1e-6)
    # Distributed reduction: the states are sums, so merging two workers' states gives the global score.
    a, b = VQAScore(), VQAScore()
    a.update(logits[:5], targets[:5])
    b.update(logits[5:], targets[5:])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(vqa_score(logits, targets), rel=1e-6)
    assert a.compute().item() != pytest.approx(vqa_score(logits[:5], targets[:5]), rel=1e-6)
    m.reset()
    assert int(m.count) == 0


def _loo_reference(pred, gts):
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(o == pred for o in others) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_leave_one_out_values():
    # 10 human answers; m of them equal the prediction. Leaving out a match leaves m-1, any other leaves m:
    # m=1: (1*0 + 9*1/3)/10 = 0.3;  m=2: (2*1/3 + 8*2/3)/10 = 0.6;  m=3: (3*2/3 + 7*1)/10 = 0.9;  m>=4: 1.
    for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        gts = ["cat"] * m + ["dog"] * (10 - m)
        assert vqa_accuracy("cat", gts) == pytest.approx(expected), m
    rng = random.Random(0)
    for _ in range(200):
        gts = [rng.choice("abcd") for _ in range(rng.randint(1, 10))]
        pred = rng.choice("abcde")
        assert vqa_accuracy(pred, gts, normalize=False) == pytest.approx(_loo_reference(pred, gts))
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


def test_vqa_accuracy_normalisation():
    assert normalize_answer(" Two dogs.\n") == "2 dogs"
    assert normalize_answer("a dog") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("black-and-white") == "black and white"
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Yes!", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes!", ["yes"] * 10, normalize=False) == 0.0


# ----------------------------------------------------------------------------------------------- results.json ---
RET = {"txt_r1": 75.6, "txt_r5": 92.8, "txt_r10": 96.7, "img_r1": 59.0, "img_r5": 83.2, "img_r10": 89.9,
       "r_mean": 82.8666666}


def test_results_merge_retrieval_and_vqa(tmp_path):
    assert read_results(tmp_path) == {}
    write_results(tmp_path, {"retrieval": {**RET, "txt_r1": torch.tensor(75.6, dtype=torch.float64)}},
                  model="tcl", step=100)
    merged = write_results(tmp_path, {"vqa": {"score": 74.9, "extra": float("nan")}}, step=200)
    on_disk = json.loads(results_path(tmp_path).read_text())
    assert on_disk == merged == read_results(tmp_path)
    assert on_disk["model"] == "tcl" and on_disk["step"] == 200
    assert on_disk["retrieval"] == RET and on_disk["vqa"] == {"score": 74.9, "extra": None}
    # Nested merge: a partial retrieval update keeps the other keys.
    write_results(tmp_path, {"retrieval": {"txt_r1": 80.0}})
    assert read_results(tmp_path)["retrieval"] == {**RET, "txt_r1": 80.0}
    assert sorted(os.listdir(tmp_path)) == [".results.json.lock", "results.json"]  # no temp files left


def test_results_write_is_atomic(tmp_path, monkeypatch):
    write_results(tmp_path, {"retrieval": RET}, model="tcl")
    before = results_path(tmp_path).read_text()

    def boom(fd):
        raise OSError("disk died")

    monkeypatch.setattr(os, "fsync", boom)  # fails after the new content is written to the temp file
    with pytest.raises(OSError, match="disk died"):
        write_results(tmp_path, {"vqa": {"score": 1.0}})
    monkeypatch.undo()
    assert results_path(tmp_path).read_text() == before
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_results_corrupt_file_raises(tmp_path):
    results_path(tmp_path).write_text("{not json")
    with pytest.raises(ValueError, match="results.json"):
        write_results(tmp_path, {"vqa": {"score": 1.0}})
    assert results_path(tmp_path).read_text() == "{not json"


def test_format_retrieval_table(tmp_path):
    one = {"model": "tcl", "step": 100, "retrieval": RET}
    assert format_retrieval_table(one) == (
        "| Model | Step | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | R_mean |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| tcl | 100 | 75.60 | 92.80 | 96.70 | 59.00 | 83.20 | 89.90 | 82.87 |\n"
    )
    table = format_retrieval_table({"tcl": one, "bt": {"retrieval": {"txt_r1": 94.7}}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| tcl | 100 | 75.60")
    assert lines[3] == "| bt | – | 94.70 | – | – | – | – | – | – |"
    # Run directories are read from disk and labelled by their model field.
    write_results(tmp_path / "run_a", {"retrieval": RET}, model="bridgetower", step=5)
    assert format_retrieval_table([tmp_path / "run_a"]).splitlines()[2].startswith("| bridgetower | 5 | 75.60 |")

    from rich.console import Console

    buf = io.StringIO()
    print_retrieval_table(one, console=Console(file=buf, width=120, color_system=None))
    out = buf.getvalue()
    assert "TR@1" in out and "75.60" in out and "89.90" in out and "82.87" in out
