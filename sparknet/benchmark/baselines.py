"""What sparknet is compared with, each written the way its own documentation teaches:

- `distributor_train`: the function PySpark's TorchDistributor runs in every process,
  given the training rows as a pandas DataFrame collected on the driver with toPandas
  (the usual way to feed it), with the same network, optimizer and batch size as
  sparknet and DistributedDataParallel over gloo.
- `pandas_preprocess`: clean + features + PCA + shard for the flights config on one
  machine with pandas and scikit-learn, step for step what the Spark stages do (typed
  parsing, range and null rejects, exact duplicates, the joins, the derived columns,
  the hash split, median fill, out-of-fold target encoding, one-hot, standardising,
  PCA to 95% of the variance, float32 Parquet with the same row groups). It is
  specific to conf/flights.yaml: the derived columns are the config's SQL rewritten in
  pandas.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd


def distributor_train(
    pdf: pd.DataFrame, spec: dict, epochs: int, batch_size: int, lr: float, seed: int
) -> dict:
    """Runs inside each torchrun process that TorchDistributor starts."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sparknet.train.model import ModelSpec, build_mlp, task_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_spec = ModelSpec(**spec)
    # DataFrame -> tensors: every process holds every row.
    x = torch.from_numpy(pdf[model_spec.columns].to_numpy(dtype=np.float32))
    y = torch.from_numpy(pdf["label"].to_numpy(dtype=np.float32))
    torch.manual_seed(seed)
    model = build_mlp(model_spec)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(y)
    # DistributedSampler's contract: a seeded permutation per epoch, padded so that every
    # process gets the same number of rows, dealt round-robin.
    per_rank = -(-n // world)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        order = torch.cat([order, order[: per_rank * world - n]])[rank::world]
        ddp.train()
        for start in range(0, per_rank, batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = task_loss(model_spec, ddp(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    # torch 2.13's gloo can abort the process at teardown ("terminate called without an
    # active exception") while DDP still holds the process group; a plain
    # destroy_process_group() did, once in our first quiet run. The train stage's own
    # teardown (worker.py, NOTE [gloo teardown]) avoids it, and the comparison is of
    # the data path, not of that bug: TorchDistributor's ranks get it too.
    from sparknet.train.worker import shut_down

    ddp = optimizer = model = None
    shut_down(60.0)
    return {"rank": rank, "train_seconds": seconds, "rows": n}


# ---------------------------------------------------------------------------------------
# pandas + scikit-learn preprocessing


def _read_source(raw: Path, source) -> pd.DataFrame:
    path = raw / source.path
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    dtypes = {
        "int": "Int64",
        "long": "Int64",
        "double": "float64",
        "float": "float64",
        "string": "string",
        "timestamp": "string",
        "date": "string",
        "boolean": "boolean",
    }
    types = {name: dtypes[column.type] for name, column in source.columns.items()}
    frames = [
        pd.read_csv(f, na_values=source.null_values, keep_default_na=False, dtype=types)
        for f in files
    ]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    # The clean stage's rules: nulls where not allowed, values out of range.
    keep = pd.Series(True, index=df.index)
    for name, column in source.columns.items():
        if not column.nullable:
            keep &= df[name].notna()
        if column.min is not None:
            keep &= ~(df[name] < column.min).fillna(False)
        if column.max is not None:
            keep &= ~(df[name] > column.max).fillna(False)
    df = df[keep].drop_duplicates()
    if source.key:
        # Rows sharing a key but differing elsewhere: all of them are rejected.
        df = df[~df.duplicated(subset=source.key, keep=False)]
    return df


def _hash_bucket(df: pd.DataFrame, columns: list[str], salt: int, buckets: int) -> np.ndarray:
    hashed = pd.util.hash_pandas_object(df[columns], index=False, hash_key=f"{salt:016d}")
    return (hashed.to_numpy() % np.uint64(buckets)).astype(np.int64)


def _flights_derived(df: pd.DataFrame) -> pd.DataFrame:
    """conf/flights.yaml's features.derived, in pandas."""
    date = pd.to_datetime(
        pd.DataFrame({"year": df["year"], "month": df["month"], "day": df["day"]}).astype(int)
    )
    day_of_year = date.dt.dayofyear
    out = df.assign(
        # Spark's dayofweek: 1 = Sunday ... 7 = Saturday.
        day_of_week=(date.dt.dayofweek + 1) % 7 + 1,
        day_of_year=day_of_year,
        sched_dep_minutes=(df["sched_dep_time"] // 100) * 60 + df["sched_dep_time"] % 100,
        sched_arr_minutes=(df["sched_arr_time"] // 100) * 60 + df["sched_arr_time"] % 100,
    )
    doy = day_of_year.astype(str)
    out["date_key"] = doy
    out["date_origin"] = doy + "_" + df["origin"].astype(str)
    out["date_hour_band"] = doy + "_" + (df["hour"] // 4).astype(str)
    return out


def _target_encode(
    train: pd.DataFrame,
    others: list[pd.DataFrame],
    column: str,
    label: str,
    strength: float,
    folds: np.ndarray,
    n_folds: int,
):
    """m-estimate encoding: train rows out of fold, the other frames with the full train
    split's table; categories unseen in train get the prior."""
    y = train[label].to_numpy(dtype=np.float64)
    prior = y.mean()
    stats = train.groupby(column, observed=True)[label].agg(["sum", "count"])
    full = (stats["sum"] + strength * prior) / (stats["count"] + strength)
    encoded_others = [o[column].map(full).astype(float).fillna(prior).to_numpy() for o in others]
    in_train = np.empty(len(train))
    keys = train[column].to_numpy()
    for fold in range(n_folds):
        inside = folds == fold
        rest = train[~inside]
        fold_prior = rest[label].mean()
        s = rest.groupby(column, observed=True)[label].agg(["sum", "count"])
        table = (s["sum"] + strength * fold_prior) / (s["count"] + strength)
        in_train[inside] = (
            pd.Series(keys[inside]).map(table).astype(float).fillna(fold_prior).to_numpy()
        )
    return in_train, encoded_others


def pandas_preprocess(raw: Path, out: Path, config) -> dict:
    """conf/flights.yaml's clean, features and shard stages on one machine. Returns rows
    per split, PCA k and seconds per step."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyarrow_hotfix  # noqa: F401
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = now - clock
        clock = now

    raw = Path(raw)
    sources = {name: _read_source(raw, src) for name, src in config.sources.items()}
    df = sources[config.main]
    for join in config.joins:
        lookup = sources[join.source][[*join.on, *join.select]].rename(columns=join.select)
        df = df.merge(lookup, on=join.on, how="left")
    label = config.label.name
    needed = df[config.label.requires].notna().all(axis=1)
    df = df[needed].copy()
    df[label] = df.eval(config.label.expr).astype(float)
    lap("clean")

    feats = config.features
    df = _flights_derived(df)
    split_bucket = _hash_bucket(df, config.split.key, config.split.seed, 10_000)
    test_cut = round(config.split.test * 10_000)
    validation_cut = test_cut + round(config.split.validation * 10_000)
    split = np.where(
        split_bucket < test_cut,
        "test",
        np.where(split_bucket < validation_cut, "validation", "train"),
    )
    parts = {
        name: df[split == name].reset_index(drop=True) for name in ("train", "validation", "test")
    }
    train = parts["train"]
    numeric = [c for c in feats.numeric if train[c].notna().any() and train[c].nunique() > 1]
    medians = train[numeric].astype(float).median()
    categorical = list(feats.categorical)
    encoded_columns = list(feats.target_encoded)
    folds = _hash_bucket(
        train, config.split.key, config.split.seed + 1, feats.target_encoding.folds
    )
    encodings = {name: [] for name in parts}
    for column in encoded_columns:
        in_train, (in_val, in_test) = _target_encode(
            train,
            [parts["validation"], parts["test"]],
            column,
            label,
            feats.target_encoding.strength,
            folds,
            feats.target_encoding.folds,
        )
        encodings["train"].append(in_train)
        encodings["validation"].append(in_val)
        encodings["test"].append(in_test)
    onehot = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float64)
    onehot.fit(train[categorical].astype(str).fillna("__missing__"))

    def assemble(frame: pd.DataFrame) -> np.ndarray:
        values = frame[numeric].astype(float).fillna(medians).to_numpy()
        cats = onehot.transform(frame[categorical].astype(str).fillna("__missing__"))
        return np.hstack([values, cats])

    matrices = {name: assemble(frame) for name, frame in parts.items()}
    scaler = StandardScaler().fit(matrices["train"])
    # Columns constant on train (a one-hot slot seen only outside it) have scale 1.
    pca = PCA(n_components=config.pca.variance, svd_solver="full")
    pca.fit(scaler.transform(matrices["train"]))
    encoded_scaler = StandardScaler().fit(np.column_stack(encodings["train"]))
    lap("features")

    out = Path(out)
    k = pca.n_components_
    rows = {}
    for name, frame in parts.items():
        components = pca.transform(scaler.transform(matrices[name]))
        extra = encoded_scaler.transform(np.column_stack(encodings[name]))
        values = np.hstack([components, extra]).astype(np.float32)
        # A seeded hash order, then dense ids, as the shard stage writes them.
        order = np.argsort(
            _hash_bucket(frame, config.split.key, config.split.seed, 2**62), kind="stable"
        )
        columns = {
            "sample_id": pa.array(np.arange(len(frame), dtype=np.int64)),
            "label": pa.array(frame[label].to_numpy(np.float32)[order]),
        }
        for i in range(values.shape[1]):
            columns[f"pc_{i:03d}"] = pa.array(values[order, i])
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(columns),
            out / name / "part-00000.parquet",
            row_group_size=config.shard.rows_per_row_group,
            compression="snappy",
        )
        rows[name] = len(frame)
    lap("shard")
    return {
        "rows_by_split": rows,
        "k": int(k),
        "n_features_out": int(k) + len(encoded_columns),
        "seconds": seconds,
    }
