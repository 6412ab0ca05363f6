"""The projector: a store embedding -> N soft tokens in the LLM's input-embedding space.

`linear` is the reference system's (and PandaGPT's) choice; `mlp` is LLaVA-1.5's two-layer GELU MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class ProjectorConfig:
    in_dim: int
    hidden_size: int
    soft_tokens: int = 1
    kind: Literal["linear", "mlp"] = "linear"


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        out = config.hidden_size * config.soft_tokens
        if config.kind == "linear":
            self.net = nn.Linear(config.in_dim, out)
        elif config.kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(config.in_dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, out)
            )
        else:
            raise ValueError(f"unknown projector kind {config.kind!r} (linear or mlp)")

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(batch, in_dim) -> (batch, soft_tokens, hidden_size)."""
        if embedding.shape[-1] != self.config.in_dim:
            raise ValueError(f"projector expects {self.config.in_dim}-d embeddings, got {embedding.shape[-1]}-d")
        return self.net(embedding).view(embedding.shape[0], self.config.soft_tokens, self.config.hidden_size)
