"""The installed set works together: a broken environment must fail here, loudly."""

import functools
import importlib.metadata
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from packaging.requirements import Requirement

from sparknet.stack import stack_report
from sparknet.train.data import iterate_rank
from sparknet.train.plan import make_plan, read_row_groups

EXPECTED = {
    "pyspark": "4.0.",
    "petastorm": "0.13.1",
    "pyarrow": "12.0.1",
    "numpy": "1.26.",
    "pandas": "2.2.",
    "torch": "2.13.0",
}


def test_pinned_versions_and_hotfix_on_driver():
    report = stack_report()
    assert report["python"].startswith("3.11.")
    for name, prefix in EXPECTED.items():
        assert report[name].startswith(prefix), (name, report[name])
    assert report["pyarrow_hotfix"] is True


def test_hotfix_refuses_py_extension_type_payloads():
    # CVE-2023-47248: arrow.py_extension_type metadata would be unpickled on read.
    field = pa.field(
        "x",
        pa.int64(),
        metadata={
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps("harmless"),
        },
    )
    table = pa.table({"x": [1, 2]}).cast(pa.schema([field]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    try:
        pa.ipc.open_stream(sink.getvalue()).read_all()
    except RuntimeError as exc:
        assert "Disallowed deserialization" in str(exc)
    else:
        raise AssertionError("pyarrow read an arrow.py_extension_type payload")


def test_hotfix_and_stack_on_executors(spark):
    reports = (
        spark.sparkContext.parallelize(range(2), 2).map(functools.partial(stack_report)).collect()
    )
    driver = stack_report()
    for report in reports:
        assert report == driver


def test_torch_gloo_and_petastorm_read_parquet(tmp_path):
    import torch
    import torch.distributed as dist

    assert dist.is_available() and dist.is_gloo_available()
    assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__

    n = 1000
    table = pa.table(
        {
            "sample_id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array((np.arange(n) % 2).astype(np.float32)),
            "pc_000": pa.array(np.linspace(0, 1, n, dtype=np.float32)),
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=300)
    seen = []
    plan = make_plan(read_row_groups(tmp_path), world_size=1, batch_size=128)
    for ids, x, y in iterate_rank(plan, rank=0, epoch=0, seed=1, columns=["pc_000"]):
        assert x.dtype == np.float32 and x.shape == (len(ids), 1)
        np.testing.assert_array_equal(y, (ids % 2).astype(np.float32))
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(n))


# The one declared requirement the lock breaks on purpose (see its header).
KNOWN_UNMET = {("petastorm", "setuptools")}


def test_every_installed_package_has_what_it_declares():
    """The lock is installed with --no-deps, so nothing else would notice a run-time
    dependency it forgot (mlflow-skinny's, say) until the import fails in a job."""
    unmet = []
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"].lower()
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if (name, req.name.lower()) in KNOWN_UNMET:
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{name} needs {req}, not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name} needs {req}, {have} installed")
    assert not unmet, "\n".join(unmet)


def test_the_mlflow_client_imports():
    import mlflow
    from mlflow.tracking import MlflowClient  # noqa: F401

    assert mlflow.__version__.startswith("3.")
