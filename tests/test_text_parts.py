"""BERT parts (vlp.blocks.bert) and their loading by layer range (vlp.blocks.bert_pretrained).

Reference: a tiny random transformers BertForMaskedLM saved with ``save_pretrained`` (loaded back by path, nothing
downloads). Split into two stacks by layer range, its parts reproduce the HF hidden states; the MLM head tied to the
first rows of a longer table decodes only those rows; ``TextTower`` keeps the keys (recorded from the tower before it
was rebuilt from these parts) and ``TextEncoder`` is its text-only twin.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.blocks.bert import BertStack, CrossLayerStack, LayerStack, MLMHead, text_embeddings
from vlp.blocks.bert_pretrained import BertCheckpoint, load_bert_embeddings, load_bert_layers, load_mlm_head
from vlp.blocks.text import TextConfig, TextEncoder, TextTower, build_hf_config

VOCAB, HIDDEN, LAYERS = 50, 32, 4


def _perturb(module: nn.Module, scale: float = 0.05) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """(the HF model in eval mode, its save_pretrained directory)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                                       pad_token_id=0))
    _perturb(model).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(path)
    return model, str(path)


def _batch(lengths=(9, 6, 3), length: int = 9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(lengths), length), generator=gen)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def _hf_config(path: str, **fields):
    return build_hf_config(TextConfig(name=path, **fields))


# ---------------------------------------------------------------------------------------------------------------------
# Stacks loaded by layer range


def test_two_stacks_from_layer_ranges_reproduce_hf_hidden_states(hf_bert):
    model, path = hf_bert
    hf = _hf_config(path)
    ckpt = BertCheckpoint.load(path)
    assert ckpt.arch == "bert" and ckpt.num_layers == LAYERS
    emb = text_embeddings(hf)
    low, high = LayerStack(hf, 2), LayerStack(hf, 2)
    load_bert_embeddings(emb, ckpt)
    assert load_bert_layers(low, path, range(0, 2)) == {0: 0, 1: 1}  # by path ...
    assert load_bert_layers(high, ckpt, range(2, 4)) == {0: 2, 1: 3}  # ... or from one read
    for m in (emb, low, high):
        m.eval()
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        x = emb(ids)
        lower = low(x, mask, all_layers=True)
        upper = high(lower[-1], mask, all_layers=True)
    ours = (x, *lower, *upper)
    assert len(ours) == len(ref) == LAYERS + 1
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"hidden state {i}: {m}")


def test_out_of_range_or_mis_sized_layer_requests_name_the_path_and_the_layers(hf_bert):
    _, path = hf_bert
    stack = LayerStack(_hf_config(path), 2)
    with pytest.raises(ValueError, match=rf"{path}: layers \[4, 5\] requested, the checkpoint has 4 layers \(0..3\)"):
        load_bert_layers(stack, path, range(4, 6))
    with pytest.raises(ValueError, match=r"3 checkpoint layers \[0, 1, 2\] for a stack of depth 2"):
        load_bert_layers(stack, path, range(0, 3))
    wide = LayerStack(_hf_config(path, intermediate=48), 2)
    with pytest.raises(ValueError, match=r"layer 1 -> stack layer 0: intermediate.dense.weight has shape \(64, 32\)"):
        load_bert_layers(wide, path, range(1, 3))
    with pytest.raises(ValueError, match=rf"{path}: the checkpoint has 4 layers, the tower 2"):
        TextTower(name=path, pretrained=True, layers=2)


def test_cross_stack_loads_bert_layers_and_keeps_fresh_cross_attention(hf_bert):
    model, path = hf_bert
    hf = _hf_config(path)
    torch.manual_seed(3)
    stack = CrossLayerStack(hf, 2, encoder_width=24)
    from vlp.blocks.heads import init_bert_weights

    init_bert_weights(stack, 0.02)
    fresh = {k: v.clone() for k, v in stack.state_dict().items() if ".crossattention." in k}
    load_bert_layers(stack, path, range(2, 4))
    for k, v in stack.state_dict().items():
        if ".crossattention." in k:
            assert torch.equal(v, fresh[k]), k
    torch.testing.assert_close(stack.layer[1].output.dense.weight, model.bert.encoder.layer[3].output.dense.weight)
    assert stack.layer[0].crossattention.self.key.weight.shape == (HIDDEN, 24)
    x = torch.randn(2, 5, HIDDEN)
    with pytest.raises(ValueError, match="24 wide|expect encoder_width=24"):
        stack(x, None, torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="layers 0..1 cross-attend: pass encoder_tokens"):
        stack.run(x, None)


def test_layer_stack_runs_any_sequence_under_its_mask(hf_bert):
    """UNITER's single stream: [words ; regions] through one stack; a masked region changes nothing visible."""
    _, path = hf_bert
    stack = _perturb(LayerStack(_hf_config(path), 2)).eval()
    words, regions = torch.randn(2, 4, HIDDEN), torch.randn(2, 3, HIDDEN)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 6] = 0
    changed = regions.clone()
    changed[0, 2] += 5.0
    with torch.no_grad():
        out = stack(torch.cat([words, regions], 1), mask)
        out_changed = stack(torch.cat([words, changed], 1), mask)
    assert out.shape == (2, 7, HIDDEN)
    torch.testing.assert_close(out_changed[0, :6], out[0, :6], atol=1e-6, rtol=0)
    assert (out_changed[0, 6] - out[0, 6]).abs().max() > 1e-3  # the masked query itself still moves


def test_layer_stack_grad_checkpointing_same_grads(hf_bert):
    _, path = hf_bert
    hf = _hf_config(path, dropout=0.0)
    a = _perturb(LayerStack(hf, 2)).train()
    b = LayerStack(hf, 2, grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    la, lb = a(x, mask).pow(2).sum(), b(x, mask).pow(2).sum()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.layer[0].attention.self.query.weight.grad, b.layer[0].attention.self.query.weight.grad)


# ---------------------------------------------------------------------------------------------------------------------
# MLM head tied to a slice of a word+phrase table


def test_mlm_head_tied_to_a_slice_decodes_only_the_word_rows(hf_bert):
    model, path = hf_bert
    phrases = 10
    emb = text_embeddings(_hf_config(path, vocab_size=VOCAB + phrases))  # word rows, then phrase rows
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \(50, 32\), the module expects \(60, 32\)"):
        load_bert_embeddings(emb, path)
    fresh_phrases = emb.word_embeddings.weight[VOCAB:].detach().clone()
    load_bert_embeddings(emb, path, extra_rows=True)
    table = emb.word_embeddings.weight
    torch.testing.assert_close(table[:VOCAB], model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(table[VOCAB:], fresh_phrases)

    head = MLMHead(HIDDEN, VOCAB)
    with pytest.raises(ValueError, match="has 60 rows.*pass rows=50"):
        head.tie(emb.word_embeddings)
    with pytest.raises(ValueError, match="rows=61 must equal vocab_size=50"):
        head.tie(emb.word_embeddings, rows=61)
    head.tie(emb.word_embeddings, rows=VOCAB)
    assert head.tied and head.decoder.weight is table
    assert head.decoder.weight.data_ptr() == table.data_ptr()  # one storage: the word rows are the decoder
    assert sorted(load_mlm_head(head, path)) == ["bias", "transform.LayerNorm.bias", "transform.LayerNorm.weight",
                                                 "transform.dense.bias", "transform.dense.weight"]
    torch.testing.assert_close(head.bias, model.cls.predictions.bias)

    h = torch.randn(2, 3, HIDDEN)
    logits = head(h)
    assert logits.shape == (2, 3, VOCAB)
    torch.testing.assert_close(logits, F.linear(head.transform(h), table[:VOCAB]) + head.bias)
    with torch.no_grad():
        ref = model.cls(h)
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=1e-6)  # the HF head on the loaded word rows
    logits.sum().backward()
    assert table.grad[:VOCAB].abs().sum() > 0 and torch.count_nonzero(table.grad[VOCAB:]) == 0


# ---------------------------------------------------------------------------------------------------------------------
# TextTower keys (recorded from the tower before it was rebuilt from the parts) and TextEncoder

_SELF = ("attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight",
         "attention.self.key.bias", "attention.self.value.weight", "attention.self.value.bias",
         "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
         "attention.output.LayerNorm.bias")
_CROSS = tuple("cross" + k for k in _SELF)
_FFN = ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
        "output.LayerNorm.weight", "output.LayerNorm.bias")
_EMB = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias")
_HEAD = ("mlm_head.bias", "mlm_head.transform.dense.weight", "mlm_head.transform.dense.bias",
         "mlm_head.transform.LayerNorm.weight", "mlm_head.transform.LayerNorm.bias", "mlm_head.decoder.weight")
# TextConfig.tiny(): layers 0-1 text, 2-3 fusion; 95 keys in this order.
TINY_TOWER_KEYS = [*_EMB,
                   *(f"encoder.layer.{n}.{k}" for n in (0, 1) for k in _SELF + _FFN),
                   *(f"encoder.layer.{n}.{k}" for n in (2, 3) for k in _SELF + _CROSS + _FFN),
                   *_HEAD]


def test_text_tower_keeps_its_state_dict_keys():
    tower = TextTower(TextConfig.tiny(encoder_width=48))
    sd = tower.state_dict()
    assert len(TINY_TOWER_KEYS) == 95 and list(sd) == TINY_TOWER_KEYS
    assert sd["encoder.layer.2.crossattention.self.key.weight"].shape == (64, 48)
    assert sd["encoder.layer.2.crossattention.self.query.weight"].shape == (64, 64)
    assert tower.mlm_head.decoder.weight is tower.embeddings.word_embeddings.weight
    assert type(tower.encoder) is BertStack and tower.encoder.cross_layers == [2, 3]
    assert (tower.num_layers, tower.fusion_start, tower.hidden, tower.encoder_width) == (4, 2, 64, 48)


def test_text_encoder_is_the_text_only_tower():
    cfg = TextConfig.tiny(fusion_layers=0, mlm_head=False)
    torch.manual_seed(0)
    tower = TextTower(cfg).eval()
    torch.manual_seed(0)
    enc = TextEncoder(cfg).eval()
    assert list(enc.state_dict()) == list(tower.state_dict()) == [k for k in TINY_TOWER_KEYS
                                                                   if "crossattention" not in k
                                                                   and not k.startswith("mlm_head.")]
    for k, v in enc.state_dict().items():
        assert torch.equal(v, tower.state_dict()[k]), k  # same construction order: the same seeded init
    ids, mask = torch.randint(3, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        layers = enc.run_layers(enc.embed(ids), mask, all_layers=True)
        torch.testing.assert_close(torch.stack(layers), torch.stack(tower.run_layers(tower.embed(ids), mask,
                                                                                     all_layers=True)))
        torch.testing.assert_close(enc(ids, mask), layers[-1])
    assert (enc.num_layers, enc.hidden, enc.arch) == (4, 64, "bert") and not hasattr(enc, "mlm_head")
    enc.set_grad_checkpointing(True)
    assert enc.grad_checkpointing and enc.encoder.grad_checkpointing
    with pytest.raises(ValueError, match="text.fusion_layers=2: TextEncoder has no fusion layers"):
        TextEncoder(TextConfig.tiny())


def test_text_encoder_loads_hf_by_path_with_parity(hf_bert):
    model, path = hf_bert
    enc = TextEncoder(name=path, pretrained=True).eval()
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(enc.forward_text(ids, mask), ref, atol=1e-6, rtol=1e-6)
