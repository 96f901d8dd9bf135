"""sparknet: Spark cleaning, PCA and sharding feeding PyTorch DDP training in barrier tasks."""

# pyarrow 12 is pinned for petastorm and carries CVE-2023-47248; the hotfix must be
# active in every interpreter that reads Arrow/Parquet. Importing sparknet installs it,
# and every function shipped to executors lives in this package, so executors get it too.
import pyarrow_hotfix  # noqa: F401

__version__ = "0.1.0"
