"""The demo command: end to end in its fast mode, its --help, and clear errors for bad flags."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from gifjax.experiments import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"\s+[0-9]\.[0-9]{3}"


@pytest.mark.slow
def test_demo_fast_mode_runs_end_to_end_and_writes_the_plot(tmp_path):
    png = tmp_path / "plots" / "demo.png"
    out = subprocess.run([sys.executable, "-m", "gifjax.demo", "--fast", "--out", str(png)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), **_env()})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(r"self-acc\s+test-acc\s+F1\s+step\s+time s\s+HVPs", text)
    for name in ("original", "retrained"):
        assert re.search(rf"^{name}{NUMBER}{NUMBER}{NUMBER}", text, re.M), text
    for name in ("IF", "PIF", "FIF", "GIF"):  # self, test, F1, step, time, HVPs = 1 + 2·10 + 2 (true-residual check)
        assert re.search(rf"^{name}{NUMBER}{NUMBER}{NUMBER}\s+\S+\s+[0-9.]+\s+23$", text, re.M), text
    assert re.search(r"best estimator here: (IF|PIF|FIF|GIF) \(test F1 [0-9.]+; retrained", text)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "running GIF" in out.stderr  # progress goes to stderr, the table to stdout


def _env():
    import os
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_help_explains_the_demo_and_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--model", "--class", "--ratio", "--rule", "--scores",
                 "--estimators", "--protocol", "--seed", "--out", "--fast"):
        assert flag in text
    assert "retrains it from scratch without one class" in text
    assert "self-acc" in text and "python -m gifjax.demo --class 3" in text


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], r"argument --dataset: invalid choice: 'imagenet' \(choose from "
                                r"'?digits'?, '?mnist'?"),
    (["--class", "12"], r"argument --class: got 12; expected an int in \[0, 10\) for digits"),
    (["--class", "-1"], r"argument --class: got -1; expected an int in \[0, 10\)"),
    (["--ratio", "0"], r"argument --ratio: got '0'; expected a fraction in \(0, 1\]"),
    (["--ratio", "1.5"], r"argument --ratio: got '1.5'; expected a fraction in \(0, 1\]"),
    (["--ratio", "five"], r"argument --ratio: got 'five'; expected a fraction in \(0, 1\]"),
    (["--estimators", "if,gift"], r"argument --estimators: got 'if,gift'; expected a "
                                  r"comma-separated list of distinct names from if,pif,fif,gif"),
    (["--protocol", "test"], r"argument --protocol: invalid choice: 'test'"),
    (["--rule", "best"], r"argument --rule: invalid choice: 'best'"),
])
def test_bad_flag_values_fail_with_clear_messages(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m gifjax.demo")
    assert re.search(message, err), err
