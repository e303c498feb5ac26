"""Zero-shot retrieval of any model on a shard split, through the model contract alone (``vlp.models.base``).

1. Every image is encoded once (``encode_image`` on the split's batches, pixels or regions, as the data pipeline
   delivers them) and every caption once (``encode_text``); the cache pads the token axis, so batches with different
   region counts stack.
2. The protocol (``eval.first_stage`` / ``eval.combine``, default: the model's ``retrieval_protocol``) decides the
   ranking: ``contrastive`` ranks by the contrastive embeddings and re-ranks the top ``k_test`` with ITM;
   ``all_pairs`` scores every (image, text) pair with ITM, in chunks of ``eval.batch_size`` pairs, which is what a
   model without a contrastive head (a single-stream model) needs; ``eval.subset`` keeps it affordable.
3. ``combine``: ``itm`` keeps the re-ranked ITM scores per direction (ALBEF/TCL), ``itc`` the contrastive
   similarity alone, ``max`` the element-wise max of the two re-ranked directions (BridgeTower).
"""

from __future__ import annotations

import time

import torch

from vlp.data.visual import Visual
from vlp.eval.results import print_retrieval_table, write_results
from vlp.eval.retrieval import recall_at_k, retrieval_scores
from vlp.models.base import Encoded, RetrievalProtocol, Text

__all__ = ["encode_images", "encode_texts", "resolve_protocol", "evaluate_retrieval", "evaluate_retrieval_run",
           "first_captions", "take_subset"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model, visual_batches, limit: int | None = None) -> Encoded:
    """``encode_image`` of every image, in order: ``visual_batches`` yields collated batch dicts (or ``Visual``s);
    at most ``limit`` images are encoded."""
    device, parts, n = _device(model), [], 0
    for batch in visual_batches:
        visual = batch if isinstance(batch, Visual) else Visual.from_batch(batch)
        if limit is not None and n + visual.batch_size > limit:
            visual = visual.select(torch.arange(limit - n))
        enc = model.encode_image(visual.to(device))
        parts.append(Encoded(enc.states, enc.mask, None if enc.embedding is None else enc.embedding.float()))
        n += visual.batch_size
        if limit is not None and n >= limit:
            break
    if not parts:
        raise ValueError("retrieval: the split yielded no images")
    return Encoded.cat(parts)


@torch.no_grad()
def encode_texts(model, text: Text, batch_size: int = 128) -> Encoded:
    """``encode_text`` of every caption (``text``: all of them, padded to one length), ``batch_size`` at a time."""
    device = _device(model)
    parts = []
    for s in range(0, text.input_ids.shape[0], batch_size):
        enc = model.encode_text(Text(text.input_ids[s: s + batch_size], text.attention_mask[s: s + batch_size])
                                .to(device))
        parts.append(Encoded(enc.states, enc.mask, None if enc.embedding is None else enc.embedding.float()))
    return Encoded.cat(parts)


def resolve_protocol(model, first_stage: str | None = None, combine: str | None = None) -> RetrievalProtocol:
    """The model's ``retrieval_protocol`` with the config's choices applied; a clear error when the model cannot
    follow them (a contrastive stage without a contrastive head)."""
    own = model.retrieval_protocol
    protocol = RetrievalProtocol(first_stage or own.first_stage, combine or own.combine)
    name = type(model).__name__
    if protocol.first_stage == "contrastive" and not model.has_contrastive_head:
        raise ValueError(f"eval.first_stage=contrastive but this {name} has no contrastive head; use "
                         "eval.first_stage=all_pairs (ITM on every pair, with eval.subset to bound the cost)")
    if protocol.first_stage == "all_pairs" and protocol.combine == "itc":
        raise ValueError("eval.combine=itc needs eval.first_stage=contrastive")
    return protocol


def _progress_scorer(score_pairs, enabled: bool):
    """``score_pairs`` counting its pairs on a bar whose total ``retrieval_scores`` announces (so it has an ETA)."""
    if not enabled:
        return score_pairs, None, None
    from tqdm.auto import tqdm

    bar = tqdm(desc="ITM pairs", unit="pair", unit_scale=True, leave=False)

    def scored(i, t):
        out = score_pairs(i, t)
        bar.update(int(i.numel()))
        return out

    return scored, bar, bar.reset


def evaluate_retrieval(model, visual_batches, text: Text, txt2img, img2txt, *, protocol: RetrievalProtocol,
                       k: int = 16, batch_size: int = 128, limit: int | None = None, progress: bool = False) -> dict:
    """R@1/5/10 both ways (percent) by ``protocol`` (see the module docstring). ``limit``: encode only the first
    ``limit`` images (``txt2img``/``img2txt`` must already refer to them alone)."""
    was_training = model.training
    model.eval()
    try:
        images = encode_images(model, visual_batches, limit)
        texts = encode_texts(model, text, batch_size)
        if images.states.shape[0] != len(img2txt) or texts.states.shape[0] != len(txt2img):
            raise ValueError(f"retrieval: {images.states.shape[0]} images and {texts.states.shape[0]} texts encoded, "
                             f"but the ground truth has {len(img2txt)} and {len(txt2img)}")

        @torch.no_grad()
        def score_pairs(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            fused = model.fuse(images.select(img_idx), texts.select(txt_idx))
            return model.match_logits(fused)[:, 1].float()

        n_img, n_txt = len(img2txt), len(txt2img)
        with torch.no_grad():
            if protocol.first_stage == "all_pairs":
                scorer, bar, on_total = _progress_scorer(score_pairs, progress)
                s_i2t, s_t2i = retrieval_scores(sim=torch.zeros(n_img, n_txt, device=images.states.device),
                                                score_pairs=scorer, k=None, chunk=batch_size, on_total=on_total,
                                                combine="max" if protocol.combine == "max" else "separate")
            elif protocol.combine == "itc":
                s_i2t, s_t2i = retrieval_scores(images.embedding, texts.embedding, rerank=False)
                bar = None
            else:
                scorer, bar, on_total = _progress_scorer(score_pairs, progress)
                s_i2t, s_t2i = retrieval_scores(images.embedding, texts.embedding, scorer, k=k, chunk=batch_size,
                                                on_total=on_total,
                                                combine="max" if protocol.combine == "max" else "separate")
            if bar is not None:
                bar.close()
        return recall_at_k(s_i2t, s_t2i, img2txt, txt2img)
    finally:
        model.train(was_training)


def first_captions(texts, txt2img, img2txt):
    """Keep one query per image: its first caption."""
    keep = [caps[0] for caps in img2txt]
    return [texts[t] for t in keep], [txt2img[t] for t in keep], [[i] for i in range(len(img2txt))]


def take_subset(texts, txt2img, img2txt, n: int):
    """The first ``n`` images and their captions (text indices renumbered)."""
    n = min(n, len(img2txt))
    keep = [t for caps in img2txt[:n] for t in caps]
    new_index = {t: j for j, t in enumerate(keep)}
    return ([texts[t] for t in keep], [txt2img[t] for t in keep],
            [[new_index[t] for t in caps] for caps in img2txt[:n]])


def evaluate_retrieval_run(cfg, model, dm, trainer=None, step: int | None = None) -> dict:
    """Evaluate on ``cfg.data.<eval.split>``, write ``<run>/results.json`` and print the table (rank 0)."""
    if trainer is not None and not trainer.is_global_zero:
        return {}
    ev = cfg.eval
    t0 = time.time()
    protocol = resolve_protocol(model, ev.first_stage, ev.combine)
    data = dm.retrieval_data(ev.split)
    visuals, texts, txt2img, img2txt = data
    if data.phrases is not None:  # a text's phrases travel with it through the selections below
        texts = list(zip(texts, data.phrases))
    if ev.captions == "first":
        texts, txt2img, img2txt = first_captions(texts, txt2img, img2txt)
    if ev.subset is not None:
        texts, txt2img, img2txt = take_subset(texts, txt2img, img2txt, ev.subset)
    phrases = None
    if data.phrases is not None:
        texts, phrases = [t for t, _ in texts], [p for _, p in texts]
    enc = dm.encode_texts(texts, phrases)
    metrics = evaluate_retrieval(model, visuals, Text(enc["input_ids"], enc["attention_mask"]), txt2img, img2txt,
                                 protocol=protocol, k=ev.k_test, batch_size=ev.batch_size,
                                 limit=len(img2txt) if ev.subset is not None else None, progress=ev.progress)
    step = step if step is not None else (trainer.global_step if trainer is not None else None)
    keep = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    results = write_results(cfg.run_dir, {"retrieval": {k: metrics[k] for k in keep},
                                          "retrieval_split": ev.split, "retrieval_captions": ev.captions,
                                          "retrieval_protocol": f"{protocol.first_stage}+{protocol.combine}",
                                          "retrieval_images": len(img2txt),
                                          "retrieval_seconds": round(time.time() - t0, 1)},
                            model=cfg.model.name, step=step)
    print_retrieval_table({cfg.name: results})
    return results
