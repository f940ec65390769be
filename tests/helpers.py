"""Tiny seeded models (float64 by default) covering every site kind and fold path, and helpers
to save them as TorchScript and write data files. Shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


class TinyMLP(nn.Module):
    """Linear→ReLU→Linear→ReLU→Linear. Sites fc1 (→fc2), fc2 (→out, feeds the logits)."""

    def __init__(self, d_in: int = 6, h1: int = 8, h2: int = 7, out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.out = nn.Linear(h2, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TinyConv(nn.Module):
    """conv(pad 1, bias)→BN→ReLU → conv(pad 0, no bias)→BN→ReLU → maxpool → conv(pad 0)→GELU →
    mean over H,W → linear. Sites c1 (exact, consumer c2 has no bias), c2 (through max pooling),
    c3 (pooled head)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=0, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 5, 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        x = F.gelu(self.c3(x))
        return self.head(x.mean(dim=(2, 3)))


class ConvFlatten(nn.Module):
    """conv→ReLU→flatten→linear: unit j owns a block of H*W consumer columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class TokenFlatten(nn.Module):
    """Per-token linear→tanh, then tokens flattened into a linear: unit j owns strided columns."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.fc = nn.Linear(4 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, 4 tokens, 3)
        return self.fc(torch.tanh(self.proj(x)).reshape(x.shape[0], -1))


class TokenFFN(nn.Module):
    """Residual token FFN (transformer-style): x + fc2(gelu(fc1(ln(x)))), mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 9)
        self.fc2 = nn.Linear(9, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, t, 4)
        x = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return self.head(x.mean(dim=1))


class ReflectConv(nn.Module):
    """conv→ReLU→conv with reflect padding (padding_mode='reflect'): exact, unlike zero padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.c2(F.relu(self.c1(x))), 1)


class ZeroPadConv(nn.Module):
    """conv→ReLU→conv(zero padding 1)→flatten: the logits are the consumer's output map."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.c2(F.relu(self.c1(x))), 1)  # (n, 2*H*W)


class NoBiasLinear(nn.Module):
    """Linear→ReLU→Linear(bias=False): TorchScript cannot give the Linear a bias (fold: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Flagged(nn.Module):
    """A producer behind ``if self.use_hidden`` (a prim::If on a module attribute when scripted)."""



    def __init__(self) -> None:
        super().__init__()
        self.use_hidden = True
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)
        self.skip = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_hidden:
            return self.fc2(torch.relu(self.fc1(x)))
        return self.skip(x)


class NothingReducible(nn.Module):
    """Linear→LayerNorm→Linear: no activation between Linear layers, nothing to replace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(self.fc1(x)))


class ReluIntoNorm(nn.Module):
    """Linear→ReLU→LayerNorm→Linear: the candidate's activation feeds a LayerNorm (rejected)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(torch.relu(self.fc1(x))))


class WithLSTM(nn.Module):
    """An LSTM followed by a linear head: an unsupported layer and nothing reducible."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def small_transformer() -> nn.Module:
    """The digits transformer at width 16 with 4 heads of 4 channels (``--arch helpers:small_transformer``)."""
    from cmrtool.testing.models import DigitsTransformer

    return DigitsTransformer(dim=16, heads=4, ffn=12, depth=2)


def not_a_module() -> int:
    """A factory that returns the wrong thing (for the --arch error test)."""
    return 42


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def build(factory: Callable[[], nn.Module], seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(factory(), seed).to(dtype).eval()


def save_ts(model: nn.Module, path: Path, mode: str, example: torch.Tensor) -> Path:
    """Save ``model`` as TorchScript, scripted or traced with ``example``."""
    ts = torch.jit.script(model) if mode == "script" else torch.jit.trace(model, example)
    ts.save(str(path))
    return path


def write_data(path: Path, x: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    tensors = {"input": x.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    save_file(tensors, str(path))
    return path


# (factory, input shape without batch) for every exactness case.
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (TinyMLP, (6,)),
    "conv": (TinyConv, (2, 9, 9)),
    "conv_flatten": (ConvFlatten, (1, 5, 5)),
    "token_flatten": (TokenFlatten, (4, 3)),
    "token_ffn": (TokenFFN, (5, 4)),
    "reflect_conv": (ReflectConv, (1, 6, 6)),
    "flagged": (Flagged, (5,)),
}
# Cases whose sites cannot be folded (compile refuses them).
UNFOLDABLE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {"nobias_linear": (NoBiasLinear, (5,))}


def inputs_for(shape: tuple[int, ...], n: int = 64, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype)


def dense_plan(m, g: torch.Generator):  # noqa: ANN001, ANN201 (a backend model → a Plan)
    """Every foldable site of ``m``: even units kept, odd units replaced by a random dense affine
    function of all kept units (:meth:`cmrtool.plan.Replacement.dense_affine`)."""
    from cmrtool.plan import Plan, Replacement, SitePlan

    sites = []
    for s in m.sites:
        if not s.foldable:
            continue
        kept, rep = tuple(range(0, s.width, 2)), tuple(range(1, s.width, 2))
        coef = torch.randn(len(rep) * s.group, len(kept) * s.group, generator=g, dtype=torch.float64)
        b0 = torch.randn(len(rep) * s.group, generator=g, dtype=torch.float64)
        sites.append(SitePlan(s.name, s.kind, s.width, kept, rep, Replacement.dense_affine(b0, coef), s.group))
    return Plan(m.sha256, "hand", tuple(sites))
