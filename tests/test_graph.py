"""TorchScript graph handling: attribute-guarded producers, control flow, value naming."""

from __future__ import annotations

import pytest
import torch
from helpers import Flagged, build, inputs_for, save_ts
from torch import nn

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.backends.torchscript.graph import iter_nodes


def test_producer_inside_attribute_if_is_found(tmp_path):
    model = build(Flagged)
    scripted = torch.jit.script(model)
    raw = scripted.inlined_graph
    ifs = [n for n in raw.nodes() if n.kind() == "prim::If"]
    inside = [n for i in ifs for b in i.blocks() for n in iter_nodes(b) if n.kind() == "aten::linear"]
    assert inside, "the raw graph has the producer inside a prim::If block"
    path = save_ts(model, tmp_path / "m.pt", "script", None)
    m = TorchScriptModel(path)
    assert [s.name for s in m.sites] == ["fc1"]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            h = torch.relu(self.fc1(x))
        else:
            h = torch.relu(self.fc1(-x))
        return self.fc2(h)


def test_data_dependent_control_flow_is_rejected_with_a_reason(tmp_path):
    path = save_ts(build(DataDependent), tmp_path / "m.pt", "script", None)
    m = TorchScriptModel(path)
    assert m.sites == []
    assert m.rejected and all("control flow" in r.reason for r in m.rejected)


def test_traced_numeric_value_names_survive_graph_copies(tmp_path):
    # Traced graphs name many values by number only; Graph.copy renumbers those.
    from helpers import TinyMLP

    x = inputs_for((6,))
    m = TorchScriptModel(save_ts(build(TinyMLP), tmp_path / "m.pt", "trace", x[:2]))
    logits, values = m.run([x], capture=[s.name for s in m.sites])
    assert {k: tuple(v.shape) for k, v in values.items()} == {"fc1": (64, 8), "fc2": (64, 7)}
    assert torch.allclose(logits, m.forward([x]))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # tracing in training mode is the point
def test_model_traced_in_training_mode_is_refused(tmp_path):
    from helpers import TinyConv

    model = build(TinyConv).train()
    torch.jit.trace(model, inputs_for((2, 9, 9))[:4]).save(str(tmp_path / "t.pt"))
    import pytest

    from cmrtool.errors import InputError

    with pytest.raises(InputError, match="training mode"):
        TorchScriptModel(tmp_path / "t.pt")
