"""The network and how it is stored: model.json (architecture + input columns) next to
model.pt (a torch state_dict), so a model loads without the config that trained it."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass(frozen=True)
class ModelSpec:
    columns: list[str]  # input columns, in the order the first layer expects them
    hidden: list[int]
    activation: str
    dropout: float

    @property
    def n_inputs(self) -> int:
        return len(self.columns)


def build_mlp(spec: ModelSpec) -> nn.Sequential:
    """(batch, n_inputs) float32 -> (batch, 1) logit of the positive class."""
    layers: list[nn.Module] = []
    width = spec.n_inputs
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[spec.activation]()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def state_to_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def model_from_bytes(spec: ModelSpec, state: bytes) -> nn.Sequential:
    model = build_mlp(spec)
    model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return model.eval()


def save_model(directory: Path, spec: ModelSpec, state: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("model.json", (json.dumps(asdict(spec), indent=2) + "\n").encode()),
        ("model.pt", state),
    ):
        tmp = directory / f"{name}.tmp"
        tmp.write_bytes(content)
        tmp.replace(directory / name)


def load_model_files(directory: Path) -> tuple[ModelSpec, bytes]:
    spec = ModelSpec(**json.loads((directory / "model.json").read_text()))
    return spec, (directory / "model.pt").read_bytes()
