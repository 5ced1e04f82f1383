"""What `pip install dsvl2` puts on a machine: one import package, `dsvl2`, and nothing else at the top of
site-packages, so a user's own `model.py` or `pipelines/` can neither shadow ours nor be overwritten by it.

Builds a real wheel from a copy of the source tree and installs it into a fresh venv (no network: the wheel
is built with the setuptools already installed, and installed without dependencies, which the venv reads
from this interpreter's site-packages through PYTHONPATH, where no `.pth` file, and so no editable
install of the repository, takes effect).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A user's project folder: a `model.py` and a `pipelines/` package that blow up when imported.
_USER_MODULE = "raise ImportError('the user\\'s own {name} was imported instead of dsvl2\\'s')\n"

_PROBE = textwrap.dedent(
    """
    import sys
    import dsvl2, dsvl2.app, dsvl2.model.config, dsvl2.model.requests, dsvl2.pipelines.base, dsvl2.pipelines.ocr
    from dsvl2.pipelines.runner import run
    assert callable(dsvl2.ocr) and callable(dsvl2.load) and callable(dsvl2.to_dataframe)
    shadowed = sorted(name for name in ("model", "pipelines", "dsvl2_cli") if name in sys.modules)
    assert not shadowed, shadowed
    print(dsvl2.__file__)
    print(dsvl2.model.__file__)
    """
)


def _user_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    (project / "model.py").write_text(_USER_MODULE.format(name="model.py"))
    (project / "pipelines" / "__init__.py").write_text(_USER_MODULE.format(name="pipelines/"))
    return project


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (the build writes build/ and *.egg-info next to the sources)."""
    src = tmp_path_factory.mktemp("src") / "dsvl2"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "out", "tests")
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("dsvl2-*.whl")
    return found


def test_the_wheel_installs_one_top_level_package_that_user_folders_cannot_shadow(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        check=True,
        capture_output=True,
    )
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    top = sorted(p.name for p in site.iterdir() if p.name != "__pycache__")
    assert top == ["dsvl2", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"], top
    assert sorted(p.name for p in (site / "dsvl2" / "model" / "csrc").iterdir()) != []  # kernel sources ship

    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = subprocess.run(
        [python, "-c", _PROBE], cwd=_user_project(tmp_path), env=env, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    package, model = probe.stdout.split()
    assert Path(package).is_relative_to(site) and Path(model).is_relative_to(site / "dsvl2")

    cli = subprocess.run([venv / "bin" / "dsvl2", "--help"], env=env, capture_output=True, text=True)
    assert cli.returncode == 0 and "ocr" in cli.stdout, cli.stderr


def test_the_development_install_is_not_shadowed_by_user_folders_either(tmp_path):
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=_user_project(tmp_path), capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.split()[0]).resolve().is_relative_to(ROOT)
