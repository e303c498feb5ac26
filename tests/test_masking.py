"""The one MLM masker (vlp.data.masking): each paper's rule on a hand example with hand-set draws (expected outputs
worked out by hand from the rule in the module docstring), whole-word masking, UNITER's at-least-one, the seeded and
the generator paths, and the 80/10/10 statistics on a large batch."""

from __future__ import annotations

import pytest
import torch

from vlp.data.masking import Masker, MaskDraws, MaskingConfig, hashed_uniforms

# A vocabulary of 10: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, words 5..9.
PAD, UNK, CLS, SEP, MASK, V = 0, 1, 2, 3, 4, 10
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
TCL = MaskingConfig(protect="pad_cls", random_tokens="vocab")
BRIDGETOWER = MaskingConfig(protect="special", random_tokens="vocab")
UNITER = MaskingConfig(protect="special", random_tokens="range", random_range=[5, 10], min_masked=1)
_ = -100  # not a target


def masker(cfg: MaskingConfig) -> Masker:
    return Masker(cfg, vocab_size=V, mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS, special_ids=SPECIAL)


def draws(select, action=None, replace=None, single=None) -> MaskDraws:
    def t(x):
        return torch.tensor([x if x is not None else [0.99] * len(select)], dtype=torch.float64)

    return MaskDraws(t(select), t(action), t(replace), t(single))


def run(cfg, ids, d, attention=None, word_ids=None):
    ids = torch.tensor([ids])
    m = masker(cfg)
    attention = torch.tensor([attention]) if attention is not None else (ids != PAD).long()
    out, labels = m.apply(ids, d, m.maskable(ids, attention),
                          torch.tensor([word_ids]) if word_ids is not None else None)
    return out[0].tolist(), labels[0].tolist()


# [CLS] w5 [UNK] w7 [SEP] [PAD]; probability 0.15. Draws: CLS 0.01 and UNK 0.0 and SEP 0.02 would be selected if
# maskable, w5 0.10 and w7 0.05 are selected, PAD 0.0 never (padding). Actions: w5 0.5 -> [MASK]; UNK 0.7 -> [MASK];
# w7 0.85 -> random; SEP 0.95 -> kept. The random id of w7: floor(0.25 x |pool|).
IDS = [CLS, 5, UNK, 7, SEP, PAD]
D = draws(select=[0.01, 0.10, 0.0, 0.05, 0.02, 0.0], action=[0.0, 0.5, 0.7, 0.85, 0.95, 0.0],
          replace=[0.0, 0.0, 0.0, 0.25, 0.0, 0.0])


def test_tcl_rule_masks_sep_and_draws_random_ids_from_the_whole_vocabulary():
    out, labels = run(TCL, IDS, D)
    # only [PAD] and [CLS] protected: [UNK] -> [MASK], [SEP] selected (kept by its action); w7 -> pool [0, 10) at
    # floor(0.25 x 10) = 2, i.e. the special id [CLS]
    assert out == [CLS, MASK, MASK, CLS, SEP, PAD]
    assert labels == [_, 5, UNK, 7, SEP, _]


def test_bridgetower_rule_never_selects_a_special_token():
    out, labels = run(BRIDGETOWER, IDS, D)
    # every special id protected: [UNK] and [SEP] stay out; w7 -> the same vocab pool, id 2
    assert out == [CLS, MASK, UNK, CLS, SEP, PAD]
    assert labels == [_, 5, _, 7, _, _]


def test_bridgetower_rule_on_a_large_batch_selects_exactly_the_non_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (64, 20), generator=g)
    m = masker(MaskingConfig(protect="special", probability=1.0))
    _, labels = m(ids, torch.ones_like(ids), generator=g)
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(labels != -100, ~special)
    _, labels = masker(MaskingConfig(protect="pad_cls", probability=1.0))(ids, torch.ones_like(ids), generator=g)
    assert torch.equal(labels != -100, (ids != PAD) & (ids != CLS))


def test_non_special_pool_and_attention_mask():
    cfg = MaskingConfig(protect="special", random_tokens="non_special")
    out, labels = run(cfg, IDS, D)
    assert out == [CLS, MASK, UNK, 6, SEP, PAD] and labels == [_, 5, _, 7, _, _]  # pool 5..9: floor(0.25 x 5) = 1
    # a real token outside the attention mask is never selected
    out, labels = run(TCL, IDS, D, attention=[1, 0, 1, 1, 1, 0])
    assert labels == [_, _, UNK, 7, SEP, _] and out[1] == 5


def test_uniter_rule_random_range_and_at_least_one_masked():
    # nothing selected by the draws: the first maskable token (w5, after the protected [CLS]) is forced to [MASK]
    out, labels = run(UNITER, IDS, draws(select=[0.9] * 6, action=[0.95] * 6))
    assert out == [CLS, MASK, UNK, 7, SEP, PAD] and labels == [_, 5, _, _, _, _]
    # one selected (w7 -> random in [5, 10): 5 + floor(0.9 x 5) = 9): nothing forced
    one = draws(select=[0.9, 0.9, 0.9, 0.1, 0.9, 0.9], action=[0.0, 0.0, 0.0, 0.85, 0.0, 0.0],
                replace=[0.0, 0.0, 0.0, 0.9, 0.0, 0.0])
    out, labels = run(UNITER, IDS, one)
    assert out == [CLS, 5, UNK, 9, SEP, PAD] and labels == [_, _, _, 7, _, _]
    # min_masked=2 with one selected: the first unselected maskable token joins it, as [MASK]
    two = MaskingConfig(protect="special", random_tokens="range", random_range=[5, 10], min_masked=2)
    out, labels = run(two, IDS, one)
    assert out == [CLS, MASK, UNK, 9, SEP, PAD] and labels == [_, 5, _, 7, _, _]


def test_uniter_rule_on_a_large_batch_has_a_target_in_every_row_and_random_ids_in_range():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (2000, 6), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    out, labels = masker(UNITER)(ids, torch.ones_like(ids), generator=g)
    assert ((labels != -100).sum(1) >= 1).all()
    assert ((labels[:, 0] == -100) & (labels[:, -1] == -100)).all()
    changed = (labels != -100) & (out != MASK)
    assert ((out[changed] >= 5) & (out[changed] < 10)).all()


def test_whole_word_selects_words_as_wholes_hand_example():
    # [CLS] a ##b c [SEP] [PAD]: words 0 (two pieces) and 1; select column w is word w's draw (word 0: 0.1 selected,
    # word 1: 0.9 not; column 2's 0.0 is no token's draw); actions stay per token (HF's whole-word collator)
    cfg = MaskingConfig(protect="special", whole_word=True)
    d = draws(select=[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], action=[0.0, 0.1, 0.95, 0.1, 0.0, 0.0])
    out, labels = run(cfg, [CLS, 5, 6, 7, SEP, PAD], d, word_ids=[-1, 0, 0, 1, -1, -1])
    assert out == [CLS, MASK, 6, 7, SEP, PAD] and labels == [_, 5, 6, _, _, _]
    # pad_cls + whole word: [SEP] has no word and uses its own draw ("single")
    cfg = MaskingConfig(protect="pad_cls", whole_word=True)
    d = draws(select=[0.9, 0.9, 0.9, 0.9, 0.9, 0.9], action=[0.0] * 6, single=[0.9, 0.9, 0.9, 0.9, 0.1, 0.9])
    out, labels = run(cfg, [CLS, 5, 6, 7, SEP, PAD], d, word_ids=[-1, 0, 0, 1, -1, -1])
    assert out == [CLS, 5, 6, 7, MASK, PAD] and labels == [_, _, _, _, SEP, _]
    # min_masked with whole words: the forced unit is the first word, both pieces
    cfg = MaskingConfig(protect="special", whole_word=True, min_masked=1)
    out, labels = run(cfg, [CLS, 5, 6, 7, SEP, PAD], draws(select=[0.9] * 6), word_ids=[-1, 0, 0, 1, -1, -1])
    assert out == [CLS, MASK, MASK, 7, SEP, PAD] and labels == [_, 5, 6, _, _, _]
    with pytest.raises(ValueError, match="word_ids"):
        run(cfg, [CLS, 5, 6, 7, SEP, PAD], draws(select=[0.9] * 6))


def _batch(b: int, length: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.randint(5, 1000, (b, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(length // 2, length + 1, (b,), generator=g)
    pos = torch.arange(length).expand(b, length)
    ids[pos == (lengths - 1).unsqueeze(1)] = SEP
    ids[pos >= lengths.unsqueeze(1)] = PAD
    return ids


@pytest.mark.parametrize("path", ["seeds", "generator"])
def test_statistics_80_10_10_on_a_large_batch(path):
    g = torch.Generator().manual_seed(0)
    ids = _batch(1000, 64, g)
    original = ids.clone()
    m = Masker(TCL, vocab_size=1000, mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS, special_ids=SPECIAL)
    kw = {"seeds": list(range(1000))} if path == "seeds" else {"generator": g}
    out, labels = m(ids, (ids != PAD).long(), **kw)
    assert torch.equal(ids, original)  # input untouched
    sel = labels != -100
    eligible = (ids != PAD) & (ids != CLS)  # ~48k tokens: sd of the rate 0.0016
    assert not sel[~eligible].any() and sel[ids == SEP].any()
    assert abs(sel.sum().item() / eligible.sum().item() - 0.15) < 0.008
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(out[~sel], ids[~sel])
    n = sel.sum().item()  # ~7.2k selected: sd <= 0.006
    frac_mask = (out[sel] == MASK).sum().item() / n
    frac_same = (out[sel] == ids[sel]).sum().item() / n  # (a random id equal to the original: +0.01 %)
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015 and abs(1 - frac_mask - frac_same - 0.1) < 0.015
    random_ids = out[sel & (out != MASK) & (out != ids)]
    assert random_ids.min() < 100 and random_ids.max() > 900  # spread over the whole vocabulary


def test_seeded_rows_depend_only_on_their_seed():
    m = masker(MaskingConfig(probability=0.5))
    ids = torch.randint(5, V, (6, 12), generator=torch.Generator().manual_seed(1))
    a, la = m(ids, torch.ones_like(ids), seeds=[10, 11, 12, 13, 14, 15])
    # other rows, another order and more padding: row for seed 12 is unchanged on its real tokens
    padded = torch.cat([ids[[2, 0]], torch.zeros(2, 5, dtype=torch.long)], 1)
    attention = torch.cat([torch.ones(2, 12), torch.zeros(2, 5)], 1).long()
    b, lb = m(padded, attention, seeds=[12, 10])
    assert torch.equal(b[0, :12], a[2]) and torch.equal(lb[1, :12], la[0]) and (lb[:, 12:] == -100).all()
    assert hashed_uniforms([12], 5).tolist()[0] == hashed_uniforms([12, 1], 9)[0, :5].tolist()
    with pytest.raises(ValueError, match="2 seeds for 6 rows"):
        m(ids, seeds=[1, 2])


def test_generator_path_is_reproducible_and_follows_the_generator():
    m = masker(MaskingConfig(probability=0.5))
    ids = torch.randint(5, V, (8, 12), generator=torch.Generator().manual_seed(2))
    a = m(ids, generator=torch.Generator().manual_seed(5))
    b = m(ids, generator=torch.Generator().manual_seed(5))
    c = m(ids, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    full = masker(MaskingConfig(probability=0.5, mask_ratio=1.0, random_ratio=0.0))(ids, generator=torch.Generator())
    assert bool((full[0][full[1] != -100] == MASK).all())


def test_config_and_vocabulary_errors_name_the_field():
    with pytest.raises(ValueError, match="masking.protect='all'"):
        MaskingConfig(protect="all")
    with pytest.raises(ValueError, match="random_range"):
        MaskingConfig(random_tokens="range")
    with pytest.raises(ValueError, match="reaches past the vocabulary"):
        masker(MaskingConfig(random_tokens="range", random_range=[5, 11]))
    with pytest.raises(ValueError, match="mask_token_id=12"):
        Masker(TCL, vocab_size=V, mask_token_id=12, pad_token_id=PAD, cls_token_id=CLS)
    with pytest.raises(TypeError, match="integer"):
        masker(TCL)(torch.zeros(2, 3))
