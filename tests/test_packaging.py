"""Packaging: one version, the license and type marker ship, and the built wheel installs and imports.

The wheel test builds offline (``python -m build --no-isolation``, with the build backend from the
test extra), runs ``twine check``, installs the wheel with ``--no-deps`` into a fresh virtual
environment and imports every public module from *there*, not from this checkout. The fresh
environment borrows the dependencies (jax, flax, ...) of the running one through a ``.pth`` path
entry, which does not bring this checkout's editable install along.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import site
import subprocess
import sys
import tomllib
import venv

import pytest

import gifjax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_defined_once():
    assert importlib.metadata.version("gifjax") == gifjax.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_license_and_changelog_exist():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert gifjax.__version__ in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / "gifjax" / "py.typed").exists()


def _run(*cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_built_wheel_installs_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT))
    wheels = sorted(dist.glob("gifjax-*.whl"))
    assert len(wheels) == 1, wheels
    _run(sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir()))

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    env_site = pathlib.Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheels[0]))
    # dependencies from the running environment, appended after the fresh site-packages
    (env_site / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    probe = (
        "import importlib, json, pathlib, gifjax;"
        "mods = [importlib.import_module(m).__name__ for m in"
        " ('gifjax.solvers', 'gifjax.operators', 'gifjax.parallel', 'gifjax.evaluation', 'gifjax.experiments')];"
        "print(json.dumps({'file': gifjax.__file__, 'version': gifjax.__version__, 'modules': mods,"
        " 'typed': (pathlib.Path(gifjax.__file__).parent / 'py.typed').exists()}))")
    got = json.loads(_run(str(python), "-c", probe, cwd=str(tmp_path)).strip().splitlines()[-1])
    assert pathlib.Path(got["file"]).is_relative_to(env_site), got["file"]
    assert got["version"] == gifjax.__version__
    assert got["typed"]
    assert len(got["modules"]) == 5
    licenses = list(env_site.glob("gifjax-*.dist-info/licenses/LICENSE"))
    assert licenses, "LICENSE missing from the installed wheel"
