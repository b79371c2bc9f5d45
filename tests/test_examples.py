"""The README's example and the demo command run end to end."""

import pathlib
import re
import runpy
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_example_is_the_tested_file():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick example.*?```python\n(.*?)```", readme, re.S).group(1)
    assert block.strip() == (ROOT / "examples" / "quickstart.py").read_text().strip()


def test_quickstart_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    for method in ("if", "pif", "fif", "gif"):
        assert re.search(rf"^{method} .*converged: True", out, re.M)


def test_demo_command_runs():
    """The README's first command is the demo; its entry point runs (end to end: tests/test_demo.py)."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n", readme, re.S).group(1)
    assert "python -m gifjax.demo" in first
    out = subprocess.run([sys.executable, "-m", "gifjax.demo", "--help"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m gifjax.demo") and "--fast" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    second = re.search(r"```bash\n.*?\n(.*?)\n", readme, re.S).group(1)
    command = second.split("&&")[1].split("#")[0].strip()
    assert command in (ROOT / ".ci" / "run").read_text()
