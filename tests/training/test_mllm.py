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


def _quant_states(model) -> dict:
    return {
        f"{name}.{key}": value.clone()
        for name, module in model.named_modules() if hasattr(module, "support_avx512bf16_for_cpu")
        for key, value in module.weight.quant_state.as_dict(packed=True).items()
    }  # fmt: skip


def test_bitsandbytes_cpu_repacking_round_trip_is_lossy_for_nf4(tiny_llm):
    """Why resume was not exact on AVX512-BF16 CPUs (AMD EPYC Zen 4): bitsandbytes 0.50's Linear4bit.forward
    (bitsandbytes/nn/modules.py ~l.607) repacks a layer at its first eval-mode no-grad forward with
    `_convert_weight_packed_for_cpu` (bitsandbytes/functional.py ~l.1676: absmax to bf16), and
    `_save_to_state_dict` undoes it with `_convert_weight_packed_for_cpu_inverse` (~l.1730: absmax
    re-quantised with a new offset). The round trip changes the frozen weights' quantisation state."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

    llm, _ = load_llm(tiny_llm, quantization="nf4")
    layer = next(m for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = _quant_states(llm)
    packed, state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(packed, state)
    after = _quant_states(llm)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("absmax"))


def test_training_keeps_the_4bit_layout_through_eval_and_state_dict(tiny_llm, monkeypatch):
    """As if on an AVX512-BF16 CPU: after `attach_lora`, an eval forward and a state_dict (validation,
    then a checkpoint) leave every NF4 weight and its quantisation state bit-identical."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model, _ = _model(tiny_llm, quantization="nf4")
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    before = _quant_states(model)
    # bytes: NF4 weights stored as float32 hold NaN bit patterns, which never compare equal
    weights = {n: p.detach().view(torch.uint8).clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in _quant_states(model).items())
    assert all(torch.equal(weights[n], p.detach().view(torch.uint8)) for n, p in model.named_parameters() if not p.requires_grad)
