"""What `python -m sparknet.package` builds for spark-submit (the zip is shipped to a
real cluster in tests/test_cluster.py)."""

import subprocess
import sys
import zipfile
from pathlib import Path

from sparknet.package import build_zip, leave_out


def test_the_zip_holds_the_package_and_is_the_same_on_every_build(tmp_path):
    first = build_zip(tmp_path / "a")
    second = build_zip(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    names = zipfile.ZipFile(first).namelist()
    assert "sparknet/__init__.py" in names and "sparknet/train/worker.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_sparknet_imports_from_the_zip(tmp_path):
    target = build_zip(tmp_path / "dist")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(target)!r})\n"
            "import sparknet.train.launcher, sparknet\nprint(sparknet.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(target / "sparknet" / "__init__.py")


def test_the_environment_archive_leaves_out_the_editable_hooks_and_activate_scripts():
    venv = Path("/venv")
    site = venv / "lib" / "python3.11" / "site-packages"
    assert leave_out(site / "__editable__.sparknet-0.1.0.pth", venv, site)
    assert leave_out(site / "__editable___sparknet_0_1_0_finder.py", venv, site)
    assert leave_out(site / "__pycache__" / "__editable___sparknet_0_1_0_finder.pyc", venv, site)
    assert leave_out(venv / "bin" / "activate.fish", venv, site)
    assert not leave_out(venv / "bin" / "python3.11", venv, site)
    assert not leave_out(site / "torch" / "__init__.py", venv, site)
    assert not leave_out(site / "distutils-precedence.pth", venv, site)
