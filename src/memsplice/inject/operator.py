"""The contract every injection operator keeps.

An operator turns latents z (B, M, d) into per-layer keys and values (B, H, M, D) for the layers it writes,
plus a boolean layer mask (L,) saying which layers hold memory. Gating, safety and splicing are shared and live
outside the operators (memory.model, inject.splice), so every operator gets them for free and alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..reasoner.reasoner import Reasoner


class InjectionOperator(nn.Module):
    name: ClassVar[str]

    def __init__(self, config, reasoner: Reasoner):
        super().__init__()
        self.shapes = reasoner.shapes

    def target_layers(self) -> list[int]:
        return list(range(self.shapes.num_layers))

    def layer_mask(self, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(self.shapes.num_layers, dtype=torch.bool, device=device)
        mask[self.target_layers()] = True
        return mask

    def forward(
        self, latents: torch.Tensor, reasoner: Reasoner
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """latents (B, M, d) -> keys, values: L tensors (B, H, M, D) in the reasoner's dtype; layers outside
        `target_layers()` hold zeros (their gate bias is -inf, so they contribute nothing)."""
        raise NotImplementedError
