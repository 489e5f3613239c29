"""The model: a small transformer encoder with learned prompt tokens prepended to its input.

Nothing here knows about token-surgery; the plugin (`plugin.py`) describes the model from outside,
as a plugin for a third-party library would.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptTunedEncoder(nn.Module):
    """`prompts` (P, D) are learned tokens put before the input sequence (B, S, D); the encoder
    sees P + S tokens, and the head pools the S input tokens only, which is why the forward reads
    `num_prompts`: a count that went stale would pool the wrong tokens."""

    def __init__(self, num_prompts: int = 4, dim: int = 16, depth: int = 2, heads: int = 2,
                 max_len: int = 32, num_classes: int = 3) -> None:
        super().__init__()
        self.num_prompts, self.dim = num_prompts, dim
        self.prompts = nn.Parameter(torch.randn(num_prompts, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)  # positions of the input tokens
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, D) -> (B, num_classes)
        batch, length, _ = x.shape
        prompts = self.prompts.unsqueeze(0).expand(batch, -1, -1)  # (B, P, D)
        h = self.encoder(torch.cat([prompts, x + self.pos_embed[:, :length]], dim=1))  # (B, P + S, D)
        return self.head(h[:, self.num_prompts:].mean(dim=1))
