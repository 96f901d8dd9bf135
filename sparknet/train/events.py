"""What the training ranks tell the driver while the barrier stage runs, and how the
driver decides that the stage is stuck.

A Spark job reports nothing until it ends, and a rank that waits in an allreduce for a
peer that stalled or died waits until the collective times out. So each rank opens one
TCP connection to the driver and streams newline-delimited JSON events over it: a
hello (rank, host, pid), its log records, a heartbeat every second carrying where it
is (epoch, step, phase), the end of each epoch, an error with its traceback, and done.
The driver keeps, per rank, the last position and the moment it last changed, the last
log lines, and whether the connection closed before `done`. From that it tells a rank
that stalled (stuck outside any collective) from the peers that wait for it (inside
one), names a rank that vanished, and shows the failing rank's own traceback instead of
the Py4J error that reaches the driver.

The connection carries a random token from the driver, so that nothing else on the
network can feed events into a run; it binds the address executors already use to
reach the driver (loopback in local mode).
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Phases in which a rank waits for its peers: a rank stuck in one of these is waiting,
# not stalled.
COLLECTIVE_PHASES = ("backward", "allreduce", "rendezvous")
LOG_LINES_KEPT = 40
HEARTBEAT_S = 1.0
SILENT_AFTER_S = 5 * HEARTBEAT_S


@dataclass
class RankState:
    rank: int
    host: str = ""
    pid: int = 0
    python: str = ""  # the rank's interpreter (spark.pyspark.python on a cluster)
    sparknet: str = ""  # where the rank imported sparknet from (a shipped zip on a cluster)
    epoch: int = -1
    step: int = -1
    phase: str = "starting"
    changed_at: float = field(default_factory=time.monotonic)
    heard_at: float = field(default_factory=time.monotonic)  # last message of any kind
    lines: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=LOG_LINES_KEPT)
    )
    error: dict | None = None
    error_at: float = 0.0
    done: bool = False
    closed: bool = False

    def position(self) -> str:
        if self.epoch < 0:
            return f"phase '{self.phase}'"
        return f"epoch {self.epoch} step {self.step}, phase '{self.phase}'"


class EventServer:
    """Driver side: accepts the ranks' connections and keeps their state. `listener`
    is called as listener(rank, event) with every event, the hello without its token
    (from the driver's reader threads)."""

    def __init__(self, host: str, world_size: int, listener=None) -> None:
        self.world_size = world_size
        self.token = secrets.token_hex(16)
        self.listener = listener
        self.ranks: dict[int, RankState] = {}
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self._socket = socket.create_server((host, 0))
        self._socket.settimeout(0.5)
        self.address = (host, self._socket.getsockname()[1])
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="sparknet-events")]
        self._threads[0].start()

    def close(self) -> None:
        self._closing.set()
        self._socket.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> EventServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read(self, conn: socket.socket) -> None:
        state = None
        conn.settimeout(0.5)
        buffer = b""
        with conn:
            while not self._closing.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        return  # not one of ours: drop the connection
                    if state is None:
                        if event.get("token") != self.token or event.get("type") != "hello":
                            return
                        state = self._hello(event)
                    else:
                        self._handle(state, event)
        if state is not None:
            with self._lock:
                state.closed = True
                state.changed_at = time.monotonic()

    def _hello(self, event: dict) -> RankState:
        with self._lock:
            state = self.ranks.setdefault(event["rank"], RankState(event["rank"]))
            state.host, state.pid = event.get("host", ""), event.get("pid", 0)
            state.python, state.sparknet = event.get("python", ""), event.get("sparknet", "")
            state.changed_at = time.monotonic()
        self._tell(state.rank, {k: v for k, v in event.items() if k != "token"})
        return state

    def _handle(self, state: RankState, event: dict) -> None:
        kind = event.get("type")
        with self._lock:
            state.heard_at = time.monotonic()
            if kind == "progress":
                position = (event["epoch"], event["step"], event["phase"])
                if position != (state.epoch, state.step, state.phase):
                    state.epoch, state.step, state.phase = position
                    state.changed_at = time.monotonic()
            elif kind == "log":
                state.lines.append(event["line"])
                position = (event["epoch"], event["step"], event["phase"])
                if position != (state.epoch, state.step, state.phase):
                    state.epoch, state.step, state.phase = position
                    state.changed_at = time.monotonic()
            elif kind == "error":
                state.error = event
                state.error_at = time.monotonic()
            elif kind == "done":
                state.done = True
        self._tell(state.rank, event)
        if kind == "log":
            # Logged again here, under the rank's own logger and with its rank, so the
            # driver's log holds every rank's lines.
            logger = logging.getLogger(event.get("logger") or __name__)
            logger.log(
                event.get("level", logging.INFO), "%s", event["message"], extra={"rank": state.rank}
            )

    def _tell(self, rank: int, event: dict) -> None:
        listener = self.listener
        if listener is None:
            return
        try:
            listener(rank, event)
        except Exception:
            # An exception here would end this reader thread, and the watchdog would
            # then take a healthy rank for one that vanished; a display is not worth it.
            self.listener = None
            log.warning("the training progress display failed; it stops", exc_info=True)

    # -- what the driver concludes ------------------------------------------------------

    def snapshot(self) -> dict[int, RankState]:
        with self._lock:
            return {r: RankState(**vars(s)) for r, s in self.ranks.items()}

    def stalled_for(self) -> float:
        """Seconds since any rank last moved: since launch until every rank said hello,
        then since the most recent change of any rank's position."""
        now = time.monotonic()
        with self._lock:
            if len(self.ranks) < self.world_size:
                return now - self.started_at
            return now - max(s.changed_at for s in self.ranks.values())

    def diagnosis(self, timeout_s: float | None = None) -> str:
        """Why the job failed or hangs, from what the ranks said, most telling first."""
        ranks = self.snapshot()
        if len(ranks) < self.world_size and (timeout_s is not None or not ranks):
            missing = sorted(set(range(self.world_size)) - set(ranks))
            return (
                f"ranks {missing} never reported to the driver within "
                f"{time.monotonic() - self.started_at:.0f} s: the barrier stage did not get "
                f"{self.world_size} task slots at once, or the executors cannot reach the "
                f"driver at {self.address[0]}:{self.address[1]}"
            )
        errors = _errors_in_order(ranks)
        cause = _first_cause(errors)
        if cause is not None:
            return _rank_error(cause)
        lost = [s for s in ranks.values() if s.closed and not s.done and not s.error]
        if lost:
            state = min(lost, key=lambda s: s.changed_at)
            return (
                f"rank {state.rank} (pid {state.pid} on {state.host}) exited without an error "
                f"at {state.position()}; its last lines:\n" + _tail(state)
            )
        now = time.monotonic()
        # A rank whose heartbeat stopped is frozen (stopped, swapping, stuck holding the
        # GIL) whatever phase it last reported; otherwise one outside a collective.
        stuck = [
            s
            for s in ranks.values()
            if not s.done and not s.closed and now - s.heard_at > SILENT_AFTER_S
        ] or [s for s in ranks.values() if s.phase not in COLLECTIVE_PHASES and not s.done]
        if timeout_s is not None and stuck:
            waiting = sorted(
                set(ranks) - {s.rank for s in stuck} - {s.rank for s in ranks.values() if s.done}
            )
            names = "; ".join(
                f"rank {s.rank} (pid {s.pid} on {s.host}) at {s.position()} for "
                f"{now - s.changed_at:.0f} s"
                for s in stuck
            )
            others = f"; ranks {waiting} wait for it in a collective" if waiting else ""
            silent = [s.rank for s in stuck if now - s.heard_at > SILENT_AFTER_S]
            if silent:
                others += f"; ranks {silent} stopped sending heartbeats"
            return (
                f"no progress for {timeout_s:.0f} s (train.timeout_s): {names}{others}; "
                f"last lines of rank {stuck[0].rank}:\n" + _tail(stuck[0])
            )
        if errors:
            return _rank_error(errors[0])
        if timeout_s is not None:
            where = "; ".join(f"rank {s.rank} at {s.position()}" for s in ranks.values())
            return f"no progress for {timeout_s:.0f} s (train.timeout_s): {where}"
        return ""

    def wait_until_ended(self, within_s: float) -> None:
        """Waits, at most `within_s`, until every rank has finished or lost its
        connection. Spark can end the job first (an executor lost: the cluster manager
        tells the driver while the rank's process is still being killed), and a
        diagnosis made then knows nothing of the rank that went."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(s.done or s.closed for s in self.ranks.values()):
                    return
            time.sleep(0.1)

    def retriable(self) -> bool:
        """Whether a relaunch may get further: not when the first rank to fail raised a
        sparknet error (a non-finite loss, shards that changed: it would happen again);
        yes when a rank crashed, vanished or stalled, or Spark failed on its own."""
        cause = _first_cause(_errors_in_order(self.snapshot()))
        return True if cause is None else cause.error.get("show_traceback", True)

    def positions(self) -> dict[int, dict]:
        """Where each rank was: for the record of a failed launch."""
        return {
            r: {"epoch": s.epoch, "step": s.step, "phase": s.phase}
            for r, s in sorted(self.snapshot().items())
        }


def _errors_in_order(ranks: dict[int, RankState]) -> list[RankState]:
    return sorted((s for s in ranks.values() if s.error), key=lambda s: s.error_at)


def _first_cause(errors: list[RankState]) -> RankState | None:
    """The first error is the cause; peers that then lost their connection to it fail
    with gloo errors that say nothing about why."""
    for state in errors:
        if not _is_consequence(state.error["message"]):
            return state
    return None


def _is_consequence(message: str) -> bool:
    """Errors a rank raises because a peer failed, not because of its own problem."""
    lowered = message.lower()
    return any(
        words in lowered
        for words in (
            "connection reset",
            "connection closed by peer",
            "timed out",
            "timeout",
            "broken pipe",
            "socket closed",
            "aborted",
        )
    )


def _rank_error(state: RankState) -> str:
    error = state.error
    where = (
        f" at epoch {error['epoch']} step {error['step']}" if error.get("epoch", -1) >= 0 else ""
    )
    text = f"rank {state.rank} (pid {state.pid} on {state.host}) failed{where}: {error['message']}"
    if error.get("traceback") and error.get("show_traceback", True):
        text += "\n" + error["traceback"].rstrip()
    return text


def _tail(state: RankState) -> str:
    return "\n".join(f"    {line}" for line in state.lines) or "    (none)"


class EventClient:
    """Rank side: one connection to the driver, a heartbeat thread, and a logging
    handler that forwards this rank's records."""

    def __init__(self, address: tuple[str, int], token: str, rank: int, timeout_s: float) -> None:
        self.rank = rank
        self.epoch, self.step, self.phase = -1, -1, "starting"
        self.stats: dict = {}
        self._lock = threading.Lock()
        try:
            self._socket = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            from sparknet.errors import TrainingError

            raise TrainingError(
                f"rank {rank} cannot reach the driver's event port {address[0]}:{address[1]}: "
                f"{exc}; executors must be able to connect to spark.driver.host"
            ) from None
        self._socket.settimeout(timeout_s)
        import os
        import sys

        import sparknet

        self.send(
            type="hello",
            token=token,
            rank=rank,
            host=socket.gethostname(),
            pid=os.getpid(),
            python=sys.executable,
            sparknet=os.path.abspath(os.path.dirname(sparknet.__file__)),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sparknet-beat")
        self._thread.start()

    def send(self, **event) -> None:
        data = (json.dumps(event, default=float) + "\n").encode()
        with self._lock:
            try:
                self._socket.sendall(data)
            except OSError:
                pass  # the driver is gone; Spark is ending this task anyway

    def at(self, epoch: int, step: int, phase: str, **stats) -> None:
        """Where this rank is. A new step is sent at once (one small message per step),
        so a rank that dies between heartbeats is still placed exactly; phase changes
        within a step ride on the next heartbeat. `stats` (the epoch's rows, data wait,
        loss so far, see progress.py) ride along until the next ones or the next epoch."""
        moved = (epoch, step) != (self.epoch, self.step)
        if stats or epoch != self.epoch:
            self.stats = stats
        self.epoch, self.step, self.phase = epoch, step, phase
        if moved:
            self.send(type="progress", epoch=epoch, step=step, phase=phase, **self.stats)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.send(
                type="progress", epoch=self.epoch, step=self.step, phase=self.phase, **self.stats
            )

    def error(self, message: str, traceback_text: str, show_traceback: bool = True) -> None:
        self.send(
            type="error",
            message=message,
            traceback=traceback_text,
            show_traceback=show_traceback,
            epoch=self.epoch,
            step=self.step,
        )

    def close(self, done: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if done:
            self.send(type="progress", epoch=self.epoch, step=self.step, phase="done")
            self.send(type="done")
        with self._lock:
            self._socket.close()

    def handler(self) -> logging.Handler:
        client = self

        class Forward(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    line = self.format(record)
                except Exception:  # a bad format string must not kill training
                    line = record.getMessage()
                client.send(
                    type="log",
                    logger=record.name,
                    level=record.levelno,
                    line=line,
                    message=record.getMessage(),
                    epoch=client.epoch,
                    step=client.step,
                    phase=client.phase,
                )

        return Forward()
