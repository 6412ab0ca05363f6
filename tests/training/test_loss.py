"""Token-weighted loss: what DeepSpeed does with the scaled micro-batch losses equals the token mean."""

import torch
import torch.nn.functional as F

from training.loss import global_target_tokens, scaled_for_engine, target_tokens


def test_scaled_losses_give_the_gradient_of_the_token_mean_across_accumulation_and_ranks():
    torch.manual_seed(0)
    weight = torch.randn(5, 3, requires_grad=True)
    # 2 ranks x 2 accumulation steps, micro-batches of very different target counts (a short reply, a long one)
    micro = [[torch.randn(n, 3) for n in (1, 9)], [torch.randn(n, 3) for n in (4, 2)]]
    labels = [[torch.randint(0, 5, (len(x),)) for x in rank] for rank in micro]
    tokens = sum(len(x) for rank in micro for x in rank)
    grad_accum, world_size = 2, 2
    # DeepSpeed: backward(loss / grad_accum) on each micro-batch, gradients averaged over ranks
    total = sum(
        scaled_for_engine(F.cross_entropy(x @ weight.T, y, reduction="sum"), tokens, grad_accum, world_size) / grad_accum
        for rank_x, rank_y in zip(micro, labels) for x, y in zip(rank_x, rank_y)
    ) / world_size  # fmt: skip
    (engine_grad,) = torch.autograd.grad(total, weight)
    everything = torch.cat([x for rank in micro for x in rank]) @ weight.T
    (mean_grad,) = torch.autograd.grad(F.cross_entropy(everything, torch.cat([y for rank in labels for y in rank])), weight)
    assert torch.allclose(engine_grad, mean_grad, atol=1e-6)


def test_target_tokens_count_predicted_positions():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    assert target_tokens(labels) == 4  # position 0 predicts nothing
    assert global_target_tokens(4, torch.device("cpu")) == 4  # one process: no process group
