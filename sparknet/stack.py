"""What the running interpreter has: the pinned stack's versions and whether the
pyarrow CVE-2023-47248 hotfix is active. Logged at job start; runs on executors too."""

from __future__ import annotations

import importlib.metadata
import platform

PINNED = ("pyspark", "petastorm", "pyarrow", "numpy", "pandas", "torch", "scikit-learn")


def stack_report(_: object = None) -> dict:
    import pyarrow

    import sparknet  # noqa: F401  (installs the hotfix)

    report = {"python": platform.python_version()}
    for name in PINNED:
        report[name] = importlib.metadata.version(name)
    report["pyarrow_hotfix"] = bool(getattr(pyarrow, "_hotfix_installed", False))
    return report
