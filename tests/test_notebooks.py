"""Every notebook's code cells run top to bottom, so notebooks cannot rot.

The quickstart runs in the default suite; the task notebooks (about a minute each on 2 CPU cores in
their ``QUICK`` setting) are marked ``slow``: ``python -m pytest -m slow tests/test_notebooks.py``.
Each run is checked on what the notebook prints — its results table — not only that it ran.
"""

import json
import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FAST = {"quickstart"}  # seconds; every other notebook is a slow test
FLOAT = r"-?\d+\.\d+(?:e[-+]?\d+)?"


def _numbers(text):
    return [float(v) for v in re.findall(FLOAT, text)]


def _row(out, label):
    """The numbers printed after ``label`` on the one output line that starts with it."""
    lines = [line for line in out.splitlines() if line.startswith(label)]
    assert len(lines) == 1, f"expected one line starting with {label!r}, got {lines}\n{out}"
    return _numbers(lines[0][len(label):])


def _table(out, header):
    """The output from the (last) line starting with ``header`` on: the printed results table."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(header))
    return lines[start].split()[1:], "\n".join(lines[start + 1:])


def _fractions(values, count):
    assert len(values) == count and all(0.0 <= v <= 1.0 for v in values), values
    return values


# ----------------------------------------------------------------------------- per-notebook checks


def check_quickstart(out, ns):
    cosine = _row(out, "cosine")
    assert cosine[0] > 0.9  # IF's predicted change points where retraining moved


def check_class_removal(out, ns):
    header, out = _table(out, "estimator")
    assert header == ["5%", "10%", "30%"]
    f1 = {}
    for label in ("retrained", "IF (all)", "PIF", "FIF", "GIF"):
        cells = _fractions(_row(out, label), 9)  # per ratio: F1 (self-acc / test-acc)
        f1[label] = cells[0::3]
    assert min(f1["retrained"]) > 0.9 and min(f1["IF (all)"]) > 0.9
    assert max(max(f1[m]) for m in ("PIF", "FIF", "GIF")) > 0.9


def check_selection_rules(out, ns):
    header, out = _table(out, "selection")
    assert header == ["PIF", "FIF", "GIF", "mean"]
    mean = {}
    for label in ("highest-k outputs", "highest-k gradients", "lowest-k outputs",
                  "lowest-k gradients", "exclusive-k outputs", "exclusive-k gradients",
                  "random (elements)"):
        *f1s, mean[label] = _fractions(_row(out, label), 4)
        assert mean[label] == pytest.approx(sum(f1s) / 3, abs=2e-3)
    _fractions(_row(out, "IF (all parameters)"), 1)
    assert _fractions(_row(out, "retrained"), 1)[0] > 0.9
    # The paper's finding that survives at this scale: the units U's loss flows through beat
    # the ones it barely touches.
    assert mean["highest-k gradients"] > mean["lowest-k gradients"] + 0.2


def check_backdoor(out, ns):
    header, out = _table(out, "model")
    assert header[:4] == ["clean-acc", "relabel-acc", "corrupt-acc", "F1"]
    rows = {label: _fractions(_row(out, label)[:4], 4)
            for label in ("poisoned", "retrained", "IF (all)", "PIF", "FIF", "GIF")}
    poisoned, retrained = rows.pop("poisoned"), rows.pop("retrained")
    assert retrained[2] < poisoned[2] and retrained[3] > poisoned[3]  # corrupt-acc, F1
    assert max(r[3] for r in rows.values()) > poisoned[3]  # some estimator undoes part of it


def check_negative_curvature(out, ns):
    row = re.compile(rf"^\s*(\d+)\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})\s+({FLOAT})$")
    checkpoints = [m.groups() for m in map(row.match, out.splitlines()) if m]
    assert [int(c[0]) for c in checkpoints] == list(ns["CHECKPOINTS"])
    rates = _fractions([float(c[4]) for c in checkpoints], len(checkpoints))
    assert max(rates) > 0  # the trained CNN's Hessian is indefinite
    assert min(_row(out, "smallest eigenvalues of [H]_tt   (FIF):")) < 0
    gif = _row(out, "smallest eigenvalues of [H²]_tt  (GIF):")
    assert min(gif[:3]) > -1e-4  # PSD up to float32 rounding
    solves = [line.split() for line in out.splitlines()
              if re.match(r"^(IF|FIF|GIF)\s+(CG|LSTSQ)\s", line)]
    assert len(solves) == 4
    assert all(s[2] != "indefinite" for s in solves if s[0] == "GIF")
    assert any(s[2] == "indefinite" for s in solves if s[0] in ("IF", "FIF"))


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


# ----------------------------------------------------------------------------- the tests


def _params():
    for path in NOTEBOOKS:
        marks = () if path.stem in FAST else (pytest.mark.slow,)
        yield pytest.param(path, marks=marks, id=path.stem)


@pytest.mark.parametrize("path", list(_params()))
def test_notebook_runs(path, capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: (shown.append(len(plt.get_fignums())),
                                                      plt.close("all")))
    cells = json.loads(path.read_text())["cells"]
    namespace = {"__name__": "__main__"}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    plt.close("all")
    out = capsys.readouterr().out
    CHECKS[path.stem](out, namespace)
    uses_plots = any("plt.show()" in "".join(c["source"]) for c in cells)
    assert all(shown) and bool(shown) == uses_plots  # every plt.show() had a figure to show


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_clean_with_a_check_and_a_quick_flag(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids)
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), \
        "store notebooks without outputs (Kernel > Restart & Clear Output)"
    assert path.stem in CHECKS, f"add check_{path.stem}(out, namespace) asserting on its output"
    if path.stem not in FAST:
        assert re.search(r"^QUICK = True\b", "".join(code[0]["source"]), re.M), \
            "the first code cell must set QUICK = True (readers flip it for the full setting)"
