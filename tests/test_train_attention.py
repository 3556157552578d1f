"""The capture attention function: rows equal eager output_attentions rows, gradients flow into
q/k projections, and model outputs are unchanged (docs/architecture.md, "The where-to-look loss")."""
from __future__ import annotations

import pytest
import torch

from stages.train.attention import AttentionCapture, language_layers
from train_support import conversation, random_image, tiny_vlm

FAMILIES = ["llava", "qwen2_vl", "llava_next"]
SIZES = {"llava": dict(image_size=112), "llava_next": dict(image_size=56), "qwen2_vl": {}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-vlms")


def _load(folder, attn):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), attn_implementation=attn, dtype=torch.float32)
    return AutoProcessor.from_pretrained(str(folder)), model.eval()


def _batch(processor, padding_side="right"):
    captions = ["A red circle above a small blue square.", "A dog."]
    texts = [processor.apply_chat_template(conversation(c)) for c in captions]
    images = [random_image(90, 120, 0), random_image(90, 120, 1)]
    processor.tokenizer.padding_side = padding_side
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] != lengths[1], "the test needs a padded batch"
    # Query positions: the last 6 real tokens of each sample (caption words), -1 padded.
    q = torch.full((2, 6), -1, dtype=torch.long)
    for b in range(2):
        real = batch["attention_mask"][b].nonzero().flatten()
        n = 6 if b == 0 else 3
        q[b, :n] = real[-n:]
    return batch, q


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rows_equal_eager_output_attentions(root, family, padding_side):
    folder = tiny_vlm(root, family, **SIZES[family])
    processor, eager = _load(folder, "eager")
    batch, q = _batch(processor, padding_side)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    _, model = _load(folder, "sdpa")
    n_layers = len(language_layers(model))
    cap = AttentionCapture.attach(model, layers=list(range(n_layers)))
    cap.set_queries(q)
    with torch.no_grad():
        out = model(**batch)
    assert sorted(cap.rows) == list(range(n_layers))
    for layer in range(n_layers):
        got = cap.rows[layer]
        want_all = ref.attentions[layer]
        for b in range(2):
            for j in range(q.shape[1]):
                if q[b, j] < 0:
                    assert got[b, :, j].abs().max() == 0
                    continue
                want = want_all[b, :, q[b, j]]
                diff = (got[b, :, j] - want).abs().max().item()
                assert diff < 1e-5, (family, layer, b, j, diff)
    real = batch["attention_mask"].bool()
    assert torch.allclose(out.logits[real], ref.logits[real], atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_outputs_unchanged_and_gradients_flow(root, family):
    folder = tiny_vlm(root, family, **SIZES[family])
    processor, plain = _load(folder, "sdpa")
    batch, q = _batch(processor)
    with torch.no_grad():
        want = plain(**batch).logits
    _, model = _load(folder, "sdpa")
    layers = [1, 2]
    cap = AttentionCapture.attach(model, layers=layers)
    cap.set_queries(q)
    model.train()
    for mod in model.modules():  # no dropout anyway; keep train-mode paths exercised
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    out = model(**batch)
    assert torch.equal(out.logits.detach(), want), "capture changed the model's outputs"
    loss = sum(r[..., : r.shape[-1] // 2].sum() for r in cap.rows.values())
    loss.backward()
    decoder = language_layers(model)
    for i, layer in enumerate(decoder):
        attn = layer.self_attn
        g_q, g_k = attn.q_proj.weight.grad, attn.k_proj.weight.grad
        if i in layers or i < max(layers):
            assert g_q is not None and g_q.abs().sum() > 0, (i, "q_proj")
            assert g_k is not None and g_k.abs().sum() > 0, (i, "k_proj")
        else:  # layers after the last captured one get no gradient from the rows
            assert g_q is None or g_q.abs().sum() == 0


def test_gradient_checkpointing_keeps_rows_differentiable(root):
    folder = tiny_vlm(root, "llava", **SIZES["llava"])
    processor, model = _load(folder, "sdpa")
    batch, q = _batch(processor)
    cap = AttentionCapture.attach(model, layers=[1, 2])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    cap.set_queries(q)
    out = model(**batch, labels=batch["input_ids"])
    rows_loss = sum(r.sum() * 0 + r[..., :10].sum() for r in cap.rows.values())
    (out.loss + rows_loss).backward()
    attn = language_layers(model)[1].self_attn
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
