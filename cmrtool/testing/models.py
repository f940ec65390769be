"""The architectures behind the bundled digits samples and the test suite.

All three read an image batch ``(n, 1, 8, 8)`` (scikit-learn's handwritten digits, scaled to
[0, 1]) and return logits ``(n, 10)``. They are importable as ``--arch`` factories, e.g.
``cmrtool.testing.models:digits_mlp``.

- :class:`DigitsMLP`: 64-256-256-10, ReLU, dropout 0.2 while training. Sites: ``body.0``,
  ``body.3`` (neurons; ``body.3`` is the penultimate layer feeding the logits ``body.6``).
- :class:`DigitsConvNet`: three 3x3 convs with BatchNorm and ReLU, global average pooling and a
  linear head. ``conv1`` feeds a zero-padded conv (``interior-exact``), ``conv2`` an unpadded one
  (``exact``), ``conv3`` the pooled head (``exact``). ``conv2``/``conv3`` have no bias, as is usual
  before BatchNorm, so folding into them exercises "consumer without a bias".
- :class:`DigitsTransformer`: rows of the image as 8 tokens, pre-LayerNorm encoder blocks with
  multi-head attention (``scaled_dot_product_attention``) and a GELU FFN. Sites: ``blocks.i.fc1``
  (neurons) and, through ``--arch``, the attention heads ``blocks.i.attn``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitsMLP",
    "DigitsConvNet",
    "DigitsTransformer",
    "digits_mlp",
    "digits_convnet",
    "digits_transformer",
]


class DigitsMLP(nn.Module):
    """64-256-256-10 ReLU MLP over the flattened 8x8 image (dropout is the identity in eval)."""

    def __init__(self, hidden: int = 256, classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.flatten(x, 1))  # (n, 64) -> (n, classes)


class DigitsConvNet(nn.Module):
    """conv(pad 1)-BN-ReLU, conv(pad 1)-BN-ReLU, conv(pad 0)-BN-ReLU, global average pool, linear."""

    def __init__(self, c1: int = 16, c2: int = 32, c3: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.head = nn.Linear(c3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (n, c1, 8, 8)
        x = F.relu(self.bn2(self.conv2(x)))  # (n, c2, 8, 8)
        x = F.relu(self.bn3(self.conv3(x)))  # (n, c3, 6, 6)
        x = F.adaptive_avg_pool2d(x, 1)  # (n, c3, 1, 1)
        return self.head(torch.flatten(x, 1))


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and an output projection.

    The head count is read from the projections' shapes (``-1`` below) and the head size from
    ``head_dim``, as in Hugging Face models, so a copy with heads removed runs unchanged.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[0], x.shape[1]
        hd = self.head_dim
        q = self.q_proj(x).view(n, t, -1, hd).transpose(1, 2)  # (n, heads, t, head_dim)
        k = self.k_proj(x).view(n, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(n, t, -1, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (n, heads, t, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(n, t, -1))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x + attn(ln1(x)), then x + fc2(gelu(fc1(ln2(x))))."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DigitsTransformer(nn.Module):
    """Each of the 8 image rows is a token (8 pixels) embedded to ``dim``; mean-pooled head."""

    def __init__(
        self, dim: int = 32, heads: int = 4, ffn: int = 128, depth: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, 8, dim) / math.sqrt(dim))
        self.blocks = nn.ModuleList([Block(dim, heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(0, 1)) + self.pos  # (n, 1, 8, 8) -> (n, 8 tokens, dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def digits_mlp() -> DigitsMLP:
    """Factory for ``--arch cmrtool.testing.models:digits_mlp``."""
    return DigitsMLP()


def digits_convnet() -> DigitsConvNet:
    """Factory for ``--arch cmrtool.testing.models:digits_convnet``."""
    return DigitsConvNet()


def digits_transformer() -> DigitsTransformer:
    """Factory for ``--arch cmrtool.testing.models:digits_transformer``."""
    return DigitsTransformer()
