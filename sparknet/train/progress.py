"""What the driver shows while the barrier stage trains, and what it keeps afterwards.

Every rank's events (events.py) arrive here: the per-step progress events carry the
rows the rank trained this epoch, its cumulative wait for data and the running train
loss, and rank 0's epoch event carries the epoch's record. From them the driver shows
epoch, step, loss, samples/s, data wait, the last validation metric and an ETA: as a
bar redrawn in place when stderr is a terminal, as a log line every `log_every_s`
otherwise (spark-submit and Airflow keep the log, where a redrawn line is noise).

Afterwards `<run-dir>/train/metrics.jsonl` holds one JSON object per epoch, written as
the epoch ends (so a run that dies keeps the epochs it finished), and a last object
with each rank's throughput; `<run-dir>/train/curves.png` draws loss and validation
metrics per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# A rank this much slower than the median of the others is called a straggler.
STRAGGLER_SHARE = 0.10
# Phases after an epoch's last optimizer step: the step in their events counts
# validation batches, not training steps.
AFTER_STEPS = ("validation", "saving", "done")
BAR_WIDTH = 20
# A bar redrawn on every step of every rank would cost more than the step itself.
REDRAW_S = 0.2
# The validation metric shown, per task: (record key, label).
SHOWN_METRIC = {
    "binary": ("validation_auc", "AUC"),
    "multiclass": ("validation_accuracy", "accuracy"),
    "regression": ("validation_rmse", "RMSE"),
}


class _Rank:
    """What the driver knows of one rank's training."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.host = ""
        self.pid = 0
        self.epoch = -1
        self.steps_done = 0  # optimizer steps finished in `epoch`
        self.loss: float | None = None  # running mean train loss of `epoch` on this rank
        self.samples_per_s: float | None = None
        self.wait_share: float | None = None
        # epoch -> (rows, seconds, data-wait seconds, steps) as last reported in it
        self.epochs: dict[int, tuple[int, float, float, int]] = {}

    def position(self, steps: int) -> float:
        """Epochs done, as a fraction: 2.5 is half way through the third epoch."""
        return self.epoch + self.steps_done / max(steps, 1)


class Progress:
    """Collects the ranks' events (`on_event`, from the event server's reader threads),
    shows them, and writes the run's history; `close` ends the display and returns the
    per-rank summary. Usable as a context manager, which closes it."""

    def __init__(
        self,
        path_dir: Path,
        task: str,
        world_size: int,
        epochs: int,
        steps_per_epoch: int,
        interactive: bool | None = None,
        log_every_s: float = 10.0,
        stream=None,
        earlier: list[dict] | tuple = (),
    ) -> None:
        self.path_dir = Path(path_dir)
        self.task = task
        self.world_size = world_size
        self.epochs = epochs
        self.steps = steps_per_epoch
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive
        self.log_every_s = log_every_s
        self.summary: dict | None = None
        self._ranks: dict[int, _Rank] = {}
        self._lock = threading.Lock()
        self._created = time.monotonic()
        self._started: float | None = None  # the first training step of any rank
        self._first_position = 0.0
        self._shown_at = 0.0
        self._logged_at = self._created
        self._bar_length = 0  # characters of the bar now on screen, 0: none
        self._closed = False
        # A history file left by an earlier launch would read as this run's epochs; a
        # resumed run starts from the epochs its checkpoint holds (`earlier`).
        self.path_dir.mkdir(parents=True, exist_ok=True)
        self.history = [dict(record) for record in earlier]
        self.metrics_path.write_text(
            "".join(json.dumps({"type": "epoch", **r}) + "\n" for r in self.history)
        )

    @property
    def metrics_path(self) -> Path:
        return self.path_dir / METRICS_FILE

    @property
    def curves_path(self) -> Path:
        return self.path_dir / CURVES_FILE

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    # -- events ------------------------------------------------------------------------

    def on_event(self, rank: int, event: dict) -> None:
        kind = event.get("type")
        with self._lock:
            if self._closed:
                return
            state = self._ranks.setdefault(rank, _Rank(rank))
            now = time.monotonic()
            if kind == "hello":
                state.host, state.pid = event.get("host", ""), event.get("pid", 0)
            elif kind == "progress":
                self._progress(state, event, now)
            elif kind == "epoch":
                self._epoch(event, now)
                return
            else:
                return
            self._show(now)

    def _progress(self, state: _Rank, event: dict, now: float) -> None:
        epoch, step, phase = event["epoch"], event["step"], event["phase"]
        if epoch < 0 or epoch < state.epoch:
            return  # before the first epoch (rendezvous), or a late heartbeat
        if self._started is None:
            self._started = now
            self._first_position = float(epoch)
        if epoch > state.epoch:
            state.epoch, state.steps_done, state.loss = epoch, 0, None
        if phase in AFTER_STEPS:
            state.steps_done = self.steps
        elif step >= 0:
            state.steps_done = max(state.steps_done, min(step, self.steps))
        if "rows" in event:
            seconds = max(float(event["seconds"]), 1e-9)
            state.loss = event["loss"]
            state.samples_per_s = event["rows"] / seconds
            state.wait_share = event["wait_s"] / seconds
            state.epochs[epoch] = (
                int(event["rows"]),
                float(event["seconds"]),
                float(event["wait_s"]),
                state.steps_done,
            )

    def _epoch(self, event: dict, now: float) -> None:
        record = {k: v for k, v in event.items() if k not in ("type", "epochs")}
        record["samples_per_s"] = record["samples"] / max(record["seconds"], 1e-9)
        record["elapsed_s"] = now - self._created
        self.history.append(record)
        with self.metrics_path.open("a") as out:
            out.write(json.dumps({"type": "epoch", **record}) + "\n")
        self._clear_bar()
        # The same words as before this module existed: users grep for them.
        from sparknet.train.worker import validation_summary

        log.info(
            "epoch %d/%d: train loss %.4f, %s, %d samples at %.0f/s (%.1f s, %.1f s waiting "
            "for data), lr %.3g",
            record["epoch"] + 1,
            self.epochs,
            record["train_loss"],
            validation_summary(self.task, record),
            record["samples"],
            record["samples_per_s"],
            record["seconds"],
            record["data_wait_seconds"],
            record["learning_rate"],
        )
        self._show(now, force=True)

    # -- what is shown -----------------------------------------------------------------

    def _show(self, now: float, force: bool = False) -> None:
        if self.interactive:
            if force or now - self._shown_at >= REDRAW_S:
                self._shown_at = now
                self._draw(self.status(now, bar=True))
        elif now - self._logged_at >= self.log_every_s:
            self._logged_at = now
            log.info("%s", self.status(now))

    def status(self, now: float | None = None, bar: bool = False) -> str:
        """One line: where training is, how fast, and how long it still needs."""
        now = time.monotonic() if now is None else now
        trained = [s for s in self._ranks.values() if s.epoch >= 0]
        if not trained:
            return (
                f"starting: {len(self._ranks)}/{self.world_size} ranks connected, "
                f"{now - self._created:.0f} s"
            )
        # The rank furthest behind: every other rank waits for it at the next step.
        behind = min(trained, key=lambda s: s.position(self.steps))
        epoch = min(behind.epoch, self.epochs - 1)
        done = behind.steps_done
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        if bar:
            filled = round(BAR_WIDTH * done / max(self.steps, 1))
            parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
        parts.append(f"step {done}/{self.steps}")
        eta = self._eta(now, min(s.position(self.steps) for s in trained))
        if eta is not None:
            # Before the details: a narrow terminal cuts the line's end.
            parts[-1] += f", ETA {_duration(eta)}"
        text = " ".join(parts)
        details = []
        if behind.loss is not None:
            details.append(f"loss {behind.loss:.4f}")
        rates = [s.samples_per_s for s in trained if s.samples_per_s is not None]
        if rates:
            details.append(f"{sum(rates):,.0f} samples/s")
        waits = [s.wait_share for s in trained if s.wait_share is not None]
        if waits:
            details.append(f"data wait {max(waits):.0%}")
        if self.history:
            key, label = SHOWN_METRIC[self.task]
            last = self.history[-1]
            if key in last:
                details.append(f"val {label} {last[key]:.4f}")
        return text + (": " + ", ".join(details) if details else "")

    def _eta(self, now: float, position: float) -> float | None:
        """Seconds left at the pace so far, validation included; early stopping can
        only make it shorter."""
        done = position - self._first_position
        if self._started is None or done <= 0:
            return None
        return (now - self._started) * (self.epochs - position) / done

    def _draw(self, text: str) -> None:
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns - 1
        except (AttributeError, OSError, ValueError):
            width = len(text)  # not a terminal: nothing wraps
        # A line longer than the terminal wraps, and '\r' then rewrites only its tail.
        text = text[:width]
        pad = max(self._bar_length - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._bar_length = len(text)

    def _clear_bar(self) -> None:
        if self.interactive and self._bar_length:
            self.stream.write("\r" + " " * self._bar_length + "\r")
            self.stream.flush()
            self._bar_length = 0

    # -- the end -------------------------------------------------------------------------

    def close(self, ok: bool) -> dict:
        """Ends the bar's line, logs and returns each rank's throughput, names the
        slowest rank, and writes the last metrics line and the curves."""
        with self._lock:
            if self._closed:
                return self.summary or {}
            self._closed = True
            if self.interactive and self._bar_length:
                self.stream.write("\n")
                self.stream.flush()
                self._bar_length = 0
            self.summary = rank_summary(self._ranks, self.world_size)
            with self.metrics_path.open("a") as out:
                out.write(json.dumps({"type": "ranks", "ok": ok, **self.summary}) + "\n")
            _log_summary(self.summary, ok)
            if self.history:
                try:
                    write_curves(self.curves_path, self.task, self.history)
                except Exception:  # a plot must not hide the training's own outcome
                    log.warning("could not draw %s", self.curves_path, exc_info=True)
            return self.summary


def rank_summary(ranks: dict[int, _Rank], world_size: int) -> dict:
    """Per rank: rows, steps, seconds and data wait summed over epochs, samples/s; and
    the slowest rank against the median of the others."""
    rows = []
    for rank in range(world_size):
        state = ranks.get(rank, _Rank(rank))
        n, seconds, wait, steps = (sum(v[i] for v in state.epochs.values()) for i in range(4))
        rows.append(
            {
                "rank": rank,
                "host": state.host,
                "pid": state.pid,
                "epochs": len(state.epochs),
                "steps": steps,
                "rows": n,
                "seconds": seconds,
                "data_wait_seconds": wait,
                "samples_per_s": n / seconds if seconds > 0 else None,
                "data_wait_share": wait / seconds if seconds > 0 else None,
            }
        )
    summary = {"ranks": rows, "slowest_rank": None, "slower_than_median": None}
    measured = [r for r in rows if r["samples_per_s"] is not None]
    if len(measured) >= 2:
        slowest = min(measured, key=lambda r: r["samples_per_s"])
        median = statistics.median(
            r["samples_per_s"] for r in measured if r["rank"] != slowest["rank"]
        )
        summary.update(
            slowest_rank=slowest["rank"],
            median_samples_per_s=median,
            slower_than_median=1 - slowest["samples_per_s"] / median,
        )
    summary["straggler"] = (summary["slower_than_median"] or 0.0) > STRAGGLER_SHARE
    return summary


def _log_summary(summary: dict, ok: bool) -> None:
    for r in summary["ranks"]:
        if r["samples_per_s"] is None:
            log.info("rank %d: no training step reported", r["rank"])
            continue
        log.info(
            "rank %d: %.0f samples/s, %.0f%% of the time waiting for data, %d steps, "
            "%d rows in %.1f s",
            r["rank"],
            r["samples_per_s"],
            100 * r["data_wait_share"],
            r["steps"],
            r["rows"],
            r["seconds"],
        )
    slowest = summary["slowest_rank"]
    if slowest is None:
        return
    r = summary["ranks"][slowest]
    where = f" (pid {r['pid']} on {r['host']})" if r["host"] else ""
    share = summary["slower_than_median"]
    if summary["straggler"]:
        log.warning(
            "rank %d%s is the slowest: %.0f samples/s, %.0f%% below the median of the "
            "other ranks (%.0f/s)%s",
            slowest,
            where,
            r["samples_per_s"],
            100 * share,
            summary["median_samples_per_s"],
            "" if ok else "; training failed",
        )
    else:
        log.info(
            "ranks within %.0f%% of each other's speed (slowest: rank %d, %.0f%% below the "
            "median of the others)",
            100 * STRAGGLER_SHARE,
            slowest,
            100 * max(share, 0.0),
        )


def write_curves(path: Path, task: str, history: list[dict]) -> None:
    """Train and validation loss per epoch (left), the validation metrics (right)."""
    # Imported here: executors import the train package and never draw.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] + 1 for r in history]
    fig = Figure(figsize=(9, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["validation_loss"] for r in history], marker="o", label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss" + (" (standardised MSE)" if task == "regression" else ""))
    loss_ax.set_title("loss")
    loss_ax.legend()
    names = {
        "validation_accuracy": "accuracy",
        "validation_auc": "ROC AUC",
        "validation_rmse": "RMSE (target unit)",
    }
    for key, label in names.items():
        if key in history[0]:
            metric_ax.plot(epochs, [r[key] for r in history], marker="o", label=label)
    metric_ax.set_xlabel("epoch")
    metric_ax.set_title("validation")
    metric_ax.legend()
    for ax in (loss_ax, metric_ax):
        # Whole epochs only: a run of two epochs would otherwise get ticks at 1.25, 1.5...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
