"""Zero-shot retrieval of a model on a shard split: embed once, rank, re-rank with the matching head, report R@K.

The model side is the interface every pre-training module exposes (DESIGN §5): ``embed_images(images) -> (emb,
states)``, ``embed_texts(ids, mask) -> (emb, states)`` and ``match_states(image_states, text_states, mask)``.
"""

from __future__ import annotations

import time

import torch

from vlp.eval.results import print_retrieval_table, write_results
from vlp.eval.retrieval import recall_at_k, retrieval_scores


@torch.no_grad()
def embed_split(model, images, texts: list[str], tokenizer, max_len: int, batch_size: int = 128):
    """Embeddings and states of every image and text (images: a tensor [N, 3, H, W] or an iterable of batches)."""
    device = next(model.parameters()).device
    img_emb, img_states = [], []
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    for batch in batches:
        e, s = model.embed_images(batch.to(device))
        img_emb.append(e.float())
        img_states.append(s)
    txt_emb, txt_states, txt_masks = [], [], []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i: i + batch_size], padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        e, s = model.embed_texts(ids, mask)
        txt_emb.append(e.float())
        txt_states.append(s)
        txt_masks.append(mask)
    return (torch.cat(img_emb), torch.cat(img_states), torch.cat(txt_emb), torch.cat(txt_states),
            torch.cat(txt_masks))


def evaluate_retrieval(model, images, texts, txt2img, img2txt, tokenizer, *, max_len: int = 32, k: int = 16,
                       rerank: bool = True, batch_size: int = 128) -> dict:
    """R@1/5/10 both ways (percent), ITC ranking re-ranked in its top-k by the ITM head's positive logit."""
    was_training = model.training
    model.eval()
    try:
        img_emb, img_states, txt_emb, txt_states, txt_masks = embed_split(model, images, texts, tokenizer,
                                                                          max_len, batch_size)

        @torch.no_grad()
        def score_pairs(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
            logits = model.match_states(img_states[img_idx], txt_states[txt_idx], txt_masks[txt_idx])
            return logits[:, 1].float()

        with torch.no_grad():
            s_i2t, s_t2i = retrieval_scores(img_emb, txt_emb, score_pairs if rerank else None,
                                            k=k, rerank=rerank, chunk=batch_size)
        return recall_at_k(s_i2t, s_t2i, img2txt, txt2img)
    finally:
        model.train(was_training)


def first_captions(texts, txt2img, img2txt):
    """Keep one query per image: its first caption."""
    keep = [caps[0] for caps in img2txt]
    return [texts[t] for t in keep], [txt2img[t] for t in keep], [[i] for i in range(len(img2txt))]


def evaluate_retrieval_run(cfg, model, dm, trainer=None, step: int | None = None) -> dict:
    """Evaluate on ``cfg.data.<eval.split>``, write ``<run>/results.json`` and print the table (rank 0)."""
    if trainer is not None and not trainer.is_global_zero:
        return {}
    ev = cfg.eval
    t0 = time.time()
    images, texts, txt2img, img2txt = dm.retrieval_data(ev.split)
    if ev.captions == "first":
        texts, txt2img, img2txt = first_captions(texts, txt2img, img2txt)
    metrics = evaluate_retrieval(
        model, images, texts, txt2img, img2txt, dm.tokenizer, max_len=cfg.data.max_text_len,
        k=ev.k_test, rerank=ev.rerank, batch_size=ev.batch_size,
    )
    step = step if step is not None else (trainer.global_step if trainer is not None else None)
    keep = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    results = write_results(cfg.run_dir, {"retrieval": {k: metrics[k] for k in keep},
                                          "retrieval_split": ev.split, "retrieval_captions": ev.captions,
                                          "retrieval_seconds": round(time.time() - t0, 1)},
                            model=cfg.model.name, step=step)
    print_retrieval_table({cfg.name: results})
    return results
