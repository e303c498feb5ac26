"""Image-text matching (ITM): negative sampling, pair layouts and the loss.

Negative sampling (:func:`sample_negatives`) picks, for every text, a negative image and, for every image, a
negative text:

* ``"local-hard"`` (ALBEF/TCL): from this rank's batch, with probability ``softmax(sim[i])`` restricted to the
  valid candidates (``torch.multinomial``);
* ``"global-hard"`` (BridgeTower's ``gather_global_negative``): the same over the batch gathered from all ranks;
  the returned indices point into the gathered batch;
* ``"random"``: uniform over the valid candidates of this rank's batch;
* :func:`hardest_negatives` (MVPTR): the most similar valid candidate (argmax, no draw), and a random half of the
  batch pairs a text with its hardest image, the other half an image with its hardest text.

A candidate is valid unless it is the row's own positive or shares the row's image id (a second caption of the
same image is never a negative). A row whose weights are unusable (NaN/inf similarities, or every valid weight
underflowing to 0) falls back to uniform over its valid candidates (TCL's ``try/except`` fallback, vectorised);
a row with no valid candidate at all raises.

The loss is cross-entropy over the 2-way ITM logits; :func:`itm_triplets` builds ALBEF/TCL's 3-block layout and
:func:`swap_images_for_itm` BridgeTower's half-swapped batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.utils import distributed as vdist

__all__ = ["sample_negatives", "itm_loss", "itm_triplets", "swap_images_for_itm", "valid_negative_mask",
           "hardest_negatives"]

Mode = Literal["random", "local-hard", "global-hard"]


def valid_negative_mask(
    batch_size: int,
    n_candidates: int,
    offset: int = 0,
    row_ids: Tensor | None = None,
    candidate_ids: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Bool [B, K]: True where candidate k may serve as a negative for row i.

    Row i's positive is candidate ``offset + i`` (offset = rank * B for a gathered batch). With ids, every
    candidate whose id equals the row's id is excluded as well (the positive included, so the diagonal rule is
    then implied; it is kept for rows whose ids are absent).
    """
    rows = torch.arange(batch_size, device=device)
    valid = torch.ones(batch_size, n_candidates, dtype=torch.bool, device=device)
    valid[rows, rows + offset] = False
    if row_ids is not None:
        cand = candidate_ids if candidate_ids is not None else row_ids
        valid &= row_ids.reshape(-1, 1).to(device) != cand.reshape(1, -1).to(device)
    return valid


def _draw(sim: Tensor | None, valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """One multinomial draw per row from softmax(sim) over valid entries (uniform when ``sim`` is None)."""
    uniform = valid.float()
    if sim is None:
        weights = uniform
    else:
        # Softmax over the valid entries only: the same distribution as ALBEF's softmax-then-zero (multinomial
        # renormalises), but a dominant positive can no longer underflow every negative to 0.
        weights = F.softmax(sim.detach().float().masked_fill(~valid, float("-inf")), dim=1)
        bad = ~torch.isfinite(weights).all(dim=1) | ~(weights.sum(dim=1) > 0)
        weights = torch.where(bad.unsqueeze(1), uniform, weights)
    if generator is not None and generator.device != weights.device:
        return torch.multinomial(weights.to(generator.device), 1, generator=generator).squeeze(1).to(valid.device)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def sample_negatives(
    sim_i2t: Tensor | None,
    sim_t2i: Tensor | None,
    mode: Mode = "local-hard",
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one negative image per text and one negative text per image.

    Args:
        sim_i2t: [B, K] similarity of this rank's image i (row) to candidate text k (column); for ALBEF/TCL the
            online ITC logits ``logits_i2t[:, :B]`` (temperature included: it sets the sharpness).
        sim_t2i: [B, K] similarity of this rank's text i to candidate image k.
            Local modes: K = B, the positive of row i is column i. ``"global-hard"``: K = W * B (local rows vs
            the gathered batch), the positive of row i is column ``rank * B + i``. In ``"random"`` mode the
            similarities are ignored and may be None (the batch size then comes from ``image_ids``).
        mode: ``"local-hard"``, ``"global-hard"`` or ``"random"``.
        image_ids: [B] image id of each pair of this rank; candidates sharing the row's id are never sampled.
            Gathered internally in ``"global-hard"`` mode.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(neg_image_for_text, neg_text_for_image)``, both long [B]: column indices into the candidates (global
        indices in ``"global-hard"`` mode, to index the gathered embeddings).

    Raises:
        ValueError if some row has no valid candidate (e.g. B = 1, or every pair shows the same image).
    """
    if mode not in ("random", "local-hard", "global-hard"):
        raise ValueError(f"mode must be 'random', 'local-hard' or 'global-hard', got {mode!r}")
    if mode != "random" and (sim_i2t is None or sim_t2i is None):
        raise ValueError(f"mode {mode!r} needs sim_i2t and sim_t2i")
    ref = sim_i2t if sim_i2t is not None else sim_t2i if sim_t2i is not None else image_ids
    if ref is None:
        raise ValueError("random mode without similarities needs image_ids (for the batch size)")
    b = ref.shape[0]
    device = ref.device

    offset, cand_ids, k = 0, image_ids, b
    if mode == "global-hard":
        offset = vdist.rank() * b
        k = vdist.world_size() * b
        if image_ids is not None:
            cand_ids = vdist.gather_no_grad(image_ids)
    for name, sim in (("sim_i2t", sim_i2t), ("sim_t2i", sim_t2i)):
        if sim is not None and mode != "random" and tuple(sim.shape) != (b, k):
            raise ValueError(f"{name} must be [{b}, {k}] in mode {mode!r}, got {tuple(sim.shape)}")
    if mode == "random" and sim_i2t is not None:
        k = sim_i2t.shape[1]

    # The validity rule is symmetric: text k belongs to pair k's image, so for either direction the candidate
    # is excluded when pair k shows the same image as pair i.
    valid = valid_negative_mask(b, k, offset, image_ids, cand_ids, device=device)
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"sample_negatives: rows {rows} have no valid negative (every candidate is the positive "
                         f"or shares its image id); batch size {b}, {k} candidates")

    hard = mode != "random"
    neg_image_for_text = _draw(sim_t2i if hard else None, valid, generator)
    neg_text_for_image = _draw(sim_i2t if hard else None, valid, generator)
    return neg_image_for_text, neg_text_for_image


def itm_triplets(
    neg_image_for_text: Tensor, neg_text_for_image: Tensor, offset: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """ALBEF/TCL's 3-block ITM layout as index vectors.

    Pairs, in order: B positives (text i, image i); B (text i, negative image of text i); B (negative text of
    image i, image i). Returns ``(image_index, text_index, labels)``, each long [3B], labels ``[1]*B + [0]*2B``.
    Index the image/text embeddings and the text mask with them. ``offset`` places the positives when the
    negatives index a gathered batch (positives at ``offset + i``, offset = rank * B).
    """
    b = neg_image_for_text.shape[0]
    device = neg_image_for_text.device
    pos = torch.arange(b, device=device) + offset
    image_index = torch.cat([pos, neg_image_for_text, pos])
    text_index = torch.cat([pos, pos, neg_text_for_image])
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=device),
                        torch.zeros(2 * b, dtype=torch.long, device=device)])
    return image_index, text_index, labels


def swap_images_for_itm(
    batch_size: int,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """BridgeTower-style ITM batch: keep the image for half the pairs, swap it for the other half.

    ``B // 2`` pairs (at random positions) keep their image (label 1); the others get a uniformly random other
    image of the batch that does not share their image id (label 0). BridgeTower draws the false image from the
    whole dataset instead; an in-batch draw needs no extra image decoding and can respect image ids.

    Returns ``(image_index, labels)``, long [B]: pair i uses image ``image_index[i]`` with its own text.
    """
    if image_ids is not None:
        device = image_ids.device
    gen_device = generator.device if generator is not None else device
    n_pos = batch_size // 2
    labels = torch.cat([torch.ones(n_pos, dtype=torch.long), torch.zeros(batch_size - n_pos, dtype=torch.long)])
    labels = labels[torch.randperm(batch_size, generator=generator, device=gen_device).cpu()].to(device)
    if batch_size - n_pos == 0:
        return torch.arange(batch_size, device=device), labels
    negatives, _ = sample_negatives(None, None, "random",
                                    image_ids if image_ids is not None
                                    else torch.arange(batch_size, device=device), generator)
    own = torch.arange(batch_size, device=device)
    return torch.where(labels.bool(), own, negatives), labels


def hardest_negatives(sim_t2i: Tensor, order: Tensor, image_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MVPTR's in-batch hard negatives (``encode_hn``, ``hn_mod='hard'``), one per positive pair.

    ``sim_t2i`` [B, B]: text x image similarities. The hardest image of text i is the argmax of row i over the valid
    candidates, the hardest text of image j the argmax of column j (the official ``S - 2I`` argmax, which also never
    picks the pair itself; here an image sharing the row's image id is passed over too, unless nothing else is
    left). ``order`` [B] is a permutation (official ``dice_index = randperm(B)``): its first ``B // 2`` entries i
    give the pairs (text i, hardest image of i), the rest j the pairs (hardest text of j, image j), so odd batches
    get one more image-anchored pair. Returns ``(text_index, image_index)``, long [B], of the negative pairs in
    that order."""
    b = sim_t2i.shape[0]
    if sim_t2i.shape != (b, b) or order.shape != (b,):
        raise ValueError(f"hardest_negatives: expected sim [B, B] and order [B], got {tuple(sim_t2i.shape)}, "
                         f"{tuple(order.shape)}")
    sim = sim_t2i.detach().float()
    valid = valid_negative_mask(b, b, 0, image_ids, image_ids, device=sim.device)
    fallback = sim - 2.0 * torch.eye(b, device=sim.device)
    masked = sim.masked_fill(~valid, float("-inf"))
    hard_image = torch.where(valid.any(1), masked.argmax(1), fallback.argmax(1))
    hard_text = torch.where(valid.any(0), masked.argmax(0), fallback.argmax(0))
    order = order.to(sim.device)
    first, rest = order[: b // 2], order[b // 2:]
    return torch.cat([first, hard_text[rest]]), torch.cat([hard_image[first], rest])


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ITM logits [N, 2] (or [N, C]) against labels [N] (1 = matched pair), mean over pairs."""
    return F.cross_entropy(logits.float(), labels)
