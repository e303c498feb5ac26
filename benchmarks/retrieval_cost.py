"""Retrieval evaluation cost against the number of images: contrastive top-k re-ranking against ITM on all pairs.

Both protocols run through ``vlp.eval.run.evaluate_retrieval`` (the code every ``vlp evaluate`` runs) on a
synthetic gallery of N images with one caption each, N in ``--sizes`` (250, 500, 1000, 2000). The ITM scorer is
called on ~N k .. 2 N k pairs by top-k re-ranking (the i2t and t2i candidates, each pair scored once) and on N^2
by all pairs; the JSON records the seconds and the pairs scored of each, and the plot shows both against N.

The model, :class:`AgreeingMatcher`, is contract-shaped (``encode_image`` / ``encode_text`` / ``fuse`` /
``match_logits``) and small: its images and captions are noisy token sets around one latent vector per image, its
contrastive embedding is the normalised mean token, and ``fuse`` runs one real cross-attention layer per pair (the
cost being timed). Its ITM logit is the pair's embedding dot product plus ``mix`` times the fused output, and with
``mix = 0`` (the default) the matching score agrees with the contrastive ranking exactly. Then re-ranking the top
k must give the R@K of scoring all pairs for every K <= k: the run checks that equality (``equal_r_at_k``) and
exits 1 when it fails. With ``mix != 0`` the two differ by what the first stage dropped.

    python benchmarks/retrieval_cost.py [--sizes 250 500 1000 2000] [--k 16] [--mix 0] [--out PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

from _common import RESULTS, machine, write_json

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vlp.data.visual import Visual  # noqa: E402
from vlp.eval.run import evaluate_retrieval  # noqa: E402
from vlp.models.base import Encoded, Fused, RetrievalProtocol, Text  # noqa: E402

KS = (1, 5, 10)
PROTOCOLS = {"top_k": RetrievalProtocol("contrastive", "itm"), "all_pairs": RetrievalProtocol("all_pairs", "itm")}


class AgreeingMatcher(nn.Module):
    """A retrieval model over a fixed synthetic gallery (module docstring). ``caption_tokens`` [N_txt, L, D] are
    looked up by id: caption t is the ids ``t * L .. t * L + L - 1``."""

    has_contrastive_head = True

    def __init__(self, caption_tokens: torch.Tensor, heads: int = 4, mix: float = 0.0):
        super().__init__()
        n, length, dim = caption_tokens.shape
        self.register_buffer("token_table", caption_tokens.reshape(n * length, dim))
        self.fusion = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
        self.mix = mix
        self.pairs_scored = 0

    @staticmethod
    def _embed(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(states.dtype)
        return F.normalize((states * m).sum(1) / m.sum(1), dim=-1)

    def encode_image(self, visual: Visual) -> Encoded:
        return Encoded(visual.features, visual.mask, self._embed(visual.features, visual.mask))

    def encode_text(self, text: Text) -> Encoded:
        states = self.token_table[text.input_ids]
        return Encoded(states, text.attention_mask.bool(), self._embed(states, text.attention_mask))

    def fuse(self, image: Encoded, text: Encoded) -> Fused:
        self.pairs_scored += text.states.shape[0]
        states = self.fusion(text.states, image.states, tgt_key_padding_mask=~text.mask,
                             memory_key_padding_mask=~image.mask)
        return Fused(states, torch.cat([image.embedding, text.embedding, states[:, 0]], dim=-1))

    def match_logits(self, fused: Fused) -> torch.Tensor:
        e_img, e_txt, joint = fused.pooled.chunk(3, dim=-1)
        score = (e_img * e_txt).sum(-1) + self.mix * joint.sum(-1)  # mix = 0: exactly the contrastive similarity
        return torch.stack([-score, score], dim=-1)


def gallery(n: int, dim: int = 32, tokens: int = 4, noise: float = 3.0, seed: int = 0):
    """(image Visual, caption Text, caption token table [N, L, D]): image i's tokens and caption i's tokens are
    ``z_i + noise``, ``z_i`` one standard normal latent per image (captions ``noise`` times noisier)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, dim, generator=g)
    images = z + torch.randn(n, tokens, dim, generator=g)
    captions = z + noise * torch.randn(n, tokens, dim, generator=g)
    visual = Visual(features=images, mask=torch.ones(n, tokens, dtype=torch.bool))
    ids = torch.arange(n * tokens).reshape(n, tokens)
    return visual, Text(ids, torch.ones(n, tokens, dtype=torch.long)), captions


def measure(n: int, k: int = 16, mix: float = 0.0, chunk: int = 1024, dim: int = 32, tokens: int = 4,
            seed: int = 0) -> dict:
    """Seconds, ITM pairs and R@K of both protocols on a gallery of ``n`` images, and whether R@K agree for the
    K <= k of :data:`KS`."""
    visual, text, captions = gallery(n, dim, tokens, seed=seed)
    torch.manual_seed(seed)
    model = AgreeingMatcher(captions, mix=mix).eval()
    txt2img, img2txt = list(range(n)), [[i] for i in range(n)]
    batches = [visual.select(torch.arange(s, min(n, s + 256))) for s in range(0, n, 256)]
    row: dict = {"images": n, "texts": n}
    for name, protocol in PROTOCOLS.items():
        model.pairs_scored = 0
        t0 = time.perf_counter()
        recall = evaluate_retrieval(model, batches, text, txt2img, img2txt, protocol=protocol, k=k,
                                    batch_size=chunk)
        row[name] = {"seconds": round(time.perf_counter() - t0, 3), "itm_pairs": model.pairs_scored,
                     "recall": {key: round(v, 3) for key, v in recall.items() if key[-1].isdigit()}}
    covered = [f"{d}_r{K}" for K in KS if K <= k for d in ("txt", "img")]
    row["equal_r_at_k"] = all(row["top_k"]["recall"][key] == row["all_pairs"]["recall"][key] for key in covered)
    row["all_pairs_over_top_k_s"] = round(row["all_pairs"]["seconds"] / max(row["top_k"]["seconds"], 1e-9), 2)
    return row


def plot(rows: list[dict], k: int, path: Path) -> None:
    """Seconds against N for both protocols (log-log), with the pairs each scored; PNG written atomically."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlp.utils.io import atomic_write_bytes

    ns = [r["images"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for name, label in (("top_k", f"contrastive top-{k} -> ITM"), ("all_pairs", "ITM on all pairs")):
        ax.plot(ns, [r[name]["seconds"] for r in rows], marker="o", label=label)
        for n, r in zip(ns, rows):
            ax.annotate(f"{r[name]['itm_pairs'] / 1e3:.0f}k", (n, r[name]["seconds"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="images N (one caption each)", ylabel="evaluation seconds",
           title="Retrieval evaluation cost (labels: ITM pairs scored)")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[250, 500, 1000, 2000])
    p.add_argument("--k", type=int, default=16, help="candidates re-ranked per query (eval.k_test)")
    p.add_argument("--mix", type=float, default=0.0, help="weight of the fused output in the ITM score (module doc)")
    p.add_argument("--chunk", type=int, default=1024, help="pairs per ITM call (eval.batch_size)")
    p.add_argument("--out", type=Path, default=RESULTS / "retrieval_cost.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "retrieval_cost.png")
    args = p.parse_args(argv)
    if min(args.sizes) < 2 or args.k < 1:
        p.error(f"--sizes must be >= 2 and --k >= 1, got {args.sizes} and {args.k}")
    info = machine("cpu")
    rows = []
    for n in sorted(args.sizes):
        rows.append(measure(n, args.k, args.mix, args.chunk))
        r = rows[-1]
        print(f"N={n:5d}  top-{args.k}: {r['top_k']['seconds']:8.2f} s {r['top_k']['itm_pairs']:9d} pairs   "
              f"all pairs: {r['all_pairs']['seconds']:8.2f} s {r['all_pairs']['itm_pairs']:9d} pairs   "
              f"IR@1 {r['top_k']['recall']['img_r1']:.1f} / {r['all_pairs']['recall']['img_r1']:.1f}   "
              f"equal R@K (K <= k): {r['equal_r_at_k']}", flush=True)
    write_json(args.out, {"machine": info, "settings": {"k": args.k, "mix": args.mix, "chunk": args.chunk, "ks": KS,
                                                        "threads": torch.get_num_threads(),
                                                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                          "rows": rows})
    plot(rows, args.k, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0 if args.mix != 0 or all(r["equal_r_at_k"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
