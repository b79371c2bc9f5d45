"""The benchmark entry point and the peer benchmark's skip path (no heavy compute)."""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402

FAKE_OK = """
import os, pathlib, sys
out = pathlib.Path(os.environ["GIFJAX_BENCH_RESULTS"])
print("tiny benchmark says hello", flush=True)
(out / "tiny.md").write_text("### tiny\\n\\nargs: " + " ".join(sys.argv[1:]) + "\\n")
(out / "tiny.json").write_text('{"quick": %s}' % ("true" if "--quick" in sys.argv else "false"))
"""
FAKE_FAIL = """
print("about to fail", flush=True)
raise SystemExit(3)
"""


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Two tiny benchmark modules on the path, a missing one, and a results folder."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "fake_tiny_bench.py").write_text(textwrap.dedent(FAKE_OK))
    (pkg / "fake_failing_bench.py").write_text(textwrap.dedent(FAKE_FAIL))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    monkeypatch.setattr(run, "BENCHMARKS", [
        run.Benchmark("tiny", "fake_tiny_bench", ("tiny",)),
        run.Benchmark("boom", "fake_failing_bench", ("boom",)),
        run.Benchmark("absent", "fake_absent_bench_xyz", ("absent",)),
        run.Benchmark("other", "fake_tiny_bench", ("other",)),
    ])
    out = tmp_path / "results"
    return out


def test_list_shows_the_real_plan_in_order(capsys):
    assert run.main(["--list", "--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [b.name for b in run.BENCHMARKS]
    assert names[:3] == ["core", "selection_bench", "lowrank"] and names[-1] == "peer"
    assert len(lines) == len(names)
    for line, name in zip(lines, names):
        assert line.startswith(f"python -m benchmarks.{name} --quick")


def test_only_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run.main(["--list", "--only", "core,nope"])


def test_only_runs_selected_continues_past_failure_and_summarises(fakes, capfd):
    code = run.main(["--quick", "--only", "absent,boom,tiny", "--results", str(fakes), "--no-plots"])
    assert code == 1  # boom failed
    printed = capfd.readouterr().out
    assert "tiny benchmark says hello" in printed and "about to fail" in printed  # streamed
    assert "not found" in printed
    record = json.loads((fakes / "run.json").read_text())
    status = {r["name"]: r for r in record["benchmarks"]}
    assert [r["name"] for r in record["benchmarks"]] == ["tiny", "boom", "absent"]  # fixed order
    assert status["tiny"]["status"] == "ok" and status["tiny"]["returncode"] == 0
    assert status["boom"]["status"] == "failed" and status["boom"]["returncode"] == 3
    assert "about to fail" in status["boom"]["output_tail"]
    assert status["absent"]["status"] == "missing"
    assert "other" not in status and record["failed"] == ["boom"]
    assert all(r["seconds"] >= 0 for r in record["benchmarks"])
    assert (fakes / "tiny.md").read_text().strip().endswith("args: --quick")
    summary = (fakes / "SUMMARY.md").read_text()
    assert "## tiny (`tiny.md`, --quick)" in summary and "args: --quick" in summary
    assert "| boom |" in summary and "No results yet for: boom, absent, other." in summary


def test_summary_from_fixture_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "BENCHMARKS", [run.Benchmark("a", "x", ("a",)),
                                            run.Benchmark("t", "y", ("t", "t_quick")),
                                            run.Benchmark("t_x", "z", ("t_x",))])
    (tmp_path / "a.md").write_text("### A table\n\n| x |\n|---|\n| 1 |\n")
    (tmp_path / "a.json").write_text(json.dumps({"environment": {"time": "2026-01-01 00:00:00"}}))
    (tmp_path / "t_quick.md").write_text("quick tasks\n")
    (tmp_path / "a_plot.png").write_bytes(b"png")
    (tmp_path / "t_x_plot.png").write_bytes(b"png")  # belongs to t_x, not to t
    path = run.summary(tmp_path)
    text = path.read_text()
    assert text.index("## a (`a.md`, 2026-01-01 00:00:00)") < text.index("## t (`t_quick.md`)")
    assert "| 1 |" in text and "quick tasks" in text and "![a_plot](a_plot.png)" in text
    assert "t_x_plot" not in text and "No results yet for: t_x." in text


def test_plots_from_result_json(tmp_path):
    pytest.importorskip("matplotlib")
    core = {"quick": True, "gif_hvp_counts": {m: {s: {"hvps": h, "converged": s != "richardson"}
                                                  for s, h in (("lstsq", 10), ("cg_normal", 9),
                                                               ("richardson", 200))}
                                              for m in ("0.05", "0.20")},
            "hvp_cost": {"mlp": {"params": 5, "masked_hvp_over_grad": 2.0, "loop_product_over_grad": 1.4}}}
    (tmp_path / "core.json").write_text(json.dumps(core))
    (tmp_path / "peer.json").write_text(json.dumps({"skipped": True}))
    written = {p.name for p in run.plots(tmp_path)}
    assert written == {"core_hvps.png", "core_hvp_cost.png"}
    assert (tmp_path / "core_hvps.png").read_bytes()[:4] == b"\x89PNG"


def test_peer_skips_cleanly_without_pydvl(tmp_path, monkeypatch, capsys):
    from benchmarks import common, peer

    monkeypatch.setitem(sys.modules, "pydvl", None)  # `import pydvl` now raises ImportError
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert peer.main([]) == 0
    assert "skipped" in capsys.readouterr().out
    payload = json.loads((tmp_path / "peer.json").read_text())
    assert payload["skipped"] is True and "torch" in payload["reason"]
    assert "skipped" in (tmp_path / "peer.md").read_text()


def _run_smoke(module, tmp_path, *, timeout):
    """``python -m benchmarks.<module> --smoke --results tmp_path`` on CPU; the finished process."""
    import os
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", GIFJAX_BENCH_RESULTS=str(tmp_path / "unused"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke", "--results", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_accelerator_smoke_writes_the_full_schema(tmp_path):
    """`python -m benchmarks.accelerator --smoke` end to end on CPU (~30 s): every section ok, numbers sane."""
    import math

    from gifjax.solvers import FAILURES

    proc = _run_smoke("accelerator", tmp_path, timeout=600)
    assert "hvp_cost/" in proc.stdout and " s] " in proc.stdout  # progress lines with elapsed time
    data = json.loads((tmp_path / "accelerator.json").read_text())  # --results wins over the variable
    assert "## Accelerator benchmark (smoke, complete)" in (tmp_path / "accelerator.md").read_text()

    positive = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    assert data["benchmark"] == "accelerator" and data["mode"] == "smoke" and data["status"] == "complete"
    assert data["counts"] == {"skipped": 0, "errors": 0}
    assert data["device"]["platform"] == "cpu" and data["device"]["count"] >= 1 and data["device"]["device_kind"]
    assert data["jax_version"] and data["started"] and data["environment"]["jax"] == data["jax_version"]
    assert positive(data["elapsed_s"]) and data["elapsed_s"] < data["deadline_s"]
    names = list(data["models"])
    assert len(names) == 2 and all(data["models"][m]["status"] == "ok" and data["models"][m]["params"] > 0
                                   for m in names)
    for m in names:
        cost, damp = data["hvp_cost"][m], data["damping"][m]
        assert cost["status"] == "ok" and damp["status"] == "ok"
        assert all(positive(cost[k]) for k in ("grad_ms", "hvp_ms", "hvp_over_grad"))
        assert finite(cost["loop_product_ms"]) and finite(cost["loop_product_over_grad"])
        assert positive(damp["damping"]) and damp["lambda_min_estimate"] <= damp["lambda_max_estimate"]
        solves = data["solves"][m]
        assert set(solves) == ({"CG (vmap)", "BlockCG", "MINRES (vmap)"} if m == names[0]
                               else {"CG (vmap)", "BlockCG"})
        for by_q in solves.values():
            assert set(by_q) == {"1", "2"}
            for q, e in by_q.items():
                assert e["status"] == "ok" and e["Q"] == int(q) and e["calls"] * e["queries_per_call"] == e["Q"]
                assert positive(e["ms_per_query"]) and positive(e["hvps_per_query"]) and positive(e["seconds"])
                assert finite(e["rel_residual_max"]) and 0 <= e["rel_residual_median"] <= e["rel_residual_max"]
                assert 0 <= e["converged_share"] <= 1 and sum(e["failures"].values()) == e["Q"]
                assert set(e["failures"]) <= set(FAILURES)
    first = names[0]
    bf16 = data["bf16"]
    assert positive(bf16["hvp_cost"][first]["hvp_ms"]) and finite(bf16["hvp_cost"][first]["loop_product_ms"])
    runs = bf16["accuracy"][first]["runs"]
    assert len(runs) == 4 and {r["variant"] for r in runs.values()} == {"f32", "bf16"}
    for r in runs.values():
        assert finite(r["rel_error_max"]) and 0 <= r["rel_error_median"] <= r["rel_error_max"]
        assert positive(r["hvps_per_query"]) and set(r["failures"]) <= set(FAILURES)
    par = data["parallel"][first]
    assert par["status"] == "ok" and par["devices"] == data["device"]["count"]
    assert positive(par["single"]["seconds"]) and positive(par["single"]["ms_per_query"])


@pytest.mark.slow
def test_own_model_smoke_writes_the_full_schema(tmp_path):
    """`python -m benchmarks.own_model --smoke` end to end on CPU (~3 min on 2 cores): guarded calls, references."""
    import math

    from gifjax.solvers import FAILURES

    proc = _run_smoke("own_model", tmp_path, timeout=1200)
    assert "call if:" in proc.stdout and "reference at λ*" in proc.stdout
    data = json.loads((tmp_path / "own_model.json").read_text())  # --results wins over the variable
    md = (tmp_path / "own_model.md").read_text()
    assert "## Own nnx model, documented defaults (smoke, complete)" in md and "| IF, all defaults |" in md

    positive = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0
    assert data["benchmark"] == "own_model" and data["mode"] == "smoke" and data["status"] == "complete"
    m = data["model"]
    assert m["params"] == 2570 and m["n_train"] == 160 and m["n_test"] == 32
    assert m["lambda_min"] < m["lambda_max"] and m["lambda_star"] == pytest.approx(2 * max(-m["lambda_min"], 0.05))
    assert 0.04 < m["mask_fraction"] <= 0.05
    assert data["defaults"]["max_steps"] > 0 and data["defaults"]["test_chunk_size"] == 16
    assert set(data["hvp_cost"]) == {"all", "64", "32"}
    for c in data["hvp_cost"].values():
        assert all(positive(c[k]) for k in ("grad_ms", "fresh_hvp_ms", "chunk_step_s", "per_query_hvp_ms"))

    calls = data["calls"]
    assert set(calls) == {"if", "if_sub32_star", "if_star", "gif5_sub32_star"}
    for key, r in calls.items():
        assert r["status"] in {"measured", "timed out"}, (key, r)
        if r["status"] == "timed out":
            assert r["wall_s"] is None and not r.get("result")
            continue
        res = r["result"]
        assert positive(r["wall_s"]) and 0 <= r["compile_s"] <= r["wall_s"] * 1.01
        assert 0 <= res["converged"] <= res["n"] and res["n"] == 32 and res["hvps_sum"] > 0
        assert set(res["failures"]) <= set(FAILURES) and sum(res["failures"].values()) == res["n"] - res["converged"]
        assert res["hvps_vmapped"] >= res["hvps_sum"] and res["rel_residual_median"] <= res["rel_residual_max"]
    for key in ("if_sub32_star", "if_star", "gif5_sub32_star"):  # damped above |λ_min|: every query converges
        res = calls[key]["result"]
        assert res["converged"] == res["n"], (key, res)
    for key in ("if_sub32_star", "if_star", "gif5_sub32_star"):  # against the tight full-data references
        vs = calls[key]["vs_reference"]
        assert len(vs["spearman"]) == len(vs["top10_overlap"]) == len(vs["relative_error"]) == 4
        assert min(vs["spearman"]) > 0.5 and all(0 <= t <= 1 for t in vs["top10_overlap"])
    assert min(calls["if_star"]["vs_reference"]["spearman"]) > 0.99  # same problem, solved tighter
    refs = data["references"]
    assert refs["queries"] == 4 and refs["star"]["converged"] == 4 and refs["gif_star"]["n"] == 4
    assert len(refs["budgets"]) == 3
    for b in refs["budgets"].values():
        assert 0 <= b["converged"] <= 4 and positive(b["wall_s"]) and set(b["failures"]) <= set(FAILURES)


def test_paired_ci_constant_symmetric_deterministic_and_verdict():
    from benchmarks.tasks_report import ci_verdict, format_ci, paired_ci, paired_f1

    # constant differences: zero-width CI at that value
    ci = paired_ci([0.9, 0.8, 0.7, 0.6], [0.85, 0.75, 0.65, 0.55])
    assert ci["n"] == 4
    assert ci["mean"] == pytest.approx(0.05) and ci["lo"] == pytest.approx(0.05)
    assert ci["hi"] == pytest.approx(0.05)
    assert ci_verdict(ci) == "yes" and ci_verdict(ci, claimed=-1) == "no"
    assert format_ci(ci) == "+0.050 [+0.050, +0.050] (n=4)"

    # symmetric differences (−1, +1): mean 0, CI symmetric around 0 and inside [−1, 1]
    ci = paired_ci([1.0, 0.0] * 5, [0.0, 1.0] * 5, n_boot=20_000)
    assert ci["mean"] == pytest.approx(0.0)
    assert ci["lo"] == pytest.approx(-ci["hi"], abs=0.05)
    assert -1.0 < ci["lo"] < 0.0 < ci["hi"] < 1.0
    assert ci_verdict(ci) == "inconclusive"

    # deterministic given the seed; another seed resamples differently
    a, b = [0.9, 0.5, 0.7, 0.2, 0.95], [0.8, 0.6, 0.4, 0.25, 0.9]
    assert paired_ci(a, b, seed=3) == paired_ci(a, b, seed=3)
    assert paired_ci(a, b, seed=3) != paired_ci(a, b, seed=4)

    # verdict rule: below 0 is "no" for the claim a > b; no spread is inconclusive
    ci = paired_ci([0.1, 0.2, 0.15], [0.5, 0.6, 0.55])
    assert ci["hi"] < 0 and ci_verdict(ci) == "no"
    assert format_ci(ci).startswith("\u22120.400 [\u22120.400")
    one = paired_ci([0.9], [0.1])
    assert one["mean"] == pytest.approx(0.8) and ci_verdict(one) == "inconclusive"
    assert ci_verdict({"mean": 0.1, "lo": -0.01, "hi": 0.2, "n": 5}) == "inconclusive"

    # pairing by unit: (class, seed), in unit order, only units both estimators have
    ra = [{"seed": 1, "removed_class": 0, "f1": 0.5}, {"seed": 0, "removed_class": 0, "f1": 0.7},
          {"seed": 0, "removed_class": 3, "f1": 0.9}]
    rb = [{"seed": 0, "removed_class": 0, "f1": 0.6}, {"seed": 1, "removed_class": 0, "f1": 0.4}]
    assert paired_f1(ra, rb) == ([0.7, 0.5], [0.6, 0.4])
    assert paired_f1([{"seed": 2, "f1": 1.0}], [{"seed": 2, "f1": 0.0}], 0) == ([1.0], [0.0])


def test_tasks_mnist_grids_and_report_from_a_synthetic_payload():
    """benchmarks.tasks_mnist: the grids cover the issue's cells; the report pairs runs by unit (no training)."""
    from benchmarks.tasks_mnist import CONTROLS, GRIDS, HIGHEST_RANDOM, RULES, render

    cells = lambda grid: {(r, rule, c) for r, rule, c, _ in grid}
    assert set(HIGHEST_RANDOM) | {"lowest"} == set(RULES)
    assert cells(GRIDS["full"]) == {(r, rule, c) for r in (0.02, 0.05, 0.1, 0.3)
                                    for rule in HIGHEST_RANDOM for c in CONTROLS}
    assert all(ms == ("pif", "fif", "gif") for *_, ms in GRIDS["full"])
    for name in ("core5", "lean", "budget"):   # 5 %: every rule × control, GIF everywhere
        five = [e for e in GRIDS[name] if e[0] == 0.05]
        assert cells(five) == {(0.05, rule, c) for rule in HIGHEST_RANDOM for c in CONTROLS}
        assert all("gif" in ms for *_, ms in five)
        assert all("fif" in ms for r, _, c, ms in five if c == "rule")

    def run(setting, method, seed, cls, f1, agreement):
        return {"setting": setting, "method": method, "seed": seed, "removed_class": cls, "f1": f1,
                "agreement": agreement, "self_acc": 1 - f1, "test_acc": f1, "time_s": 1.0,
                "target_row": method == "if"}

    units = []
    for cls, seed in ((0, 0), (1, 0), (0, 1)):
        runs = [run("all", "if", seed, cls, 0.5, 0.6)]
        for rule, f1 in (("outputs", 0.9), ("random", 0.7)):
            runs += [run(f"0.05/{rule}/rule", "fif", seed, cls, f1 - 0.1, 0.5),
                     run(f"0.05/{rule}/rule", "gif", seed, cls, f1, 0.8)]
        base = {"original": {"self_acc": 1.0, "test_acc": 0.9, "f1": 0.0, "agreement": 0.9},
                "retrained": {"self_acc": 0.0, "test_acc": 0.9, "f1": 0.95, "time_s": 2.0}}
        units.append({"scale": "mnist", "seed": seed, "removed_class": cls, "baseline": base,
                      "runs": runs})
    config = {"max_steps": 10, "hessian_size": 64, "damping": 1e-3, "num_steps": 24,
              "min_step": 0.01, "max_step": 100.0}
    payload = {"command": "python -m benchmarks.tasks_mnist", "status": "complete", "seconds": 60.0,
               "backend": "cpu", "removal": units, "backdoor": [],
               "scales": {"mnist": {"dataset": "mnist5k", "model": "tinynet", "num_params": 398090,
                                    "training": {}, "config": config, "grid": "budget",
                                    "grid_entries": [[0.05, "outputs", "rule", ["fif", "gif"]]]}}}
    md = render(payload)
    assert "## Class removal, mnist (3 units; unit = (removed class, seed))" in md
    assert "398,090 parameters" in md and "(no unit measured)" in md   # the empty backdoor section
    # GIF − IF = 0.4, GIF − FIF = 0.1 in every unit (F1); GIF − IF = 0.2 in agreement
    assert "| 0.05/outputs/rule | +0.400 [+0.400, +0.400] (n=3) yes | +0.100 [+0.100, +0.100] (n=3) yes | — |" in md
    assert "| 0.05/outputs/rule | +0.200 [+0.200, +0.200] (n=3) yes | +0.300 [+0.300, +0.300] (n=3) yes | — |" in md
    # highest − random for GIF: 0.2 in F1; nothing for the random rule itself
    assert "| 0.05/outputs/rule | GIF | +0.200 [+0.200, +0.200] (n=3) yes |" in md
    assert "| 0.05/random/rule | GIF | +" not in md and "| 0.05/random/rule | GIF | \u2212" not in md
    # the verdicts: GIF − IF yes; GIF > FIF > PIF and highest > random > lowest lack a link
    assert "| 5 % GIF (highest outputs) ≥ IF (all parameters) | **yes**: GIF − IF +0.400 [+0.400, +0.400] (n=3) |" in md
    assert "**inconclusive**: GIF − FIF +0.100 [+0.100, +0.100] (n=3) yes; FIF − PIF not run" in md
    assert "highest − random +0.200 [+0.200, +0.200] (n=3) yes; random − lowest not run" in md
    assert "3 of 3 units below F1 0.8" not in md and "0 of 3 units below F1 0.8" in md


def test_tasks_mnist_extension_grid_and_verdict_chain():
    """benchmarks.tasks_mnist: the extension grid re-runs its comparators; a chain of two links is
    yes only when both are, no when one is (no training)."""
    from benchmarks.tasks_mnist import GRIDS, VERDICTS, _missing, _wanted, verdict_cell

    ext = _wanted(GRIDS["extension"])
    for pair in (("all", "if"), ("0.05/outputs/rule", "pif"), ("0.05/outputs/rule", "fif"),
                 ("0.05/outputs/rule", "gif"), ("0.05/random/rule", "gif"),
                 ("0.05/lowest/rule", "gif"), ("0.02/outputs/rule", "gif"),
                 ("0.1/outputs/rule", "gif"), ("0.3/outputs/rule", "gif")):
        assert pair in ext
    assert _wanted(GRIDS["chain"]) == [("all", "if")] + [(f"0.05/{rule}/rule", "gif")
                                                         for rule in ("outputs", "random", "lowest")]
    unit = {"runs": [{"setting": s, "method": m} for s, m in ext[:-1]]}
    assert _missing(unit, GRIDS["extension"]) == [ext[-1]]

    def runs(values):  # {(setting, method): F1 per unit}
        return [{"setting": s, "method": m, "seed": i, "removed_class": 0, "f1": v}
                for (s, m), vs in values.items() for i, v in enumerate(vs)]

    links = dict(VERDICTS)["highest-k > random > lowest-k at 5 % (outputs, GIF)"]
    o, r, lo = ("0.05/outputs/rule", "gif"), ("0.05/random/rule", "gif"), ("0.05/lowest/rule", "gif")
    both = runs({o: [0.9, 0.8, 0.95], r: [0.7, 0.6, 0.75], lo: [0.5, 0.4, 0.55]})
    assert verdict_cell(both, links, "f1").startswith("**yes**: highest − random +0.200")
    one_no = runs({o: [0.9, 0.8, 0.95], r: [0.7, 0.6, 0.75], lo: [0.8, 0.7, 0.85]})
    assert verdict_cell(one_no, links, "f1").startswith("**no**:")
    assert verdict_cell([], links, "f1") == "not run"


def test_selection_rules_report_pairs_runs_by_seed():
    """benchmarks.selection_rules: the report's paired differences pair runs by seed (no training)."""
    import dataclasses

    from benchmarks.selection_rules import MASKED, SETTINGS, render
    from gifjax.experiments.tasks.common import TaskConfig, TrainConfig

    f1 = {("highest", "outputs"): 0.6, ("highest", "gradients"): 0.95, ("random", None): 0.9,
          ("lowest", "outputs"): 0.5}
    runs = [{"seed": seed, "rule": rule, "scores": scores, "method": m,
             "f1": f1.get((rule, scores), 0.4) + 0.01 * seed + 0.02 * MASKED.index(m),
             "self_acc": 0.1, "test_acc": 0.9, "step": 1.0, "time_s": 1.0, "num_hvps": 81,
             "failure": "max_steps", "num_selected": 972, "num_params": 19466,
             "classifier_rows": [0], "target_row": True}
            for seed in (0, 1) for rule, scores in SETTINGS for m in MASKED]
    base = {"self_acc": 0.0, "test_acc": 0.97, "f1": 0.98}
    payload = {"seeds": [0, 1], "ratio": 0.05, "removed_class": 0, "quick": False, "seconds": 10.0,
               "backend": "cpu", "training": dataclasses.asdict(TrainConfig()),
               "config": dataclasses.asdict(TaskConfig()), "runs": runs,
               "baselines": [{"original": base, "retrained": {**base, "time_s": 1.0},
                              "if": {**base, "f1": 0.9 + 0.01 * s}} for s in (0, 1)]}
    md = render(payload)
    assert "| GIF − FIF (highest-k outputs) | +0.020 [+0.020, +0.020] (n=2) yes |" in md
    assert "| highest-k − random, outputs (GIF) | −0.300 [−0.300, −0.300] (n=2) no |" in md
    assert "| random − lowest-k, outputs (GIF) | +0.400 [+0.400, +0.400] (n=2) yes |" in md
    assert "| GIF (highest-k outputs) − IF (all parameters) | −0.260 [−0.260, −0.260] (n=2) no |" in md
