"""The driver's progress display and history, fed synthetic rank events (no Spark)."""

import io
import json
import logging
import re
import threading
import time

import numpy as np
import pytest

from conftest import epoch_record
from sparknet.train.events import EventClient, EventServer, RankState
from sparknet.train.progress import Progress

STEPS, EPOCHS, BATCH = 4, 2, 64
# Seconds per step: rank 1 takes twice as long, most of it waiting for data.
STEP_S = {0: 0.01, 1: 0.02}
WAIT_S = {0: 0.001, 1: 0.012}


def epoch_event(epoch: int) -> dict:
    """Rank 0's end of epoch: both ranks' rows, in 0.1 s."""
    return {"type": "epoch", "epochs": EPOCHS, **epoch_record(epoch, 2 * STEPS * BATCH, 0.1)}


def feed(progress: Progress, stop_after_epoch: int = EPOCHS) -> None:
    """What two ranks send: hello, one progress event per step with the epoch's stats
    so far, the validation phase, rank 0's epoch record, and done."""
    for rank in (0, 1):
        progress.on_event(rank, {"type": "hello", "rank": rank, "host": "h", "pid": 100 + rank})
        progress.on_event(
            rank, {"type": "progress", "epoch": -1, "step": -1, "phase": "rendezvous"}
        )
    for epoch in range(stop_after_epoch):
        for step in range(STEPS):
            for rank in (0, 1):
                done = step + 1
                progress.on_event(
                    rank,
                    {
                        "type": "progress",
                        "epoch": epoch,
                        "step": done,
                        "phase": "read",
                        "rows": done * BATCH,
                        "seconds": done * STEP_S[rank],
                        "wait_s": done * WAIT_S[rank],
                        "loss": 0.8 - 0.2 * epoch - 0.01 * step,
                    },
                )
        for rank in (0, 1):
            progress.on_event(
                rank, {"type": "progress", "epoch": epoch, "step": 0, "phase": "validation"}
            )
        progress.on_event(0, epoch_event(epoch))
    for rank in (0, 1):
        progress.on_event(
            rank,
            {"type": "progress", "epoch": stop_after_epoch - 1, "step": STEPS, "phase": "done"},
        )


def make(tmp_path, **kwargs) -> Progress:
    return Progress(tmp_path / "train", "binary", 2, EPOCHS, STEPS, **kwargs)


def test_log_lines_history_and_straggler(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    progress = make(tmp_path, interactive=False, log_every_s=0.0)
    feed(progress)
    summary = progress.close(ok=True)

    lines = [r.getMessage() for r in caplog.records]
    # A periodic line mid-epoch: epoch, step/steps, loss, samples/s, data wait, ETA.
    mid = next(line for line in lines if line.startswith("epoch 1/2 step 2/4, ETA "))
    assert re.search(r"ETA \d+ s: loss 0\.7900, [\d,]+ samples/s, data wait 60%$", mid), mid
    # After the first epoch the validation metric is shown too.
    assert any(line.startswith("epoch 2/2 step 1/4") and "val AUC 0.8500" in line for line in lines)
    # The epoch lines, as before.
    assert sum(line.startswith("epoch 1/2: train loss 0.7000") for line in lines) == 1
    assert sum(line.startswith("epoch 2/2: train loss 0.6000") for line in lines) == 1

    # Rank 1 ran at half the rate of rank 0: named, with how much slower.
    assert summary["slowest_rank"] == 1 and summary["straggler"] is True
    assert summary["slower_than_median"] == pytest.approx(0.5)
    by_rank = {r["rank"]: r for r in summary["ranks"]}
    assert by_rank[0]["samples_per_s"] == pytest.approx(BATCH / STEP_S[0])
    assert by_rank[1]["data_wait_share"] == pytest.approx(0.6)
    assert by_rank[1]["steps"] == EPOCHS * STEPS and by_rank[1]["rows"] == EPOCHS * STEPS * BATCH
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.getMessage().startswith("rank 1 (pid 101 on h) is the slowest: 3200 samples/s")
    assert "50% below the median" in warning.getMessage()
    assert any(line.startswith("rank 0: 6400 samples/s, 10% ") for line in lines)

    records = [json.loads(line) for line in progress.metrics_path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["epoch", "epoch", "ranks"]
    assert [r["epoch"] for r in records[:2]] == [0, 1]
    assert records[1]["validation_auc"] == pytest.approx(0.88)
    assert records[0]["samples_per_s"] == pytest.approx(2 * STEPS * BATCH / 0.1)
    assert records[2]["ok"] is True and records[2]["slowest_rank"] == 1

    import matplotlib.image

    pixels = matplotlib.image.imread(progress.curves_path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert np.std(pixels[..., :3]) > 0.05  # lines and text, not a blank canvas


def test_bar_redraws_one_line_on_a_terminal(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sparknet")
    stream = io.StringIO()
    progress = make(tmp_path, interactive=True, stream=stream)
    feed(progress)
    progress.close(ok=True)

    text = stream.getvalue()
    frames = [f.strip() for f in text.split("\r") if f.strip()]
    assert frames, text
    # Redraws are throttled, but the first event and an epoch's end always draw.
    assert frames[0].startswith("starting: 1/2 ranks connected")
    assert any(f.startswith("epoch 1/2 [####################] step 4/4, ETA") for f in frames)
    last = frames[-1]
    assert last.startswith("epoch 2/2 [####################] step 4/4, ETA 0 s: loss "), last
    assert "samples/s" in last and "val AUC 0.8800" in last
    assert text.endswith("\n") and text.count("\n") == 1  # the bar's one line, ended
    # Periodic log lines are for logs, not terminals; epoch lines go to both.
    lines = [r.getMessage() for r in caplog.records]
    assert not any(re.match(r"epoch \d/\d step", line) for line in lines)
    assert sum(line.startswith("epoch ") and "train loss" in line for line in lines) == 2


def test_a_failed_run_keeps_the_epochs_it_finished(tmp_path):
    progress = make(tmp_path, interactive=False)
    feed(progress, stop_after_epoch=1)
    summary = progress.close(ok=False)
    records = [json.loads(line) for line in progress.metrics_path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["epoch", "ranks"] and records[1]["ok"] is False
    assert progress.curves_path.stat().st_size > 0
    assert summary["ranks"][0]["epochs"] == 1
    # Late events after close are dropped, not drawn or written.
    progress.on_event(0, epoch_event(1))
    assert len(progress.metrics_path.read_text().splitlines()) == 2


def test_a_rank_that_never_trained_is_reported_without_rates(tmp_path):
    progress = Progress(tmp_path, "regression", 2, 3, 10, interactive=False)
    progress.on_event(0, {"type": "hello", "rank": 0, "host": "h", "pid": 1})
    assert progress.status().startswith("starting: 1/2 ranks connected")
    summary = progress.close(ok=False)
    assert summary["slowest_rank"] is None and summary["straggler"] is False
    assert all(r["samples_per_s"] is None for r in summary["ranks"])
    assert not progress.curves_path.exists()


def test_a_failing_listener_does_not_drop_the_rank(caplog):
    def broken(rank, event):
        raise KeyError("a display bug")

    with EventServer("127.0.0.1", 1, listener=broken) as server:
        client = EventClient(server.address, server.token, 0, timeout_s=5)
        client.at(0, 1, "read", rows=3)
        client.close(done=True)
        deadline = time.monotonic() + 5
        while not server.snapshot().get(0, RankState(0)).done and time.monotonic() < deadline:
            time.sleep(0.05)
        state = server.snapshot()[0]
    assert state.done and state.phase == "done"
    assert server.listener is None
    assert "progress display failed" in caplog.text


def test_the_driver_hears_a_vanished_rank_out_before_it_says_why():
    """Spark can fail the job (an executor lost) before the lost rank's connection
    drops: the diagnosis waits for the ranks to end rather than say nothing."""
    with EventServer("127.0.0.1", 2) as server:
        clients = [EventClient(server.address, server.token, r, timeout_s=5) for r in (0, 1)]
        for client in clients:
            client.at(0, 3, "allreduce")
        deadline = time.monotonic() + 5
        while len(server.snapshot()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.diagnosis() == ""  # both alive, in a collective: nothing to tell yet

        for delay, client in ((0.5, clients[1]), (1.0, clients[0])):
            threading.Timer(delay, client.close, kwargs={"done": False}).start()
        server.wait_until_ended(within_s=30)
        assert all(s.closed for s in server.snapshot().values())
        assert server.diagnosis().startswith("rank 1 (pid ")
        assert "exited without an error at epoch 0 step 3" in server.diagnosis()
