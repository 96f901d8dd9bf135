"""How the weights move: the optimizer, the learning rate per step, the penalties added
to the loss, gradient clipping, early stopping, and the validation AUC it may watch.

Every rank builds the same objects from the same TrainConfig; none of them talks to the
other ranks, so each is a plain function or class a test calls without Spark.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sparknet.config import EarlyStoppingConfig, TrainConfig
from sparknet.errors import TrainingError

# The metric's direction: True where a lower value is better.
LOWER_IS_BETTER = {
    "validation_loss": True,
    "validation_rmse": True,
    "validation_accuracy": False,
    "validation_auc": False,
}


def weight_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The Linear layers' weight matrices: what weight decay and the l1/l2 penalties
    shrink. A DistributedDataParallel wrapper is looked through."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def make_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Decay pulls a parameter towards 0. For a weight matrix that limits how strongly the
    # layer reacts to its inputs; a bias or batch norm's shift and scale only place and
    # size a unit's output, and pulling them to 0 (a scale of 0 silences the unit) costs
    # fit without making the function any smoother. So they form a group without decay.
    decayed = {id(p) for p in weight_matrices(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": train.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    lr = train.learning_rate
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum)
    if train.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=train.momentum)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise TrainingError(f"train.optimizer: '{train.optimizer}' is not a known optimizer")


class LearningRateFactor:
    """The learning rate at optimizer step `step` (from 0), as a multiple of
    train.learning_rate: the schedule, scaled by a warm-up ramp of (step + 1) /
    warmup_steps over the first warmup_steps steps.

    The ramp starts at 1 / warmup_steps rather than 0, so that the first step already
    moves the weights. It multiplies the schedule instead of replacing it, so the rate
    stays continuous where warm-up outlasts the step schedule's first decay. The cosine
    runs from the first step after warm-up to the last step, `total_steps - 1`, which
    gets min_learning_rate exactly; steps beyond it stay there.

    Plain attributes only: LambdaLR stores them in its state_dict, and a checkpoint holds
    nothing but numbers.
    """

    def __init__(self, train: TrainConfig, steps_per_epoch: int):
        s = train.schedule
        self.name = s.name
        self.warmup_steps = s.warmup_steps
        self.steps_per_epoch = steps_per_epoch
        self.step_epochs = s.step_epochs
        self.gamma = s.gamma
        self.min_factor = s.min_learning_rate / train.learning_rate
        self.total_steps = train.epochs * steps_per_epoch

    def __call__(self, step: int) -> float:
        ramp = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.name == "step":
            epoch = step // self.steps_per_epoch
            return ramp * self.gamma ** (epoch // self.step_epochs)
        if self.name == "cosine":
            after_warmup = step - self.warmup_steps
            span = self.total_steps - 1 - self.warmup_steps
            if span > 0:
                progress = min(1.0, max(0.0, after_warmup / span))
            else:
                # At most the last step follows warm-up, and the last step ends the cosine.
                progress = 1.0 if after_warmup >= 0 else 0.0
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            return ramp * (self.min_factor + (1.0 - self.min_factor) * cosine)
        return ramp


def make_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Call its step() once after each optimizer.step(); the rate in force at optimizer
    step k is train.learning_rate * LearningRateFactor(k). To resume, load the optimizer's
    state_dict as well as this one's: the rate in force until the next step() is kept in
    the optimizer's parameter groups, this state holds the step count."""
    if steps_per_epoch <= 0:
        raise TrainingError(
            f"the learning-rate schedule needs at least one optimizer step per epoch, got "
            f"steps_per_epoch={steps_per_epoch}: the train split has no rows for this rank"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LearningRateFactor(train, steps_per_epoch))


def penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """l1 * sum|w| + l2 * sum w^2 over the weight matrices, a 0-d tensor to add to the
    loss before backward (under DDP every rank adds the same term, so the averaged
    gradient carries it once). None when both are 0, so the graph stays as it was."""
    if l1 == 0 and l2 == 0:
        return None
    weights = weight_matrices(model)
    total = torch.zeros((), dtype=weights[0].dtype, device=weights[0].device)
    if l1:
        total = total + l1 * torch.stack([w.abs().sum() for w in weights]).sum()
    if l2:
        total = total + l2 * torch.stack([w.square().sum() for w in weights]).sum()
    return total


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """The L2 norm of all gradients together, before clipping; clips them to `max_norm`
    when it is > 0. After DDP's backward the gradients are already averaged across ranks,
    so every rank sees, and clips by, the same global norm. A non-finite norm is returned
    as it is, for the caller to act on."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    return float(norm)


class EarlyStopping:
    """Follows `config.metric` epoch by epoch: remembers the best value and its epoch,
    and says when `patience` epochs in a row have not beaten it by more than min_delta.
    A NaN value never counts as an improvement."""

    def __init__(self, config: EarlyStoppingConfig):
        if config.metric not in LOWER_IS_BETTER:
            raise TrainingError(
                f"train.early_stopping.metric: '{config.metric}' is not one of "
                f"{', '.join(LOWER_IS_BETTER)}"
            )
        self.config = config
        self.lower_is_better = LOWER_IS_BETTER[config.metric]
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.epochs_without_improvement = 0
        self.improved = False

    def _beats_best(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        gain = self.best_value - value if self.lower_is_better else value - self.best_value
        return gain > self.config.min_delta

    def update(self, epoch: int, metrics: dict) -> bool:
        """Records `epoch`'s metrics; True when training should stop now."""
        metric = self.config.metric
        if metric not in metrics:
            raise TrainingError(
                f"train.early_stopping.metric={metric} but epoch {epoch} computed only "
                f"{', '.join(sorted(metrics))}"
            )
        value = float(metrics[metric])
        self.improved = self._beats_best(value)
        if self.improved:
            self.best_value, self.best_epoch = value, epoch
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        patience = self.config.patience
        return patience > 0 and self.epochs_without_improvement >= patience

    def state_dict(self) -> dict:
        return {
            "metric": self.config.metric,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "improved": self.improved,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["metric"] != self.config.metric:
            # A best loss compared against an accuracy would stop at once or never.
            raise TrainingError(
                f"train.early_stopping.metric is {self.config.metric} but the checkpoint "
                f"tracked {state['metric']}; resume with the metric it was trained with"
            )
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.improved = state["improved"]


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the ROC curve: the chance that a random positive row scores above a
    random negative one, a tie counting half. `scores` (n,) any increasing function of the
    positive class's probability (logits avoid the ties float32 sigmoid makes near 0 and
    1); `labels` (n,) 0/1. NaN, not an error, when either class is absent or a score is
    NaN: an epoch's metric is then undefined, and a NaN never counts as an improvement."""
    scores = np.asarray(scores).ravel()
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    # float32 scores stay float32: validation gathers every score on every rank, so the
    # bytes per row here are the memory a rank needs beyond its streaming (benchmark f).
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"binary_auc: {scores.size} scores but {labels.size} labels")
    positive = labels == 1
    if not np.all(positive | (labels == 0)):
        raise ValueError("binary_auc: labels must be 0 or 1")
    n_pos = int(positive.sum())
    n_neg = scores.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
        return float("nan")

    # Rank 1..n by score; a run of equal scores shares the mean of the ranks it spans,
    # which is what makes a positive-negative tie count half.
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    positive_in_order = positive[order]
    del order
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    del ordered
    ends = np.r_[starts[1:], scores.size]
    mean_rank = (starts + 1 + ends) / 2.0
    run = np.repeat(np.arange(starts.size), ends - starts)[positive_in_order]

    # Mann-Whitney: the positives' rank sum less its least possible value counts the
    # (positive, negative) pairs ordered correctly.
    pairs_won = mean_rank[run].sum() - n_pos * (n_pos + 1) / 2.0
    return float(pairs_won / (n_pos * n_neg))
