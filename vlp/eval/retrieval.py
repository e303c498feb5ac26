"""Image-text retrieval evaluation: contrastive ranking, matching-head re-ranking, Recall@K.

The protocol of ALBEF/TCL (``Retrieval.py::evaluation``) and BridgeTower (``irtr_itm_itc``):

1. every image and every caption is embedded once (by the caller) and ranked by the contrastive similarity
   ``sim = img_emb @ txt_emb.T`` ([N_img, N_txt]);
2. the top-k candidates of each row (image -> text) and of each column (text -> image) are re-scored with a matching
   scorer, typically the ITM head's positive logit; every other entry is set to ``fill_value`` (-100, as in the
   official code), so a positive outside the top-k can never be recovered by re-ranking;
3. ALBEF/TCL keep the two re-ranked matrices separate (``combine="separate"``); BridgeTower takes their element-wise
   maximum and computes both directions from that one matrix (``combine="max"``).

Under ``torch.distributed`` the rows (images for i2t, texts for t2i) are split across ranks and the partial matrices
are summed with ``all_reduce(SUM)``. Every rank must hold the full embeddings and a scorer that accepts global
indices; ranks must call :func:`retrieval_scores` collectively.

:func:`recall_at_k` then reports R@K in percent, like the official code: an image counts as a hit when ANY of its
captions is in its top K; a caption when its image is in its top K.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch

__all__ = ["ScorePairs", "recall_at_k", "retrieval_ranks", "retrieval_scores"]

ScorePairs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_pairs(image_idx LongTensor[M], text_idx LongTensor[M]) -> Tensor[M]``: one matching score per pair
(higher = better match), e.g. ``itm_logits[:, 1]``. Indices are global (into the full image / text sets)."""

_ELEMS_PER_BLOCK = 1 << 24  # ~16M scores per block in the rank computation (64 MB of fp32)


# ----------------------------------------------------------------------------------------------- distributed ---
def _dist_env(group=None) -> tuple[int, int, bool]:
    """(rank, world_size, initialised); (0, 1, False) when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group), True
    return 0, 1, False


def _all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    return tensor


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice [start, end) of ``n`` rows owned by ``rank`` (ceil split; trailing ranks may get none)."""
    step = math.ceil(n / world)
    start = min(n, rank * step)
    return start, min(n, start + step)


# ---------------------------------------------------------------------------------------------------- scores ---
def _score_in_chunks(score_pairs: ScorePairs, img_idx: torch.Tensor, txt_idx: torch.Tensor, chunk: int,
                     device: torch.device) -> torch.Tensor:
    out = torch.empty(img_idx.numel(), dtype=torch.float32, device=device)
    for s in range(0, img_idx.numel(), chunk):
        i, t = img_idx[s:s + chunk], txt_idx[s:s + chunk]
        scores = score_pairs(i, t)
        if not isinstance(scores, torch.Tensor):
            scores = torch.as_tensor(scores)
        if scores.shape != (i.numel(),):
            raise ValueError(
                f"score_pairs must return one score per pair, shape ({i.numel()},); got {tuple(scores.shape)} "
                "(for ITM logits [M, 2] pass logits[:, 1])")
        out[s:s + i.numel()] = scores.detach().to(device=device, dtype=torch.float32)
    return out


@torch.no_grad()
def retrieval_scores(
    img_emb: torch.Tensor | None = None,
    txt_emb: torch.Tensor | None = None,
    score_pairs: ScorePairs | None = None,
    *,
    k: int | None = 128,
    rerank: bool | None = None,
    combine: Literal["separate", "max"] = "separate",
    chunk: int = 256,
    add_itc: bool = False,
    fill_value: float = -100.0,
    dedup: bool = True,
    sim: torch.Tensor | None = None,
    group=None,
    on_total: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices for retrieval: ``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])``.

    Args:
        img_emb, txt_emb: [N_img, D], [N_txt, D] contrastive embeddings (normalise them yourself if the model does);
            the first stage is ``sim = img_emb @ txt_emb.T`` in fp32. Alternatively pass ``sim`` directly (another
            first stage, or ``torch.zeros(N_img, N_txt)`` with ``k=None`` to score all pairs for single-stream
            models without a contrastive head).
        score_pairs: matching scorer, see :data:`ScorePairs`. Called with at most ``chunk`` pairs at a time; with
            ``dedup`` the pairs come sorted by image then text index (consecutive calls mostly share images),
            without it as i2t candidates (by image) then t2i candidates (by text).
        k: candidates re-ranked per query (``k_test``: 256 COCO, 128 Flickr); clamped to the number of candidates;
            ``None`` = all of them.
        rerank: re-rank with ``score_pairs``; default: iff ``score_pairs`` is given. ``rerank=True`` without a
            scorer is an error. Without re-ranking both outputs are the contrastive similarity.
        combine: ``"separate"`` (ALBEF/TCL) or ``"max"`` (BridgeTower: ``S = max(i2t, t2i.T)``, returns
            ``(S, S.T)``).
        chunk: maximum pairs per scorer call (bounds the fusion encoder's memory).
        add_itc: add the contrastive similarity to the re-ranked scores (BLIP's variant) instead of the raw
            matching score (ALBEF/TCL/BridgeTower, the default).
        fill_value: score of every entry outside the top-k (-100 in the official code). A re-ranked score at or
            below it would tie with non-candidates: a warning says so.
        dedup: score each (image, text) pair once even when it is a candidate in both directions (saves up to half
            the scorer calls; the official code scores it twice with the same result).
        group: process group for the row split and ``all_reduce``.
        on_total: called once, before scoring, with the number of pairs this rank will pass to ``score_pairs``
            (a progress bar's total).

    Returns:
        ``score_i2t`` [N_img, N_txt] (rank texts for each image along dim 1) and ``score_t2i`` [N_txt, N_img],
        fp32 on the embeddings' device, identical on every rank.
    """
    if combine not in ("separate", "max"):
        raise ValueError(f"combine must be 'separate' or 'max', got {combine!r}")
    if sim is None:
        if img_emb is None or txt_emb is None:
            raise ValueError("pass img_emb and txt_emb, or sim")
        if img_emb.ndim != 2 or txt_emb.ndim != 2 or img_emb.shape[1] != txt_emb.shape[1]:
            raise ValueError(f"embeddings must be [N_img, D] and [N_txt, D]; got {tuple(img_emb.shape)} and "
                             f"{tuple(txt_emb.shape)}")
        sim = img_emb.float() @ txt_emb.float().T
    else:
        if img_emb is not None or txt_emb is not None:
            raise ValueError("pass either embeddings or sim, not both")
        if sim.ndim != 2:
            raise ValueError(f"sim must be [N_img, N_txt], got {tuple(sim.shape)}")
        sim = sim.float()
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"nothing to rank: {n_img} images x {n_txt} texts")
    if rerank is None:
        rerank = score_pairs is not None
    if rerank and score_pairs is None:
        raise ValueError("rerank=True needs score_pairs (the matching scorer)")
    if not rerank:
        return sim, sim.T
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    k_i2t = n_txt if k is None else min(k, n_txt)
    k_t2i = n_img if k is None else min(k, n_img)
    dev = sim.device

    rank, world, distributed = _dist_env(group)
    i0, i1 = _shard(n_img, rank, world)  # images whose i2t rows this rank fills
    t0, t1 = _shard(n_txt, rank, world)  # texts whose t2i rows this rank fills

    # Candidates: top-k of each owned row (i2t) and of each owned column (t2i), as (image, text) pairs.
    top_t = sim[i0:i1].topk(k_i2t, dim=1).indices  # [n_i, k_i2t] text ids
    i2t_img = torch.arange(i0, i1, device=dev).repeat_interleave(k_i2t)
    i2t_txt = top_t.reshape(-1)
    top_i = sim.T[t0:t1].topk(k_t2i, dim=1).indices  # [n_t, k_t2i] image ids
    t2i_txt = torch.arange(t0, t1, device=dev).repeat_interleave(k_t2i)
    t2i_img = top_i.reshape(-1)

    if dedup:
        keys = torch.cat([i2t_img * n_txt + i2t_txt, t2i_img * n_txt + t2i_txt])
        uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        if on_total is not None:
            on_total(uniq.numel())
        s = _score_in_chunks(score_pairs, uniq // n_txt, uniq % n_txt, chunk, dev)[inverse]
    else:
        if on_total is not None:
            on_total(i2t_img.numel() + t2i_img.numel())
        s = torch.cat([_score_in_chunks(score_pairs, i2t_img, i2t_txt, chunk, dev),
                       _score_in_chunks(score_pairs, t2i_img, t2i_txt, chunk, dev)])
    if s.numel() and bool((s <= fill_value).any()):
        warnings.warn(f"some re-ranked scores are <= fill_value={fill_value}: they tie with or rank below entries "
                      "outside the top-k; lower fill_value", stacklevel=2)
    s_i2t, s_t2i = s[: i2t_img.numel()], s[i2t_img.numel():]
    if add_itc:
        s_i2t = s_i2t + sim[i2t_img, i2t_txt]
        s_t2i = s_t2i + sim[t2i_img, t2i_txt]

    # Each rank fills only its own rows (zeros elsewhere), so the SUM over ranks is exact.
    score_i2t = torch.zeros(n_img, n_txt, device=dev)
    score_i2t[i0:i1] = fill_value
    score_i2t[i2t_img, i2t_txt] = s_i2t
    score_t2i = torch.zeros(n_txt, n_img, device=dev)
    score_t2i[t0:t1] = fill_value
    score_t2i[t2i_txt, t2i_img] = s_t2i
    if distributed:
        _all_reduce_sum(score_i2t, group)
        _all_reduce_sum(score_t2i, group)

    if combine == "max":
        score_i2t = torch.maximum(score_i2t, score_t2i.T)
        return score_i2t, score_i2t.T
    return score_i2t, score_t2i


# ---------------------------------------------------------------------------------------------------- recall ---
def _as_scores(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN")
    return x


def _block_rows(n_cols: int) -> int:
    return max(1, _ELEMS_PER_BLOCK // max(1, n_cols))


def retrieval_ranks(
    score_i2t, score_t2i, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the best positive for every query: ``(rank_i2t [N_img], rank_t2i [N_txt])``.

    ``rank_i2t[i]`` is the position of image i's best-scored caption in its text ranking; ``rank_t2i[t]`` that of
    caption t's image. Ties are broken pessimistically (a negative scored equal to the positive ranks above it), so
    constant scores give rank >= 1, not a spurious hit, and a positive left at ``fill_value`` outside the top-k
    ranks after every re-ranked candidate.
    """
    si = _as_scores(score_i2t, "score_i2t")
    st = _as_scores(score_t2i, "score_t2i")
    n_img, n_txt = si.shape
    if st.shape != (n_txt, n_img):
        raise ValueError(f"score_t2i must be [N_txt, N_img] = {(n_txt, n_img)}, got {tuple(st.shape)}")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"img2txt must have {n_img} entries and txt2img {n_txt}; got {len(img2txt)} and "
                         f"{len(txt2img)}")
    dev = si.device

    # image -> text: positives as a flattened (row, col) list, rows in order, so each block is a contiguous slice.
    lens = torch.tensor([len(p) for p in img2txt], dtype=torch.long)
    if bool((lens == 0).any()):
        raise ValueError(f"image {int((lens == 0).nonzero()[0])} has no caption in img2txt")
    cols = torch.tensor([int(j) for p in img2txt for j in p], dtype=torch.long)
    if bool(((cols < 0) | (cols >= n_txt)).any()):
        raise ValueError(f"img2txt holds caption ids outside [0, {n_txt})")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).tolist()
    rows = torch.arange(n_img).repeat_interleave(lens)
    rows, cols = rows.to(dev), cols.to(dev)
    rank_i2t = torch.empty(n_img, dtype=torch.long, device=dev)
    step = _block_rows(n_txt)
    for r0 in range(0, n_img, step):
        r1 = min(n_img, r0 + step)
        s = si[r0:r1]
        pos = torch.zeros_like(s, dtype=torch.bool)
        pos[rows[offsets[r0]:offsets[r1]] - r0, cols[offsets[r0]:offsets[r1]]] = True
        best = s.masked_fill(~pos, -math.inf).amax(dim=1, keepdim=True)
        rank_i2t[r0:r1] = ((s >= best) & ~pos).sum(dim=1)

    # text -> image: one positive per caption.
    gt = torch.as_tensor(list(txt2img), dtype=torch.long)
    if bool(((gt < 0) | (gt >= n_img)).any()):
        raise ValueError(f"txt2img holds image ids outside [0, {n_img})")
    gt = gt.to(dev)
    rank_t2i = torch.empty(n_txt, dtype=torch.long, device=dev)
    step = _block_rows(n_img)
    for r0 in range(0, n_txt, step):
        r1 = min(n_txt, r0 + step)
        s = st[r0:r1]
        p = s.gather(1, gt[r0:r1, None])
        rank_t2i[r0:r1] = (s >= p).sum(dim=1) - 1
    return rank_i2t, rank_t2i


def recall_at_k(
    score_i2t,
    score_t2i,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent, the official ALBEF/TCL/BridgeTower way.

    Keys: ``txt_r{K}`` (text retrieval, image -> text: hit if any of the image's captions is in its top K),
    ``img_r{K}`` (image retrieval, text -> image), ``txt_r_mean`` / ``img_r_mean`` (mean over ``ks``),
    ``r_mean`` (their mean) and ``rsum`` (sum of all, BridgeTower's RSUM).
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    rank_i2t, rank_t2i = retrieval_ranks(score_i2t, score_t2i, img2txt, txt2img)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (rank_i2t < k).double().mean().item()
    for k in ks:
        out[f"img_r{k}"] = 100.0 * (rank_t2i < k).double().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["rsum"] = sum(out[f"txt_r{k}"] + out[f"img_r{k}"] for k in ks)
    return out
