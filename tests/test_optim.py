"""The optimizer, learning-rate schedule, penalties, clipping, early stopping, AUC, and
the network's layer choices: plain torch and numpy, no Spark."""

import io
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from sparknet import config as config_module
from sparknet.config import EarlyStoppingConfig, ScheduleConfig, TrainConfig
from sparknet.errors import TrainingError
from sparknet.train.model import (
    ACTIVATIONS,
    ModelSpec,
    build_mlp,
    load_model_files,
    model_from_bytes,
    save_model,
    state_to_bytes,
)
from sparknet.train.optim import (
    EarlyStopping,
    binary_auc,
    clip_gradients,
    make_optimizer,
    make_scheduler,
    penalty,
)

LR = 0.1
STEPS_PER_EPOCH = 4


def spec(**fields) -> ModelSpec:
    base = {"columns": ["a", "b", "c"], "hidden": [5, 4], "activation": "relu", "dropout": 0.0}
    return ModelSpec(**{**base, **fields})


def train_config(**fields) -> TrainConfig:
    return TrainConfig(**{"learning_rate": LR, "epochs": 3, **fields})


def tiny_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(16, 3) inputs and a (16, 1) target linear in them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=generator)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]])


def rates(schedule: ScheduleConfig, steps: int, checkpoint: dict | None = None) -> list[float]:
    """The learning rate in force at each of `steps` optimizer steps, from the start or
    from a checkpoint's optimizer and scheduler states."""
    model = nn.Linear(2, 1)
    train = train_config(schedule=schedule)
    optimizer = make_optimizer(train, model)
    scheduler = make_scheduler(optimizer, train, STEPS_PER_EPOCH)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


# --- the network ---------------------------------------------------------------------------


def test_every_configurable_activation_is_built():
    assert set(ACTIVATIONS) == set(config_module.ACTIVATIONS)


def test_batch_norm_sits_between_linear_and_activation_only_when_asked():
    plain = build_mlp(spec(dropout=0.2))
    assert [type(m) for m in plain] == [
        nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
    ]  # fmt: skip
    normed = build_mlp(spec(dropout=0.2, batch_norm=True))
    assert [type(m) for m in normed] == [
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
        nn.Linear,
    ]  # fmt: skip
    # Batch norm's shift replaces the hidden layers' biases; the output layer keeps its own.
    assert [m.bias is None for m in normed if isinstance(m, nn.Linear)] == [True, True, False]


def test_model_json_without_batch_norm_loads_and_a_batch_norm_model_round_trips(tmp_path):
    old = {"columns": ["a", "b", "c"], "hidden": [5, 4], "activation": "tanh", "dropout": 0.0}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.json").write_text(json.dumps(old))
    (tmp_path / "old" / "model.pt").write_bytes(state_to_bytes(build_mlp(ModelSpec(**old))))
    loaded, state = load_model_files(tmp_path / "old")
    assert loaded.batch_norm is False
    model_from_bytes(loaded, state)

    normed = spec(batch_norm=True)
    model = build_mlp(normed)
    model(torch.randn(8, 3))  # training mode: moves the running statistics off 0 and 1
    save_model(tmp_path / "new", normed, state_to_bytes(model))
    loaded, state = load_model_files(tmp_path / "new")
    assert loaded == normed
    restored = model_from_bytes(loaded, state)
    x = torch.randn(6, 3)
    torch.testing.assert_close(restored(x), model.eval()(x), rtol=0, atol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation='swish' is not one of"):
        spec(activation="swish")


@pytest.mark.parametrize("optimizer", config_module.OPTIMIZERS)
@pytest.mark.parametrize("activation", config_module.ACTIVATIONS)
def test_every_optimizer_and_activation_lowers_a_tiny_loss(optimizer, activation):
    torch.manual_seed(0)
    model = build_mlp(spec(activation=activation, batch_norm=True))
    train = train_config(optimizer=optimizer, learning_rate=0.01, weight_decay=0.01)
    opt = make_optimizer(train, model)
    x, y = tiny_problem()

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    before = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < before


# --- optimizer and weight decay ------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, cls",
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_weight_decay_reaches_weight_matrices_only(optimizer, cls):
    model = build_mlp(spec(batch_norm=True))
    opt = make_optimizer(train_config(optimizer=optimizer, weight_decay=0.05), model)
    assert type(opt) is cls
    decayed, free = opt.param_groups
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    assert [id(p) for p in decayed["params"]] == [id(w) for w in weights]
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    # The rest: batch norm's scales and shifts and the output bias, each exactly once.
    rest = {id(p) for p in model.parameters()} - {id(w) for w in weights}
    assert sorted(id(p) for p in free["params"]) == sorted(rest)
    assert all(g["lr"] == LR for g in opt.param_groups)
    if optimizer in ("sgd", "rmsprop"):
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)


def test_a_bias_is_not_decayed():
    """SGD without gradient: a decayed parameter shrinks by lr * decay, the bias stays."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    opt = make_optimizer(train_config(optimizer="sgd", momentum=0.0, weight_decay=0.5), model)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    torch.testing.assert_close(model.weight, torch.full((1, 2), 1.0 - LR * 0.5))
    torch.testing.assert_close(model.bias, torch.ones(1))


# --- learning-rate schedule ----------------------------------------------------------------


def test_constant_with_warm_up_ramps_linearly_then_holds():
    seen = rates(ScheduleConfig(name="constant", warmup_steps=4), 8)
    expected = [LR * (k + 1) / 4 for k in range(4)] + [LR] * 4
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_constant_without_warm_up_is_the_learning_rate():
    assert rates(ScheduleConfig(), 5) == [LR] * 5


def test_step_decays_by_gamma_every_step_epochs():
    schedule = ScheduleConfig(name="step", step_epochs=2, gamma=0.1)
    seen = rates(schedule, 3 * STEPS_PER_EPOCH)
    expected = [LR * 0.1 ** ((k // STEPS_PER_EPOCH) // 2) for k in range(3 * STEPS_PER_EPOCH)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[7] == pytest.approx(LR) and seen[8] == pytest.approx(LR * 0.1)


def test_step_with_warm_up_ramps_towards_the_decayed_rate():
    schedule = ScheduleConfig(name="step", warmup_steps=6, step_epochs=1, gamma=0.5)
    seen = rates(schedule, 8)
    expected = [LR * min(1.0, (k + 1) / 6) * 0.5 ** (k // STEPS_PER_EPOCH) for k in range(8)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_cosine_after_warm_up_ends_at_the_minimum_on_the_last_step():
    schedule = ScheduleConfig(name="cosine", warmup_steps=2, min_learning_rate=0.01)
    total = 3 * STEPS_PER_EPOCH  # 12 steps: 2 of warm-up, then 0..9 of a 9-step cosine
    seen = rates(schedule, total + 2)
    expected = [LR * (k + 1) / 2 for k in range(2)] + [
        0.01 + (LR - 0.01) * 0.5 * (1 + math.cos(math.pi * (k - 2) / (total - 1 - 2)))
        for k in range(2, total)
    ]
    np.testing.assert_allclose(seen[:total], expected, rtol=1e-12)
    assert seen[2] == pytest.approx(LR)
    assert seen[total - 1] == pytest.approx(0.01)
    assert seen[total:] == pytest.approx([0.01, 0.01])  # beyond the last step it stays


def test_cosine_with_warm_up_as_long_as_training_only_ramps():
    schedule = ScheduleConfig(name="cosine", warmup_steps=3 * STEPS_PER_EPOCH)
    seen = rates(schedule, 3 * STEPS_PER_EPOCH)
    np.testing.assert_allclose(seen, [LR * (k + 1) / 12 for k in range(12)], rtol=1e-12)


@pytest.mark.parametrize("name", config_module.SCHEDULES)
def test_a_restored_scheduler_continues_identically(name):
    schedule = ScheduleConfig(name=name, warmup_steps=3, gamma=0.5, min_learning_rate=0.001)
    straight = rates(schedule, 12)

    model = nn.Linear(2, 1)
    train = train_config(schedule=schedule)
    optimizer = make_optimizer(train, model)
    scheduler = make_scheduler(optimizer, train, STEPS_PER_EPOCH)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    # Through torch.save as a checkpoint would, and loadable with weights_only. The rate
    # in force lives in the optimizer's state; the scheduler's holds the step count.
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    assert rates(schedule, 7, checkpoint) == straight[5:]


def test_a_scheduler_needs_a_step_per_epoch():
    optimizer = make_optimizer(train_config(), nn.Linear(2, 1))
    with pytest.raises(TrainingError, match="steps_per_epoch=0"):
        make_scheduler(optimizer, train_config(), 0)


# --- penalty and clipping ------------------------------------------------------------------


def test_penalty_is_l1_and_l2_over_weight_matrices_and_has_gradients():
    model = build_mlp(spec(batch_norm=True))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm1d):
                m.weight.fill_(3.0)  # would change the sums if counted
    weights = [m.weight.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    by_hand = 0.01 * sum(np.abs(w).sum() for w in weights) + 0.2 * sum(
        (w.astype(np.float64) ** 2).sum() for w in weights
    )
    value = penalty(model, 0.01, 0.2)
    assert value.shape == () and value.item() == pytest.approx(by_hand, rel=1e-6)

    value.backward()
    first = model[0].weight
    torch.testing.assert_close(first.grad, 0.01 * first.sign() + 0.4 * first.detach())
    assert model[1].weight.grad is None  # batch norm's scale is not penalised


def test_penalty_is_none_when_off():
    assert penalty(build_mlp(spec()), 0.0, 0.0) is None


def test_clip_gradients_returns_the_norm_before_clipping():
    model = nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[3.0, 0.0]])
    model.bias.grad = torch.tensor([4.0])

    assert clip_gradients(model, 0.0) == pytest.approx(5.0)  # off: measured, untouched
    torch.testing.assert_close(model.bias.grad, torch.tensor([4.0]))

    assert clip_gradients(model, 10.0) == pytest.approx(5.0)  # under the bound: untouched
    torch.testing.assert_close(model.bias.grad, torch.tensor([4.0]))

    assert clip_gradients(model, 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.6, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.8]), atol=1e-5, rtol=0)
    assert clip_gradients(model, 0.0) == pytest.approx(1.0, abs=1e-5)


def test_clip_gradients_without_gradients_is_zero():
    assert clip_gradients(nn.Linear(2, 1), 1.0) == 0.0


# --- early stopping ------------------------------------------------------------------------


def follow(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    metric = stopper.config.metric
    return [stopper.update(epoch, {metric: v, "other": 0.0}) for epoch, v in enumerate(values)]


def test_early_stopping_on_a_loss_wants_it_lower():
    stopper = EarlyStopping(EarlyStoppingConfig("validation_loss", patience=2))
    assert follow(stopper, [1.0, 0.8, 0.9, 0.85]) == [False, False, False, True]
    assert stopper.best_value == 0.8 and stopper.best_epoch == 1 and not stopper.improved


@pytest.mark.parametrize("metric", ["validation_accuracy", "validation_auc"])
def test_early_stopping_on_accuracy_or_auc_wants_it_higher(metric):
    stopper = EarlyStopping(EarlyStoppingConfig(metric, patience=2))
    assert follow(stopper, [0.6, 0.7, 0.65, 0.71, 0.7, 0.7]) == [False] * 5 + [True]
    assert stopper.best_value == 0.71 and stopper.best_epoch == 3


def test_early_stopping_counts_only_gains_above_min_delta():
    stopper = EarlyStopping(EarlyStoppingConfig("validation_rmse", patience=2, min_delta=0.1))
    # 4.95 is within 0.1 of 5.0; 4.85 beats it by 0.15; 4.80 and 4.76 are within 0.1 of 4.85.
    assert follow(stopper, [5.0, 4.95, 4.85, 4.80, 4.76]) == [False] * 4 + [True]
    assert stopper.best_value == 4.85 and stopper.best_epoch == 2

    exact = EarlyStopping(EarlyStoppingConfig("validation_loss", patience=1, min_delta=0.5))
    assert follow(exact, [1.0, 0.5]) == [False, True]  # a gain of exactly min_delta is not one


def test_early_stopping_with_patience_0_never_stops_but_tracks_the_best():
    stopper = EarlyStopping(EarlyStoppingConfig("validation_loss", patience=0))
    assert follow(stopper, [1.0, 2.0, 3.0, 4.0, 0.5]) == [False] * 5
    assert stopper.improved and stopper.best_epoch == 4


def test_a_nan_metric_is_never_an_improvement():
    stopper = EarlyStopping(EarlyStoppingConfig("validation_auc", patience=1))
    assert follow(stopper, [float("nan")]) == [True]
    assert stopper.best_value is None and not stopper.improved


def test_early_stopping_names_a_metric_the_epoch_did_not_compute():
    stopper = EarlyStopping(EarlyStoppingConfig("validation_auc", patience=1))
    with pytest.raises(TrainingError, match="validation_auc.*validation_loss"):
        stopper.update(0, {"validation_loss": 1.0})


def test_early_stopping_state_round_trips():
    config = EarlyStoppingConfig("validation_loss", patience=3, min_delta=0.01)
    straight = EarlyStopping(config)
    values = [1.0, 0.9, 0.95, 0.93, 0.97, 0.99]
    expected = follow(straight, values)

    first = EarlyStopping(config)
    follow(first, values[:3])
    resumed = EarlyStopping(config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    decisions = [resumed.update(e, {"validation_loss": values[e]}) for e in range(3, 6)]
    assert decisions == expected[3:]
    assert resumed.state_dict() == straight.state_dict()

    other = EarlyStopping(EarlyStoppingConfig("validation_rmse"))
    with pytest.raises(TrainingError, match="checkpoint tracked validation_loss"):
        other.load_state_dict(first.state_dict())


# --- AUC -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    labels = (rng.random(n) < 0.3).astype(np.float32)  # float 0/1, as the shards store it
    # Rounded scores: many ties, both within a class and across the two classes.
    scores = np.round(rng.normal(size=n) + labels, 1).astype(np.float32)
    assert binary_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_binary_auc_extremes_and_missing_class():
    labels = np.array([0, 0, 1, 1])
    assert binary_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert binary_auc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert binary_auc(np.ones(4), labels) == 0.5
    assert math.isnan(binary_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert math.isnan(binary_auc(np.array([0.1, float("nan"), 0.2]), np.array([0, 1, 1])))
    with pytest.raises(ValueError, match="0 or 1"):
        binary_auc(np.array([0.1, 0.2]), np.array([0, 2]))
