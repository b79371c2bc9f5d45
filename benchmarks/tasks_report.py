"""Class removal and backdoor relabelling on the digits CNN vs retraining (issue 4's report).

    python -m benchmarks.tasks_report [--seeds 0 1 2 3 4] [--classes 0 ...] [--quick]

(results/tasks.md was made with ``--seeds 0 1 2 3 4``, ~7 minutes on 2 CPU cores.)

For each seed (data split, initialisation, Hessian subset, random parts of
selection): train the demo's CNN on scikit-learn's 8×8 digits (the demo's
training settings), retrain it without class 0 (the baseline), then remove
class 0 with

* IF (all parameters; once per seed, it does not depend on the selection),
* PIF, FIF and GIF with highest-k selection by unit outputs and by unit
  output-gradients at 5 %, 10 % and 30 % of each layer,

under the ``heldout`` protocol (Hessian on 512 training images of the other
classes, step chosen by F1 on the validation split, numbers on test), with
the demo's solver (LSTSQ/CGLS, 40 iterations = 81 HVPs, damping 1e-3) and
step grid (0 and 64 geometric steps from 0.01 to 100). Also, at 5 % outputs:
the ``paper`` protocol (Hessian on test images, step chosen on test) and the
backdoor task (10 % of training images triggered and relabelled to 4; trigger
+1 of 16 grey levels on the digits).

``--classes 0 1 … 9`` repeats the class removal for each listed class (the
backdoor task does not depend on it and runs once per seed); class-removal
rows are then over (class, seed) units.

Every number is mean ± sample std over the seeds. The "paired differences"
table gives GIF − IF, GIF − FIF and GIF − PIF in test F1, paired by unit
(seed, or (class, seed)), with a percentile bootstrap 95 % CI over the units
(``paired_ci``) and a verdict on the claim "GIF is better". Times are the method's
execution (solve + step search) without compilation; the retrained row's
time is its training time. Writes benchmarks/results/tasks.json and tasks.md
(``--render`` rewrites tasks.md from tasks.json; ``--quick`` writes tasks_quick.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, table, write  # noqa: E402
from gifjax.experiments import data, models, train  # noqa: E402
from gifjax.experiments.tasks import backdoor, class_removal, common  # noqa: E402
from gifjax.experiments.tasks.common import TaskConfig, TrainConfig  # noqa: E402

NAMES = {"if": "IF", "pif": "PIF", "fif": "FIF", "gif": "GIF"}
MINUS = "\u2212"  # typographic minus for the paired-differences cells


def paired_ci(a, b, *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean paired difference ``a − b`` over units, with a percentile bootstrap CI.

    ``a[i]`` and ``b[i]`` are the same unit (a seed, or a (class, seed) pair). The
    CI resamples the units with replacement ``n_boot`` times (NumPy generator
    seeded with ``seed``, so the result is deterministic) and takes the
    ``(1 − level)/2`` and ``(1 + level)/2`` percentiles of the resampled means.
    Returns ``{"mean", "lo", "hi", "n"}``; ``lo``/``hi`` are NaN with fewer than
    two units (no spread to resample), ``mean`` too with none.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"expected two equal-length 1-D sequences, got shape {d.shape}")
    n = int(d.size)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(d.mean())
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": n}


def ci_verdict(ci: dict, claimed: int = +1) -> str:
    """``yes`` when the CI excludes 0 on the claimed side (``claimed=+1``: a − b > 0),
    ``no`` when it excludes 0 on the other side, ``inconclusive`` otherwise (also without a CI)."""
    lo, hi = ci["lo"], ci["hi"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if claimed < 0:
        lo, hi = -hi, -lo
    if lo > 0:
        return "yes"
    if hi < 0:
        return "no"
    return "inconclusive"


def format_ci(ci: dict, digits: int = 3) -> str:
    """``+0.012 [−0.030, +0.051] (n=5)``."""
    f = lambda x: "—" if not np.isfinite(x) else f"{x:+.{digits}f}".replace("-", MINUS)
    return f"{f(ci['mean'])} [{f(ci['lo'])}, {f(ci['hi'])}] (n={ci['n']})"


def _unit(run: dict, default_class) -> tuple:
    return (run.get("removed_class", default_class), run["seed"])


def paired_f1(runs_a, runs_b, default_class=None, metric: str = "f1") -> tuple[list, list]:
    """F1 (or another ``metric`` of the run dicts) of two estimators on the units both have, in unit order."""
    fa = {_unit(r, default_class): r[metric] for r in runs_a}
    fb = {_unit(r, default_class): r[metric] for r in runs_b}
    units = sorted(set(fa) & set(fb))
    return [fa[u] for u in units], [fb[u] for u in units]


def paired_rows(label, runs_by_method, default_class=None) -> list[list[str]]:
    """One row of the paired-differences table: GIF − IF, GIF − FIF, GIF − PIF in F1."""
    row = list(label)
    for other in ("if", "fif", "pif"):
        ci = paired_ci(*paired_f1(runs_by_method["gif"], runs_by_method[other], default_class))
        row.append(f"{format_ci(ci)} {ci_verdict(ci)}")
    return [row]


def removal_runs(seed: int, removed_class: int, ratios, scores_kinds, training: TrainConfig,
                 base: TaskConfig, log):
    """All class-removal runs of one seed: one trained model, one baseline, many estimators."""
    ds = data.load("digits", seed=seed)
    net = models.create("cnn", ds.num_classes)
    fit, _ = common.timed(train.fit, net, *ds.train, **training.fit_kwargs())
    refit, retrain_s = common.timed(train.retrain_without_class, net, *ds.train, removed_class,
                                    **training.fit_kwargs())
    v = fit.variables
    rows = {"original": _metrics(class_removal.evaluate(net, v, ds.test, removed_class)),
            "retrained": {**_metrics(class_removal.evaluate(net, refit.variables, ds.test,
                                                            removed_class)), "time_s": retrain_s}}
    runs = []
    wd = training.weight_decay

    def record(setting, result):
        runs.append({"setting": setting, "method": result.method, **_metrics(result.metrics),
                     "step": result.step, "time_s": result.time_s, "compile_s": result.compile_s,
                     "num_hvps": result.num_hvps, "converged": result.converged,
                     "failure": result.failure, "num_selected": result.num_selected,
                     "num_params": result.num_params, "delta_norm": result.delta_norm,
                     "classifier_rows": list(result.classifier_rows), "target_row": result.target_row})
        log(f"  seed {seed} {setting:>22s} {result.method:3s} F1 {result.metrics.f1:.3f} "
            f"self {result.metrics.self_acc:.3f} test {result.metrics.test_acc:.3f} "
            f"({result.time_s:.1f} s)")

    for protocol in ("heldout", "paper"):
        cfg = dataclasses.replace(base, method="if", protocol=protocol, seed=seed)
        record(f"{protocol}/all", class_removal.remove_class(net, v, ds, removed_class, cfg,
                                                             weight_decay=wd))
    for scores in scores_kinds:
        for ratio in ratios:
            protocols = ("heldout", "paper") if (ratio == 0.05 and scores == "outputs") else ("heldout",)
            for protocol in protocols:
                cfg = dataclasses.replace(base, ratio=ratio, scores=scores, protocol=protocol,
                                          seed=seed, method="gif")
                mask = class_removal.removal_mask(net, v, ds, removed_class, cfg)[0]
                for method in ("pif", "fif", "gif"):
                    out = class_removal.remove_class(net, v, ds, removed_class,
                                                     dataclasses.replace(cfg, method=method),
                                                     weight_decay=wd, mask=mask)
                    record(f"{protocol}/{scores}/{ratio:g}", out)
    return rows, runs


def backdoor_runs(seed: int, training: TrainConfig, base: TaskConfig, log):
    ds = data.load("digits", seed=seed)
    exp = backdoor.run_experiment(ds, config=dataclasses.replace(base, seed=seed),
                                  training=training)
    rows = {"original": _metrics(exp.original),
            "retrained": {**_metrics(exp.retrained), "time_s": exp.retrain_s}}
    runs = []
    for r in exp.runs:
        runs.append({"method": r.method, **_metrics(r.metrics), "step": r.step,
                     "time_s": r.time_s, "compile_s": r.compile_s, "num_hvps": r.num_hvps,
                     "converged": r.converged, "failure": r.failure,
                     "classifier_rows": list(r.classifier_rows), "target_row": r.target_row})
        log(f"  seed {seed} backdoor {r.method:3s} F1 {r.metrics.f1:.3f} clean "
            f"{r.metrics.clean_acc:.3f} relabel {r.metrics.relabel_acc:.3f} corrupt "
            f"{r.metrics.corrupt_acc:.3f}")
    return rows, runs


def rows_cell(runs) -> str:
    """The "classifier rows" cell: in how many seeds the mask holds the target class's logit row,
    and the rows per seed (``all`` for IF); ``—`` for payloads recorded before the column existed."""
    if not runs or any("classifier_rows" not in r for r in runs):
        return "—"
    hits = sum(bool(r["target_row"]) for r in runs)
    per_seed = "; ".join("all" if r.get("method") == "if"
                         else (",".join(map(str, r["classifier_rows"])) or "none") for r in runs)
    return f"target in {hits}/{len(runs)} ({per_seed})"


def _metrics(m) -> dict:
    return {k: float(v) for k, v in m._asdict().items()}


def _pm(values, digits=3) -> str:
    mean, std = common.mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def removal_table(all_rows, all_runs, setting) -> tuple[str, str]:
    """Markdown rows for one setting, and the winner among the estimators by mean test F1."""
    protocol = setting.split("/")[0]
    header = ["estimator", "self-acc ↓", "test-acc", "F1", "time s", "HVPs", "classifier rows"]
    body = [["retrained", _pm([r["retrained"]["self_acc"] for r in all_rows]),
             _pm([r["retrained"]["test_acc"] for r in all_rows]),
             _pm([r["retrained"]["f1"] for r in all_rows]),
             _pm([r["retrained"]["time_s"] for r in all_rows], 1), "—", "—"]]
    f1s = {}
    for method in ("if", "pif", "fif", "gif"):
        key = f"{protocol}/all" if method == "if" else setting
        rs = [r for r in all_runs if r["setting"] == key and r["method"] == method]
        f1s[method] = [r["f1"] for r in rs]
        body.append([NAMES[method] + (" (all params)" if method == "if" else ""),
                     _pm([r["self_acc"] for r in rs]), _pm([r["test_acc"] for r in rs]),
                     _pm(f1s[method]), _pm([r["time_s"] for r in rs], 1),
                     str(int(np.mean([r["num_hvps"] for r in rs]))), rows_cell(rs)])
    verdict = ("best mean F1: " + winner(f1s) + "; among the masked estimators "
               + winner({m: v for m, v in f1s.items() if m != "if"}))
    return table(header, body), verdict


def winner(f1s: dict) -> str:
    """Best mean F1, and in how many runs (seeds, or (class, seed) pairs) it beats the runner-up."""
    means = {m: float(np.mean(v)) for m, v in f1s.items()}
    best, second = sorted(means, key=means.get, reverse=True)[:2]
    a, b = np.asarray(f1s[best]), np.asarray(f1s[second])
    wins, ties = int((a > b).sum()), int((a == b).sum())
    return (f"**{NAMES[best]}** ({means[best]:.3f}) over {NAMES[second]} ({means[second]:.3f}): "
            f"higher in {wins} of {len(a)} runs" + (f", equal in {ties}" if ties else ""))


def render(payload: dict) -> str:
    """The Markdown report from the JSON payload (``--render`` redoes it from tasks.json)."""
    training, base = TrainConfig(**payload["training"]), TaskConfig(**payload["config"])
    seeds, removed = payload["seeds"], payload["removed_class"]
    classes = payload.get("classes", [removed])
    removed_txt = (f"class {removed}" if len(classes) == 1
                   else "classes " + ", ".join(map(str, classes)))
    all_rows = payload["class_removal"]["baselines"]
    all_runs = sorted(payload["class_removal"]["runs"], key=lambda r: r["seed"])
    failures = sorted({r["failure"] for r in all_runs})
    md = [f"# Class removal and backdoor relabelling on the digits CNN ({len(seeds)} seeds)", "",
          "Generated by `python -m benchmarks.tasks_report"
          + (" --quick" if payload["quick"] else "")
          + (f" --seeds {' '.join(map(str, seeds))}" if seeds != [0, 1, 2] else "")
          + (f" --classes {' '.join(map(str, classes))}" if len(classes) > 1 else "") + f"` in {payload['seconds']:.0f} s "
          f"({payload['backend']}). Model: the demo's CNN (19,466 parameters), trained "
          f"{training.epochs} epochs (Adam {training.learning_rate:g}, weight decay "
          f"{training.weight_decay:g}). Removed {removed_txt.replace(' ', ': ', 1)}. Solver for every "
          f"estimator: LSTSQ (CGLS) × {base.max_steps} iterations = {2 * base.max_steps + 1} "
          f"HVPs, damping {base.damping:g}, Hessian on {base.hessian_size} images (solver "
          f"outcomes: {', '.join(failures)} — the budget, not the tolerance, stops the "
          f"solves); step grid: 0 and {base.num_steps} geometric steps "
          f"{base.min_step:g}…{base.max_step:g}. Mean ± sample std over seeds "
          f"{', '.join(map(str, seeds))}; metrics on the test split; times exclude compilation "
          "(retrained: training time) and were taken on 2 shared CPU cores, so they are noisy. "
          "IF changes all parameters, so its row is the same in every table of a protocol. "
          "Verdicts compare the per-seed F1 of the best and the runner-up (paired by seed).", ""]
    summary = []
    unit = "seed" if len(classes) == 1 else "(class, seed)"
    paired = []
    settings = [f"heldout/{s}/{r:g}" for s in ("outputs", "gradients") for r in payload["ratios"]]
    settings += ["paper/outputs/0.05"]
    for setting in settings:
        protocol, scores, ratio = setting.split("/")
        tab, verdict = removal_table(all_rows, all_runs, setting)
        title = (f"## Remove {removed_txt}: {float(ratio):.0%} highest-k {scores}, "
                 f"{protocol} protocol")
        md += [title, "", tab, "", verdict, ""]
        summary.append(f"| class removal, {protocol} | {scores} | {float(ratio):.0%} | {verdict} |")
        by_method = {m: [r for r in all_runs if r["method"] == m
                         and r["setting"] == (f"{protocol}/all" if m == "if" else setting)]
                     for m in NAMES}
        paired += paired_rows([f"class removal, {protocol}", scores, f"{float(ratio):.0%}"],
                              by_method, removed)
    if "backdoor" in payload:
        bd_rows = payload["backdoor"]["baselines"]
        bd_runs = sorted(payload["backdoor"]["runs"], key=lambda r: r["seed"])
        header = ["estimator", "clean-acc", "relabel-acc", "corrupt-acc ↓", "F1", "time s", "HVPs",
                  "classifier rows"]
        body = [[name] + [_pm([r[name][k] for r in bd_rows])
                          for k in ("clean_acc", "relabel_acc", "corrupt_acc", "f1")]
                + ([_pm([r[name]["time_s"] for r in bd_rows], 1)] if name == "retrained" else ["—"])
                + ["—", "—"] for name in ("original", "retrained")]
        body[0][0] = "poisoned model"
        f1s = {}
        for method in ("if", "pif", "fif", "gif"):
            rs = [r for r in bd_runs if r["method"] == method]
            f1s[method] = [r["f1"] for r in rs]
            body.append([NAMES[method] + (" (all params)" if method == "if" else "")]
                        + [_pm([r[k] for r in rs]) for k in
                           ("clean_acc", "relabel_acc", "corrupt_acc", "f1")]
                        + [_pm([r["time_s"] for r in rs], 1), str(int(rs[0]["num_hvps"])), rows_cell(rs)])
        masked = {m: v for m, v in f1s.items() if m != "if"}
        md += ["## Backdoor: 10 % of training images triggered (+1 of 16 grey levels, "
               "checkerboard) and relabelled to 4; 5 % highest-k outputs, heldout protocol", "",
               table(header, body), "",
               f"best mean F1: {winner(f1s)}; among the masked estimators {winner(masked)}. "
               "corrupt-acc counts triggered test images of classes ≠ 4 still predicted as 4.", ""]
        summary.append(f"| backdoor, heldout | outputs | 5% | best mean F1: {winner(f1s)}; "
                       f"among the masked estimators {winner(masked)} |")
        paired += paired_rows(["backdoor, heldout", "outputs", "5%"],
                              {m: [r for r in bd_runs if r["method"] == m] for m in NAMES})
    md += ["## Summary: who wins (mean test F1 over seeds)", "",
           "| task, protocol | scores | ratio | verdict |", "|---|---|---|---|", *summary]
    md += ["", "## Paired differences in test F1 (GIF − other), bootstrap 95 % CIs", "",
           f"Mean paired difference over units (one unit = one {unit}; the backdoor's unit is "
           "the seed), percentile bootstrap 95 % CI (10,000 resamples of the units, seed 0), "
           "then the verdict on the claim \"GIF is better\": **yes** when the CI lies above 0, "
           "**no** when it lies below 0, **inconclusive** when it contains 0. With few units "
           "(n in each cell) the percentile bootstrap CI is narrow and optimistic (it cannot be "
           "wider than the range of the differences), so read \"yes\"/\"no\" as descriptive, "
           "not as a test at 5 %.", "",
           table(["task, protocol", "scores", "ratio", "GIF − IF", "GIF − FIF", "GIF − PIF"],
                 paired)]
    return "\n".join(md)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--class", dest="removed_class", type=int, default=0,
                        help="the removed class (one; see --classes)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="remove each of these classes in turn (overrides --class); "
                             "the paired CIs are then over (class, seed) units")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 5 %% only, 10 solver iterations: checks the script "
                             "(writes results/tasks_quick.*, not tasks.*)")
    parser.add_argument("--no-backdoor", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite tasks.md from an existing results/tasks.json")
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads((RESULTS / "tasks.json").read_text())
        payload.pop("environment")  # write() adds the current one; the run's is kept below
        md = render(payload)
        print(md)
        (RESULTS / "tasks.md").write_text(md.rstrip() + "\n")
        return
    ratios, seeds = (0.05, 0.1, 0.3), args.seeds
    training, base = TrainConfig(), TaskConfig()
    if args.quick:
        ratios, seeds = (0.05,), args.seeds[:1]
        base = dataclasses.replace(base, max_steps=10, num_steps=16, hessian_size=128)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t0 = time.perf_counter()

    classes = args.classes if args.classes else [args.removed_class]
    all_rows, all_runs, bd_rows, bd_runs = [], [], [], []
    for seed in seeds:
        for removed in classes:
            log(f"seed {seed}: class removal of {removed}")
            rows, runs = removal_runs(seed, removed, ratios, ("outputs", "gradients"),
                                      dataclasses.replace(training, seed=seed), base, log)
            all_rows.append(dict(rows, removed_class=removed))
            all_runs += [dict(r, seed=seed, removed_class=removed) for r in runs]
        if not args.no_backdoor:
            log(f"seed {seed}: backdoor")
            rows, runs = backdoor_runs(seed, dataclasses.replace(training, seed=seed), base, log)
            bd_rows.append(rows)
            bd_runs += [dict(r, seed=seed) for r in runs]

    payload = {"seeds": seeds, "removed_class": classes[0], "classes": classes, "quick": args.quick,
               "ratios": list(ratios), "seconds": time.perf_counter() - t0,
               "backend": jax.default_backend(),
               "training": dataclasses.asdict(training), "config": dataclasses.asdict(base),
               "class_removal": {"baselines": all_rows, "runs": all_runs}}
    if bd_rows:
        payload["backdoor"] = {"baselines": bd_rows, "runs": bd_runs}
    md = render(payload)
    path = write("tasks_quick" if args.quick else "tasks", payload, md)
    print(md)
    log(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
