import pytest
import torch

from infra.config import LoraSettings
from training.mllm import MultimodalLM, attach_lora, load_llm
from training.projector import Projector, ProjectorConfig


def _model(tiny_llm, soft_tokens=2, quantization="none"):
    llm, tokenizer = load_llm(tiny_llm, quantization=quantization)
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig(8, llm.config.hidden_size, soft_tokens))
    return MultimodalLM(attach_lora(llm, LoraSettings(r=4, alpha=8, dropout=0.0)), projector), tokenizer


def test_soft_tokens_replace_exactly_the_masked_positions(tiny_llm):
    model, _ = _model(tiny_llm)
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 3:5] = True
    media = torch.randn(2, 8)
    embeds = model.embed(ids, media, mask)
    plain = model.llm.get_input_embeddings()(ids)
    soft = model.projector(media)
    assert torch.allclose(embeds[0, 1:3], soft[0]) and torch.allclose(embeds[1, 3:5], soft[1])
    assert torch.equal(embeds[~mask], plain[~mask])


def test_rows_without_media_positions_keep_token_embeddings(tiny_llm):
    model, _ = _model(tiny_llm, soft_tokens=1)
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 2] = True  # row 0 is text-only
    embeds = model.embed(ids, torch.randn(2, 8), mask)
    assert torch.equal(embeds[0], model.llm.get_input_embeddings()(ids)[0])


def test_loss_decreases_and_gradients_reach_projector_and_lora(tiny_llm):
    model, _ = _model(tiny_llm, soft_tokens=1, quantization="nf4")
    ids = torch.randint(0, 100, (4, 12))
    ids[:, 6:] = torch.arange(6)  # the same reply in every row: learnable in a few steps
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 2] = True
    media = torch.randn(4, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(12):
        out = model(ids, torch.ones_like(ids), labels=labels, media=media, media_mask=mask)
        out.loss.backward()
        if not losses:
            assert model.projector.net.weight.grad.abs().sum() > 0
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.llm.named_parameters() if "lora" in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_loss_on_kept_logits_equals_the_full_causal_lm_loss(tiny_llm):
    model, _ = _model(tiny_llm, soft_tokens=1)
    ids = torch.randint(0, 100, (3, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 8:] = ids[1, 8:]
    labels[2, 4:7] = ids[2, 4:7]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(ids, mask, labels=labels)
        full = model.llm(input_ids=ids, attention_mask=mask, labels=labels)
    assert ours.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert ours.logits.shape[1] == 6  # positions 3..8 predict a labelled token in some row
