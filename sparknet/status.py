"""Idempotent, atomic stages: staging, commit, status files and the skip decision.

Run through the command line, a stage

1. refuses to start unless each stage it reads from has committed (`_status/<input>.json`)
   and is up to date itself, naming the stage to run first;
2. is skipped, saying why, when its own status records the same config keys (the ones
   it depends on, sparknet/stages.py) and the same inputs, and its outputs are there;
3. otherwise removes what an interrupted run of it left under `_staging/<stage>/`,
   removes its status (its committed outputs are no longer its result), and writes
   its outputs under `_staging/<stage>/`;
4. on success renames each output into place and writes `_status/<stage>.json` last, by
   rename: the commit. A stage killed at any point before leaves no status, so no other
   stage reads what it wrote, and its next run starts over.

The inputs a status records are the sha256 of each input stage's status file, which
holds a random id, so a stage that ran again changes every stage after it; and, for
stages that read the raw files, the names, sizes and modification times of those files.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sparknet
from sparknet.config import Config, key_digests, section_digest
from sparknet.errors import RunDirError
from sparknet.run_dir import OUTPUTS, STATUS_DIR, RunDir, write_json

if TYPE_CHECKING:
    from sparknet.stages import Stage

log = logging.getLogger(__name__)

FORMAT = 1
REPLACED = "_replaced"  # inside a stage's staging folder: its previous outputs, until deleted


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_status(run_dir: RunDir, stage: str) -> dict | None:
    path = run_dir.status(stage)
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Written by rename, so never half; unreadable means damaged by hand.
        log.warning("%s is unreadable; treating %s as not finished", path, stage)
        return None
    return status if isinstance(status, dict) and status.get("format") == FORMAT else None


def status_digest(run_dir: RunDir, stage: str) -> str | None:
    try:
        return hashlib.sha256(run_dir.status(stage).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def config_digests(stage: Stage, config: Config) -> dict[str, str]:
    return key_digests(config, stage.depends_on)


def raw_files(config: Config, run_dir: RunDir) -> dict[str, list]:
    """Every file the sources name, as [size, modification time in ns], by path
    (relative to the run directory when inside it, so a copied or moved run directory
    stays up to date)."""
    from sparknet.clean import source_path

    found: dict[str, list] = {}
    for src in config.sources.values():
        path = source_path(src, run_dir)
        for match in sorted(glob.glob(path)) if glob.has_magic(path) else [path]:
            top = Path(match)
            # Spark skips files whose names start with _ or . in a folder it reads.
            files = (
                [p for p in sorted(top.rglob("*")) if p.is_file() and p.name[0] not in "_."]
                if top.is_dir()
                else [top]
            )
            for file in files:
                try:
                    st = file.stat()
                except FileNotFoundError:
                    continue  # the clean stage names what is missing
                inside = file.is_relative_to(run_dir.root)
                found[str(file.relative_to(run_dir.root) if inside else file)] = [
                    st.st_size,
                    st.st_mtime_ns,
                ]
    return found


def current_inputs(stage: Stage, config: Config, run_dir: RunDir) -> dict[str, str | None]:
    inputs: dict[str, str | None] = {name: status_digest(run_dir, name) for name in stage.inputs}
    if stage.reads_raw:
        listing = json.dumps(raw_files(config, run_dir), sort_keys=True)
        inputs["raw"] = hashlib.sha256(listing.encode()).hexdigest()
    return inputs


def _differences(stage: Stage, status: dict, config: Config, run_dir: RunDir) -> list[str]:
    """Why `status` is not the result of this config and these inputs; empty: it is."""
    found = []
    recorded = status.get("config", {})
    changed = [key for key, d in config_digests(stage, config).items() if recorded.get(key) != d]
    if changed:
        found.append(f"config changed: {', '.join(changed)}")
    was = status.get("inputs", {})
    for name, digest in current_inputs(stage, config, run_dir).items():
        if was.get(name) != digest:
            found.append("the raw files changed" if name == "raw" else f"'{name}' was recomputed")
    missing = [name for name in status.get("outputs", []) if not (run_dir.root / name).exists()]
    if missing:
        found.append(f"outputs missing: {', '.join(missing)}")
    return found


def upstream(stages: dict[str, Stage], stage: Stage) -> list[str]:
    """Every stage `stage` reads from, directly or through another, in pipeline order."""
    found: set[str] = set()
    todo = list(stage.inputs)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(stages[name].inputs)
    return [name for name in stages if name in found]


def stale_reason(
    stages: dict[str, Stage], name: str, config: Config, run_dir: RunDir
) -> str | None:
    """Why the committed outputs of stage `name` are not what this config and its
    current inputs give; None when they are."""
    status = read_status(run_dir, name)
    if status is None:
        return f"it has not finished in {run_dir.root} (no {STATUS_DIR}/{name}.json)"
    return "; ".join(_differences(stages[name], status, config, run_dir)) or None


def check_inputs(stages: dict[str, Stage], stage: Stage, config: Config, run_dir: RunDir) -> None:
    """Refuses to run `stage` on outputs that are missing, half-written or stale, naming
    the first stage up the pipeline that has to run again."""
    for name in upstream(stages, stage):
        why = stale_reason(stages, name, config, run_dir)
        if why:
            command = f"jobs/{name}.py --config CONFIG --run-dir {run_dir.root}"
            raise RunDirError(
                f"{stage.name} needs the outputs of '{name}', but {why}: run the '{name}' "
                f"stage first ({command}) and the ones after it, or jobs/pipeline.py with "
                f"--run-dir {run_dir.root}"
            )


def decide(stage: Stage, config: Config, run_dir: RunDir, forced: bool) -> Decision:
    if forced:
        return Decision(True, "--force")
    status = read_status(run_dir, stage.name)
    if status is None:
        return Decision(True, "no finished run recorded")
    found = _differences(stage, status, config, run_dir)
    if found:
        return Decision(True, "; ".join(found))
    inputs = ", ".join(status.get("inputs", {})) or "none"
    return Decision(
        False,
        f"up to date: finished {status['finished']} in {status['seconds']:.1f} s with the same "
        f"{len(status['config'])} config key(s) and inputs ({inputs}); --force recomputes it",
    )


def remove_leftovers(run_dir: RunDir, stage: str) -> None:
    staging = run_dir.staging(stage)
    if staging.exists():
        shutil.rmtree(staging)
        log.info("removed %s, left by an interrupted or failed run", staging)


def begin(run_dir: RunDir, stage: Stage) -> tuple[RunDir, bool]:
    """Prepares a recompute: returns the staged view and whether a finished run's
    outputs are being replaced."""
    remove_leftovers(run_dir, stage.name)
    status = run_dir.status(stage.name)
    replacing = status.exists()
    # From here on the committed outputs are not this stage's result: a stage reading
    # them must wait for this one to commit.
    status.unlink(missing_ok=True)
    run_dir.staging(stage.name).mkdir(parents=True)
    return run_dir.staged(stage.name), replacing


def record(
    stage: Stage,
    config: Config,
    inputs: dict[str, str | None],
    started: str,
    seconds: float,
    rows: int | None,
    forced: bool,
) -> dict[str, Any]:
    """A stage's status, but for the outputs `commit` adds."""
    return {
        "format": FORMAT,
        # Unique per commit: the status's digest, which later stages record as their
        # input, changes whenever the stage ran again, however fast.
        "id": uuid.uuid4().hex,
        "stage": stage.name,
        "started": started,
        "finished": now_utc(),
        "seconds": round(seconds, 2),
        "rows": rows,
        "forced": forced,
        "config_sha256": section_digest(config, stage.depends_on),
        "config": config_digests(stage, config),
        "inputs": inputs,
        "sparknet_version": sparknet.__version__,
    }


def commit(run_dir: RunDir, entry: dict[str, Any]) -> list[str]:
    """Renames the staged outputs into place, then writes the status (`entry`, from
    `record`, with the outputs): the commit. Returns the committed outputs (relative to
    the run directory)."""
    stage = entry["stage"]
    staging = run_dir.staging(stage)
    committed = []
    for name in OUTPUTS[stage]:
        new, final = staging / name, run_dir.root / name
        if name == "raw":
            # Merged file by file: raw/ may hold the user's own files (or be a link).
            if new.is_dir():
                final.mkdir(parents=True, exist_ok=True)
                for file in sorted(new.iterdir()):
                    os.replace(file, final / file.name)
                    committed.append(f"raw/{file.name}")
            continue
        if final.exists() or final.is_symlink():
            (staging / REPLACED).mkdir(exist_ok=True)
            os.replace(final, staging / REPLACED / name)
        if new.exists():
            os.replace(new, final)
            committed.append(name)
    write_json(run_dir.status(stage), {**entry, "outputs": committed})
    shutil.rmtree(staging)
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    return committed
