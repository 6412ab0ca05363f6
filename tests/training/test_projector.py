import pytest
import torch

from training.projector import Projector, ProjectorConfig


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("soft_tokens", [1, 4])
def test_shapes(kind, soft_tokens):
    projector = Projector(ProjectorConfig(in_dim=32, hidden_size=48, soft_tokens=soft_tokens, kind=kind))
    assert projector(torch.randn(5, 32)).shape == (5, soft_tokens, 48)


def test_linear_is_one_layer_and_mlp_two():
    linear = Projector(ProjectorConfig(32, 48, 2, "linear"))
    mlp = Projector(ProjectorConfig(32, 48, 2, "mlp"))
    assert sum(isinstance(m, torch.nn.Linear) for m in linear.modules()) == 1
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) == 2


def test_wrong_width_is_refused():
    with pytest.raises(ValueError, match="expects 32-d"):
        Projector(ProjectorConfig(32, 48))(torch.randn(2, 16))
