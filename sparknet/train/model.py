"""The network and how it is stored: model.json (architecture, input columns, and what
the outputs mean) next to model.pt (a torch state_dict), so a model loads and its
outputs read correctly without the config that trained it."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparknet.errors import RunDirError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}
TASKS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class ModelSpec:
    columns: list[str]  # input columns, in the order the first layer expects them
    hidden: list[int]
    activation: str
    dropout: float
    # The defaults describe the binary models written before tasks existed, so their
    # model.json still loads.
    task: str = "binary"
    n_outputs: int = 1  # 1 for binary and regression, len(classes) for multiclass
    classes: list[str] = field(default_factory=list)  # multiclass: output i is classes[i]
    # regression: the network predicts (target - target_mean) / target_std, with both
    # taken from the train split; predict() undoes it.
    target_mean: float = 0.0
    target_std: float = 1.0
    # False for every model.json written before batch norm existed.
    batch_norm: bool = False

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(f"inconsistent ModelSpec: {problem}")

    def problem(self) -> str | None:
        if self.activation not in ACTIVATIONS:
            return f"activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
        if self.task not in TASKS:
            return f"task={self.task!r} is not one of {', '.join(TASKS)}"
        if self.task == "multiclass":
            if len(self.classes) < 2 or self.n_outputs != len(self.classes):
                return (
                    f"multiclass needs n_outputs == len(classes) >= 2, got n_outputs="
                    f"{self.n_outputs} and classes={self.classes}"
                )
        elif self.n_outputs != 1 or self.classes:
            return f"task={self.task} needs n_outputs=1 and no classes, got {self.n_outputs}"
        if not (math.isfinite(self.target_mean) and math.isfinite(self.target_std)):
            return f"target_mean={self.target_mean}, target_std={self.target_std} must be finite"
        if self.target_std <= 0:
            return f"target_std must be > 0, got {self.target_std}"
        return None

    @property
    def n_inputs(self) -> int:
        return len(self.columns)


def build_mlp(spec: ModelSpec) -> nn.Sequential:
    """(batch, n_inputs) float32 -> (batch, n_outputs) raw outputs: the positive class's
    logit (binary), one logit per class (multiclass), the standardised target (regression).
    With batch_norm, a forward pass in training mode refuses a batch of one row: it has no
    spread to normalise by."""
    layers: list[nn.Module] = []
    width = spec.n_inputs
    for hidden in spec.hidden:
        # Batch norm subtracts the batch mean right after, which cancels any bias the
        # Linear layer adds: its shift parameter takes the bias's place.
        layers.append(nn.Linear(width, hidden, bias=not spec.batch_norm))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(ACTIVATIONS[spec.activation]())
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, spec.n_outputs))
    return nn.Sequential(*layers)


def task_loss(
    spec: ModelSpec, output: torch.Tensor, label: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The training loss of raw `output` (batch, n_outputs) against `label` (batch,) as
    the shards store it (float: 0/1, class index, or target in its own unit)."""
    if spec.task == "multiclass":
        return F.cross_entropy(output, label.long(), reduction=reduction)
    output = output.squeeze(1)
    if spec.task == "regression":
        # On the standardised scale, so the learning rate means the same for a target
        # in the thousands as for one near 1.
        standard = (label - spec.target_mean) / spec.target_std
        return F.mse_loss(output, standard.to(output.dtype), reduction=reduction)
    return F.binary_cross_entropy_with_logits(output, label.to(output.dtype), reduction=reduction)


def predict(spec: ModelSpec, output: torch.Tensor) -> torch.Tensor:
    """Raw `output` (batch, n_outputs) -> what a user reads: the positive-class
    probability (batch,), a probability per class (batch, n_classes) in `spec.classes`
    order, or the target in its original unit (batch,). float64, so probabilities sum
    to 1 to the precision scikit-learn checks."""
    output = output.double()
    if spec.task == "multiclass":
        return torch.softmax(output, dim=1)
    output = output.squeeze(1)
    if spec.task == "regression":
        return output * spec.target_std + spec.target_mean
    return torch.sigmoid(output)


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
    path = directory / "model.json"
    try:
        spec = ModelSpec(**json.loads(path.read_text()))
    except (TypeError, ValueError) as exc:
        raise RunDirError(f"{path} does not describe a sparknet model: {exc}") from None
    return spec, (directory / "model.pt").read_bytes()
