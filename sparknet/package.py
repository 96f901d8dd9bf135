"""Builds what spark-submit ships to executors: `python -m sparknet.package [--env]`.

Writes `dist/sparknet-<version>.zip`, the sparknet package alone, for
`spark-submit --py-files`: Spark puts it first on every executor's Python path, so the
executors run the same sparknet as the driver without it being installed on them. The
rest of the stack (torch, pyarrow, petastorm, ...) has compiled parts that cannot be
imported from a zip: it must be installed on the workers, in the interpreter
`spark.pyspark.python` names, or shipped as a packed environment.

With `--env` it also writes `dist/sparknet-env-<version>.tar.gz`: the virtual
environment this command runs in, with sparknet copied in place of an editable
install, for `--archives dist/sparknet-env-<version>.tar.gz#environment` and
executors running `./environment/bin/python` (YARN, Kubernetes). Like any packed
venv, its `bin/python` is a link to the interpreter the venv was made from, so that
Python (same version, same path) must exist on every node.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import sparknet

# A fixed timestamp makes the archive depend on the code alone, so two builds of one
# commit are byte for byte the same.
ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def package_files(source: Path) -> list[Path]:
    """The package's files, without caches or editor leftovers."""
    return sorted(
        path
        for path in source.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc",)
    )


def build_zip(dist: Path) -> Path:
    source = Path(sparknet.__file__).resolve().parent
    if not source.is_dir():
        raise SystemExit(f"sparknet is imported from {source}, not a folder; run from a checkout")
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / f"sparknet-{sparknet.__version__}.zip"
    temporary = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in package_files(source):
            info = zipfile.ZipInfo(f"sparknet/{path.relative_to(source).as_posix()}", ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    temporary.replace(target)
    return target


def build_env(dist: Path) -> Path:
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").exists():
        raise SystemExit(
            f"--env packs a virtual environment, but {sys.executable} is not in one; run "
            "this command with the venv's python (e.g. .venv/bin/python)"
        )
    site = Path(sysconfig.get_paths()["purelib"])
    source = Path(sparknet.__file__).resolve().parent
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / f"sparknet-env-{sparknet.__version__}.tar.gz"
    temporary = target.with_name(target.name + ".tmp")
    with tarfile.open(temporary, "w:gz", compresslevel=1) as archive:
        for folder, dirs, files in os.walk(venv):
            dirs.sort()
            here = Path(folder)
            for name in sorted(files) + [d for d in dirs if (here / d).is_symlink()]:
                path = here / name
                if leave_out(path, venv, site):
                    continue
                archive.add(path, arcname=path.relative_to(venv).as_posix(), recursive=False)
        if not source.is_relative_to(venv):
            # An editable install: its hook points at the checkout, absent on the nodes.
            for path in package_files(source):
                relative = (site / "sparknet" / path.relative_to(source)).relative_to(venv)
                archive.add(path, arcname=relative.as_posix(), recursive=False)
    temporary.replace(target)
    return target


def leave_out(path: Path, venv: Path, site: Path) -> bool:
    """Files of the venv the archive does without: activation scripts (they hold the
    venv's absolute path) and the editable install's hooks."""
    relative = path.relative_to(venv)
    if relative.parts[0] == "bin" and relative.name.lower().startswith("activate"):
        return True
    return path.name.startswith("__editable__") and site in (path.parent, path.parent.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparknet.package",
        description="build dist/sparknet-<version>.zip for spark-submit --py-files",
    )
    parser.add_argument("--dist", default="dist", help="output folder (default: dist)")
    parser.add_argument(
        "--env",
        action="store_true",
        help="also pack this virtual environment into dist/sparknet-env-<version>.tar.gz "
        "for --archives (about 1 GB)",
    )
    args = parser.parse_args(argv)
    print(build_zip(Path(args.dist)))
    if args.env:
        print(build_env(Path(args.dist)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
