"""Powered class removal and backdoor runs: MNIST-5k with TinyNet, and the digits CNN (issue 13, item 5).

    python -m benchmarks.tasks_mnist --quick                  # smoke test, ~2 minutes on one core
    python -m benchmarks.tasks_mnist [--seeds 0 1 2] [--classes 0 … 9] [--backdoor-seeds 0 … 4]
                                     [--scales mnist digits] [--grid budget|lean|core5|full] [--resume]
    python -m benchmarks.tasks_mnist --render                 # rewrite the .md from the .json

Scales (:data:`SCALES`): ``mnist`` = the paper's TinyNet (398,090 parameters)
on MNIST-5k (3,600 train / 400 validation / 1,000 test images), trained with
the official SGD recipe (:meth:`TrainConfig.paper`, fewer epochs, batch 128);
``digits`` = the demo's CNN (19,466 parameters) on scikit-learn's 8×8 digits
(tasks_report's training). A unit is one (removed class, seed) for class
removal and one seed for the backdoor (MNIST-5k, TinyNet, 10 % of training
images triggered and relabelled to 4). Per seed, the original model is
trained once; per unit, the retrained baseline is trained from scratch.

In each unit: IF on all parameters, then for every entry of the grid
(:data:`GRIDS`; ratio × selection rule × classifier control) one mask shared
by the masked estimators (PIF / FIF / GIF) of that entry. Selection rules:
``outputs`` / ``gradients`` = highest-k by |mean unit output| / |mean
output-gradient| on the examined data, ``random`` = random elements;
classifier controls (:data:`gifjax.selection.CLASSIFIER`): ``rule`` (the
official behaviour), ``exclude``, ``target_row``. Protocol ``heldout``
(Hessian on training images of the other classes, step chosen by F1 on the
validation split, metrics on test).

Metrics per run on the test split at the chosen step: F1 (as tasks_report)
and **agreement** = share of test images of the other classes (backdoor: all
clean and triggered test images) on which the edited model predicts what the
retrained model predicts. Paired differences GIF − IF, GIF − FIF, GIF − PIF
and highest − random, paired by unit, with percentile bootstrap 95 % CIs
(:func:`benchmarks.tasks_report.paired_ci`) and verdicts
(:func:`benchmarks.tasks_report.ci_verdict`).

The JSON is rewritten after every unit (results/tasks_mnist.json, .md), so
an interrupted run keeps what it measured; ``--resume`` skips the units
already in it. ``--quick`` writes tasks_mnist_quick.* instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, table, write  # noqa: E402
from benchmarks.tasks_report import (NAMES, _metrics, _pm, ci_verdict, format_ci,  # noqa: E402
                                     paired_ci, paired_f1)
from gifjax.experiments import data, models, train  # noqa: E402
from gifjax.experiments.tasks import backdoor, class_removal  # noqa: E402
from gifjax.experiments.tasks.common import TaskConfig, TrainConfig  # noqa: E402

#: Selection rules of the grid: name → (TaskConfig.rule, TaskConfig.scores).
RULES = {"outputs": ("highest", "outputs"), "gradients": ("highest", "gradients"),
         "random": ("random", "outputs"), "lowest": ("lowest", "outputs")}
#: The rules of the issue's grids (``lowest`` = lowest-k outputs only enters ``extension`` / ``chain``).
HIGHEST_RANDOM = ("outputs", "gradients", "random")
CONTROLS = ("rule", "exclude", "target_row")
MASKED = ("pif", "fif", "gif")


def _entries(ratios, rules, controls, methods):
    return [(r, rule, c, tuple(methods)) for r in ratios for rule in rules for c in controls]


#: Grids: lists of (ratio, rule, classifier control, masked estimators).
#: ``full`` is the issue's grid; ``core5`` keeps 5 % with every rule × control × estimator;
#: ``lean`` is ``core5`` with PIF only at 5 % outputs/rule, plus GIF on highest-k outputs
#: (official classifier rule) at 2, 10 and 30 %; ``budget`` (what one CPU core affords for
#: TinyNet): 5 % only, every rule × control with GIF, FIF under the official control only, no PIF.
GRIDS = {
    "full": _entries((0.02, 0.05, 0.1, 0.3), HIGHEST_RANDOM, CONTROLS, MASKED),
    "core5": _entries((0.05,), HIGHEST_RANDOM, CONTROLS, MASKED),
    "budget": (_entries((0.05,), HIGHEST_RANDOM, ("rule",), ("fif", "gif"))
               + [e for e in _entries((0.05,), HIGHEST_RANDOM, CONTROLS, ("gif",)) if e[2] != "rule"]),
    "lean": ([(0.05, "outputs", "rule", MASKED)]
             + [e for e in _entries((0.05,), HIGHEST_RANDOM, CONTROLS, ("fif", "gif"))
                if e[1:3] != ("outputs", "rule")]
             + _entries((0.02, 0.1, 0.3), ("outputs",), ("rule",), ("gif",))),
}
#: The claims ``budget`` could not answer, for the ``mnist_ext`` scale: PIF beside FIF and GIF at
#: 5 % highest outputs, GIF on random and on lowest-k outputs at 5 %, GIF on highest-k outputs at
#: 2 / 10 / 30 % (official classifier control); every comparison within the unit's own model.
GRIDS["extension"] = ([(0.05, "outputs", "rule", MASKED), (0.05, "random", "rule", ("gif",)),
                       (0.05, "lowest", "rule", ("gif",))]
                      + _entries((0.02, 0.1, 0.3), ("outputs",), ("rule",), ("gif",)))
#: The digits CNN's extension: the highest-k > random > lowest-k chain (GIF, outputs, 5 %) within one training.
GRIDS["chain"] = [(0.05, rule, "rule", ("gif",)) for rule in ("outputs", "random", "lowest")]


@dataclasses.dataclass(frozen=True)
class Scale:
    """One model / data set pair: how it is trained and how every estimator is run."""

    dataset: str
    model: str
    training: TrainConfig
    config: TaskConfig
    grid: str = "lean"  # the default entry of GRIDS


#: The two scale points. The solver budget and grid are cut to fit one CPU core
#: (see the report's header); tasks_report's digits defaults are 40 iterations,
#: 512 Hessian images and 64 steps.
SCALES = {
    "mnist": Scale("mnist5k", "tinynet", TrainConfig.paper(epochs=5, batch_size=128),
                   TaskConfig(hessian_size=64, max_steps=10, num_steps=24), grid="budget"),
    "digits": Scale("digits", "cnn", TrainConfig(),
                    TaskConfig(hessian_size=256, max_steps=20, num_steps=32)),
}
#: ``mnist`` again for the ``extension`` grid. Training on CPU is not bitwise reproducible
#: (the same seed gave the original model self-acc 0.99 instead of 0.98 on seed 0, class 0),
#: so the extension trains its own models and re-runs IF, FIF and GIF beside the new PIF,
#: lowest-k and ratio runs: its pairs never mix two trainings.
SCALES["mnist_ext"] = dataclasses.replace(SCALES["mnist"], grid="extension")
#: The same for the digits CNN (its training is not reproducible either): the ``chain`` grid.
SCALES["digits_ext"] = dataclasses.replace(SCALES["digits"], grid="chain")
SCALES = {k: SCALES[k] for k in ("mnist", "mnist_ext", "digits", "digits_ext")}
#: Column names of the verdict tables.
LABELS = {"mnist": "MNIST-5k TinyNet, budget grid", "mnist_ext": "MNIST-5k TinyNet, extension grid",
          "digits": "digits CNN, lean grid", "digits_ext": "digits CNN, chain grid"}
BACKDOOR_SCALE = "mnist"
QUICK = dict(max_steps=3, num_steps=8, hessian_size=64)


def _record(result, log, label):
    run = {"method": result.method, **_metrics(result.metrics), "agreement": result.agreement,
           "step": result.step, "time_s": result.time_s, "compile_s": result.compile_s,
           "num_hvps": result.num_hvps, "failure": result.failure,
           "num_selected": result.num_selected, "num_params": result.num_params,
           "classifier_rows": list(result.classifier_rows), "target_row": result.target_row}
    log(f"  {label} {result.method:3s} F1 {result.metrics.f1:.3f} agree {result.agreement:.3f} "
        f"({result.time_s:.1f}+{result.compile_s:.1f} s)")
    return run


def _setting(ratio, rule, control):
    return f"{ratio:g}/{rule}/{control}"


def _wanted(grid) -> list:
    """The (setting, method) pairs a unit of ``grid`` holds: IF on all parameters, then the grid's."""
    return [("all", "if")] + [(_setting(r, rule, c), m) for r, rule, c, ms in grid for m in ms]


def _missing(unit, grid) -> list:
    have = {(r["setting"], r["method"]) for r in unit["runs"]}
    return [w for w in _wanted(grid) if w not in have]


def _grid_runs(grid, base, make_mask, run, log, label, have=frozenset()):
    """IF once, then each grid entry's masked estimators on one shared mask: a list of run dicts.

    Runs whose (setting, method) is in ``have`` (measured before, ``--resume`` with a larger
    grid) are skipped, and so are masks no missing run needs.
    """
    runs = []
    if ("all", "if") not in have:
        runs.append(dict(_record(run(dataclasses.replace(base, method="if"), None), log, label),
                         setting="all"))
    for ratio, rule, control, methods in grid:
        setting = _setting(ratio, rule, control)
        methods = [m for m in methods if (setting, m) not in have]
        if not methods:
            continue
        kind, scores = RULES[rule]
        cfg = dataclasses.replace(base, method="gif", ratio=ratio, rule=kind, scores=scores,
                                  classifier=control)
        mask = make_mask(cfg)[0]
        for method in methods:
            out = run(dataclasses.replace(cfg, method=method), mask)
            runs.append(dict(_record(out, log, f"{label} {setting:>22s}"), setting=setting))
    return runs


def _merge(existing, baseline, runs, log, label) -> tuple:
    """``(baseline, runs)`` of a unit filled in by ``--resume``: the stored baseline and runs plus
    the new runs, and a check that the recomputed baseline (same seed) reproduces the stored one
    — the new runs are paired with the old ones by unit, so the models must be the same."""
    if existing is None:
        return baseline, runs
    check = {name: {k: [existing["baseline"][name][k], baseline[name][k]]
                    for k in baseline[name] if k not in ("time_s", "checkpoint")}
             for name in ("original", "retrained")}
    same = all(abs(a - b) < 1e-9 for d in check.values() for a, b in d.values())
    log(f"  {label}: recomputed baseline {'reproduces' if same else 'DIFFERS FROM'} the stored one")
    fills = existing.get("fills", []) + [{"runs": len(runs), "baseline_reproduced": same,
                                          "baseline": check}]
    return dict(existing["baseline"], fills=fills), existing["runs"] + runs


def _fit(scale: Scale, seed: int, x, y, val, fitter=train.fit, *args):
    """``(fitter(model, x, y, *args, **training), seconds)`` with the scale's training and ``seed``."""
    kwargs = dataclasses.replace(scale.training, seed=seed).fit_kwargs(validation=val)
    t0 = time.perf_counter()
    out = fitter(models.create(scale.model, 10), x, y, *args, **kwargs)
    return out, time.perf_counter() - t0


def removal_unit(scale: Scale, seed: int, removed: int, original, grid, log, existing=None) -> dict:
    """One (class, seed) unit: retrain without ``removed``, then IF and the grid's estimators.

    ``original`` is ``(dataset, model, variables)`` of the seed's trained model; ``existing``
    a stored unit whose missing runs are filled in (see :func:`_merge`).
    Returns ``{"seed", "removed_class", "baseline", "runs"}``.
    """
    ds, net, variables = original
    refit, retrain_s = _fit(scale, seed, *ds.train, ds.val, train.retrain_without_class, removed)
    reference = train.predict(net, refit.variables, ds.test.x).argmax(-1)
    other = ds.test.y != removed
    own = train.predict(net, variables, ds.test.x).argmax(-1)
    baseline = {
        "original": {**_metrics(class_removal.evaluate(net, variables, ds.test, removed)),
                     "agreement": float(class_removal.agreement(own, reference, other))},
        "retrained": {**_metrics(class_removal.evaluate(net, refit.variables, ds.test, removed)),
                      "time_s": retrain_s, "checkpoint": _checkpoint(refit)}}
    base = dataclasses.replace(scale.config, seed=seed)
    wd = scale.training.weight_decay
    runs = _grid_runs(
        grid, base,
        make_mask=lambda cfg: class_removal.removal_mask(net, variables, ds, removed, cfg),
        run=lambda cfg, mask: class_removal.remove_class(net, variables, ds, removed, cfg,
                                                         weight_decay=wd, mask=mask,
                                                         reference=reference),
        log=log, label=f"seed {seed} class {removed}", have=_have(existing))
    runs = [dict(r, seed=seed, removed_class=removed) for r in runs]
    baseline, runs = _merge(existing, baseline, runs, log, f"seed {seed} class {removed}")
    return {"seed": seed, "removed_class": removed, "baseline": baseline, "runs": runs}


def _have(unit) -> frozenset:
    return frozenset() if unit is None else frozenset((r["setting"], r["method"]) for r in unit["runs"])


def backdoor_unit(scale: Scale, seed: int, grid, log, existing=None) -> dict:
    """One backdoor seed: poison, train, retrain on the true labels, then IF and the grid."""
    ds = data.load(scale.dataset, seed=seed)
    poisoned = backdoor.poison(ds, seed=seed)
    target = poisoned.trigger.target
    net = models.create(scale.model, ds.num_classes)
    fit, train_s = _fit(scale, seed, *poisoned.train, ds.val)
    refit, retrain_s = _fit(scale, seed, *poisoned.train, ds.val, train.retrain_on_labels,
                            poisoned.indices, poisoned.true_labels)
    pred = lambda v, s: train.predict(net, v, s.x).argmax(-1)
    reference = (pred(refit.variables, ds.test), pred(refit.variables, poisoned.test_triggered))
    own = np.concatenate([pred(fit.variables, ds.test), pred(fit.variables, poisoned.test_triggered)])
    ev = lambda v: _metrics(backdoor.evaluate(net, v, ds.test, poisoned.test_triggered, target))
    baseline = {"original": {**ev(fit.variables), "time_s": train_s, "checkpoint": _checkpoint(fit),
                             "agreement": float(np.mean(own == np.concatenate(reference)))},
                "retrained": {**ev(refit.variables), "time_s": retrain_s,
                              "checkpoint": _checkpoint(refit)}}
    base = dataclasses.replace(scale.config, seed=seed)
    wd = scale.training.weight_decay
    runs = _grid_runs(
        grid, base,
        make_mask=lambda cfg: backdoor.correction_mask(net, fit.variables, poisoned, cfg),
        run=lambda cfg, mask: backdoor.correct_backdoor(net, fit.variables, ds, poisoned, cfg,
                                                        weight_decay=wd, mask=mask,
                                                        reference=reference),
        log=log, label=f"seed {seed} backdoor", have=_have(existing))
    baseline, runs = _merge(existing, baseline, [dict(r, seed=seed) for r in runs], log,
                            f"seed {seed} backdoor")
    return {"seed": seed, "baseline": baseline, "runs": runs}


def _checkpoint(fit) -> dict | None:
    return None if fit.checkpoint is None else {k: float(v) for k, v in fit.checkpoint._asdict().items()}


# ----------------------------------------------------------------------------- report


def _select(runs, setting, method):
    return [r for r in runs if r["method"] == method
            and r["setting"] == ("all" if method == "if" else setting)]


def _ci_cell(a, b, metric, claimed=+1):
    ci = paired_ci(*paired_f1(a, b, metric=metric))
    return f"{format_ci(ci)} {ci_verdict(ci, claimed)}" if ci["n"] else "—"


def _settings(runs):
    seen = []
    for r in runs:
        if r["setting"] != "all" and r["setting"] not in seen:
            seen.append(r["setting"])
    return seen


#: The paper's claims as (label, (setting, method), (setting, method)); ``{c}`` = the control.
CLAIMS = (("GIF (highest outputs) ≥ IF (all parameters)", ("0.05/outputs/{c}", "gif"), ("all", "if")),
          ("GIF > FIF (highest outputs)", ("0.05/outputs/{c}", "gif"), ("0.05/outputs/{c}", "fif")),
          ("GIF > PIF (highest outputs)", ("0.05/outputs/{c}", "gif"), ("0.05/outputs/{c}", "pif")),
          ("FIF > PIF (highest outputs)", ("0.05/outputs/{c}", "fif"), ("0.05/outputs/{c}", "pif")),
          ("highest outputs > random (GIF)", ("0.05/outputs/{c}", "gif"), ("0.05/random/{c}", "gif")),
          ("highest gradients > random (GIF)", ("0.05/gradients/{c}", "gif"),
           ("0.05/random/{c}", "gif")),
          ("random > lowest outputs (GIF)", ("0.05/random/{c}", "gif"), ("0.05/lowest/{c}", "gif")),
          ("highest outputs > lowest outputs (GIF)", ("0.05/outputs/{c}", "gif"),
           ("0.05/lowest/{c}", "gif")))


def claims_rows(runs) -> list[list[str]]:
    """One row per claim × classifier control that the runs hold: paired CIs in F1 and agreement."""
    rows = []
    for label, (sa, ma), (sb, mb) in CLAIMS:
        for control in CONTROLS:
            a = [r for r in runs if r["setting"] == sa.format(c=control) and r["method"] == ma]
            b = [r for r in runs if r["setting"] == sb.format(c=control) and r["method"] == mb]
            if a and b:
                rows.append([label, control, _ci_cell(a, b, "f1"), _ci_cell(a, b, "agreement")])
    return rows


#: The issue's "Done when" claims, under the official classifier control: (label, links), a link
#: being (name, (setting, method) claimed better, (setting, method) claimed worse). A claim of
#: two links (a > b > c) is **yes** when both are yes, **no** when one is no, else **inconclusive**.
_O, _R, _L = "0.05/outputs/rule", "0.05/random/rule", "0.05/lowest/rule"
VERDICTS = (("GIF > FIF > PIF at 5 % (highest outputs)",
             (("GIF − FIF", (_O, "gif"), (_O, "fif")), ("FIF − PIF", (_O, "fif"), (_O, "pif")))),
            ("highest-k > random > lowest-k at 5 % (outputs, GIF)",
             (("highest − random", (_O, "gif"), (_R, "gif")),
              ("random − lowest", (_R, "gif"), (_L, "gif")))),
            ("5 % GIF (highest outputs) ≥ IF (all parameters)",
             (("GIF − IF", (_O, "gif"), ("all", "if")),)),
            ("highest-k gradients > random at 5 % (GIF)",
             (("highest − random", ("0.05/gradients/rule", "gif"), (_R, "gif")),)))
#: A unit whose GIF (5 %, highest outputs, official control) F1 is below this is an outlier.
OUTLIER_F1 = 0.8


def _pick(runs, setting, method):
    return [r for r in runs if r["setting"] == setting and r["method"] == method]


def verdict_cell(runs, links, metric) -> str:
    """One claim on ``runs``: the verdict, then each link's paired CI (``not run`` where a side is missing)."""
    parts, verdicts = [], []
    for name, (sa, ma), (sb, mb) in links:
        a, b = _pick(runs, sa, ma), _pick(runs, sb, mb)
        if not (a and b):
            parts.append(f"{name} not run")
            verdicts.append(None)
            continue
        ci = paired_ci(*paired_f1(a, b, metric=metric))
        verdicts.append(ci_verdict(ci))
        parts.append(f"{name} {format_ci(ci)}" + (f" {verdicts[-1]}" if len(links) > 1 else ""))
    if all(v is None for v in verdicts):
        return "not run"
    verdict = ("no" if "no" in verdicts else "yes" if all(v == "yes" for v in verdicts)
               else "inconclusive")
    return f"**{verdict}**: " + "; ".join(parts)


def outliers(runs) -> str:
    """How many units of GIF (5 %, highest outputs, official control) are outliers (F1 below
    :data:`OUTLIER_F1`), and how many of them / of the others have the target row in the mask."""
    rs = _pick(runs, "0.05/outputs/rule", "gif")
    if not rs:
        return "not run"
    bad = [r for r in rs if r["f1"] < OUTLIER_F1]
    good = [r for r in rs if r["f1"] >= OUTLIER_F1]
    hit = lambda group: sum(bool(r["target_row"]) for r in group)
    return (f"{len(bad)} of {len(rs)} units below F1 {OUTLIER_F1:g}; target row in the mask in "
            f"{hit(bad)} of those {len(bad)}, in {hit(good)} of the other {len(good)}")


def verdict_tables(payload) -> list[str]:
    """The summary at the top of the report: every claim × task/scale, in F1 and in agreement."""
    cols = [(f"class removal, {LABELS.get(k, k)} (n={sum(u['scale'] == k for u in payload['removal'])})",
             [r for u in payload["removal"] if u["scale"] == k for r in u["runs"]])
            for k in sorted(payload["scales"], key=list(SCALES).index)]
    cols.append((f"backdoor, {LABELS[BACKDOOR_SCALE].split(',')[0]} (n={len(payload['backdoor'])})",
                 [r for u in payload["backdoor"] for r in u["runs"]]))
    cols = [(name, runs) for name, runs in cols if runs]
    md = ["## Verdicts on the paper's claims", "",
          "Official classifier control (`rule`); each cell: the verdict, then the paired difference "
          "(first − second, mean over units) with its bootstrap 95 % CI; a three-way claim gives both "
          "links. **yes** = CI above 0, **no** = CI below 0, **inconclusive** = CI contains 0 (for "
          "≥ this means no difference was detected either way: read the CI's width).", ""]
    for metric, name in (("f1", "F1"), ("agreement", "agreement with the retrained model")):
        body = [[label, *(verdict_cell(runs, chain, metric) for _, runs in cols)]
                for label, chain in VERDICTS]
        md += [f"In {name}:", "", table(["claim", *(c for c, _ in cols)], body), ""]
    md += ["Mask diagnostics of the outliers (GIF, 5 % highest outputs, official control):", ""]
    md += [f"* {c}: {outliers(runs)}" for c, runs in cols]
    return md + [""]


def section(title: str, units: list, unit_name: str) -> list[str]:
    """Markdown for one task × scale: baselines, per-setting means, paired differences."""
    runs = [r for u in units for r in u["runs"]]
    base = [u["baseline"] for u in units]
    md = [f"## {title} ({len(units)} units; unit = {unit_name})", ""]
    if not units:
        return md + ["(no unit measured)", ""]
    metrics = [k for k in ("self_acc", "test_acc", "clean_acc", "relabel_acc", "corrupt_acc")
               if k in runs[0]]
    head = ["setting", "estimator", *metrics, "F1", "agreement", "time s", "target row in mask"]
    body = [["—", name, *[_pm([b[name][k] for b in base]) for k in metrics],
             _pm([b[name]["f1"] for b in base]),
             _pm([b[name]["agreement"] for b in base]) if name == "original" else "1",
             _pm([b[name]["time_s"] for b in base], 1) if "time_s" in base[0][name] else "—", "—"]
            for name in ("original", "retrained")]
    for setting in ["all", *_settings(runs)]:
        for method in (("if",) if setting == "all" else MASKED):
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            if not rs:
                continue
            hits = sum(bool(r["target_row"]) for r in rs)
            body.append([setting, NAMES[method], *[_pm([r[k] for r in rs]) for k in metrics],
                         _pm([r["f1"] for r in rs]), _pm([r["agreement"] for r in rs]),
                         _pm([r["time_s"] for r in rs], 1), f"{hits}/{len(rs)}"])
    md += [table(head, body), ""]
    claims = claims_rows(runs)
    if claims:
        md += ["The paper's claims at 5 % (paired by unit; F1 and agreement):", "",
               table(["claim", "classifier control", "F1", "agreement"], claims), ""]
    for metric in ("f1", "agreement"):
        rows = []
        for setting in _settings(runs):
            rows.append([setting] + [_ci_cell(_select(runs, setting, "gif"), _select(runs, setting, o), metric)
                                     if _select(runs, setting, "gif") and _select(runs, setting, o) else "—"
                                     for o in ("if", "fif", "pif")])
        md += [f"Paired differences in {metric} (GIF − other; claim: GIF is better):", "",
               table(["setting", "GIF − IF", "GIF − FIF", "GIF − PIF"], rows), ""]
        rows = []
        for setting in _settings(runs):
            ratio, rule, control = setting.split("/")
            if rule in ("random", "lowest"):
                continue
            rand = f"{ratio}/random/{control}"
            for method in MASKED:
                a, b = _select(runs, setting, method), _select(runs, rand, method)
                if a and b:
                    rows.append([setting, NAMES[method], _ci_cell(a, b, metric)])
        if rows:
            md += [f"Paired differences in {metric}, highest-k − random (same ratio, control and "
                   "estimator; claim: highest-k is better):", "",
                   table(["setting", "estimator", "highest − random"], rows), ""]
    return md


def render(payload: dict) -> str:
    """The Markdown report from the JSON payload (``--render`` redoes it)."""
    history = payload.get("history") or [{"command": c} for c in payload.get("resumed_from", [])]
    runs = "".join(f"`{h['command']}`" + (f" ({h['status']})" if h.get("status") else "") + ", then "
                   for h in history)
    md = ["# Powered class removal and backdoor runs (issue 13)", "",
          f"Generated by {runs}`{payload['command']}` ({payload['status']}); "
          f"{payload['seconds'] / 60:.1f} min in all ({payload['backend']}, one pinned CPU core). "
          "Protocol `heldout`: Hessian on training images (class removal: of the other classes), "
          "step chosen by F1 on validation, every number on the test split at that step. "
          "Mean ± sample std over units. **agreement** = share of test images of the other "
          "classes (backdoor: all clean and triggered test images) on which the edited model "
          "predicts what the retrained model predicts. Paired differences: mean over units, "
          "percentile bootstrap 95 % CI (10,000 resamples, seed 0), verdict on the stated claim "
          "(**yes**: CI above 0, **no**: below 0, else **inconclusive**). Times exclude "
          "compilation; retrained rows: training time.", ""]
    for name, sc in payload["scales"].items():
        md.append(f"* `{name}`: {sc['model']} ({format(sc['num_params'], ',') if 'num_params' in sc else 'not trained yet:'} parameters) on "
                  f"{sc['dataset']}; training {json.dumps(sc['training'])}; every estimator: LSTSQ "
                  f"(CGLS) × {sc['config']['max_steps']} iterations = "
                  f"{2 * sc['config']['max_steps'] + 1} HVPs on {sc['config']['hessian_size']} "
                  f"images, damping {sc['config']['damping']:g}, step grid 0 and "
                  f"{sc['config']['num_steps']} geometric steps {sc['config']['min_step']:g}…"
                  f"{sc['config']['max_step']:g}. Grid `{sc['grid']}`: " + "; ".join(
                      f"{_setting(r, rule, c)} ({'/'.join(NAMES[m] for m in ms)})"
                      for r, rule, c, ms in sc["grid_entries"]) + "; plus IF (all parameters).")
    md.append("")
    md += verdict_tables(payload)
    for name in sorted(payload["scales"], key=list(SCALES).index):
        units = [u for u in payload["removal"] if u["scale"] == name]
        md += section(f"Class removal, {name}", units, "(removed class, seed)")
    md += section(f"Backdoor relabelling, {BACKDOOR_SCALE}", payload["backdoor"], "seed")
    return "\n".join(md)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--backdoor-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    parser.add_argument("--grid", default=None, choices=list(GRIDS),
                        help="one grid for every scale (default: each scale's own, Scale.grid)")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, classes 0 and 1, 1 backdoor seed, 2 training epochs, tiny "
                             "solver budget: checks the script (writes tasks_mnist_quick.*)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the units already in the JSON and run only the missing ones")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args(argv)
    name = "tasks_mnist_quick" if args.quick else "tasks_mnist"
    if args.render:
        payload = json.loads((RESULTS / f"{name}.json").read_text())
        payload.pop("environment", None)
        md = render(payload)
        (RESULTS / f"{name}.md").write_text(md.rstrip() + "\n")
        print(md)
        return
    scales = {k: SCALES[k] for k in args.scales}
    grids = {k: [e for e in GRIDS[args.grid or s.grid]
                 if not args.quick or (e[0] == 0.05 and e[2] != "exclude")] for k, s in scales.items()}
    grids.setdefault(BACKDOOR_SCALE, GRIDS[args.grid or SCALES[BACKDOOR_SCALE].grid])
    seeds, classes, bd_seeds = args.seeds, args.classes, args.backdoor_seeds
    if args.quick:
        seeds, classes, bd_seeds = seeds[:1], classes[:2], bd_seeds[:1]
        scales = {k: dataclasses.replace(
            s, config=dataclasses.replace(s.config, **QUICK),
            training=dataclasses.replace(s.training, epochs=2 if k == "mnist" else 10))
            for k, s in scales.items()}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    command = "python -m benchmarks.tasks_mnist " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command.strip(), "quick": args.quick, "backend": jax.default_backend(),
               "scales": {k: {"dataset": s.dataset, "model": s.model, "grid": args.grid or s.grid,
                              "grid_entries": [list(e) for e in grids[k]],
                              "training": dataclasses.asdict(s.training),
                              "config": dataclasses.asdict(s.config)} for k, s in scales.items()},
               "removal": [], "backdoor": [], "seconds": 0.0, "status": "running"}
    if args.resume and (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        payload["removal"], payload["backdoor"] = old["removal"], old["backdoor"]
        payload["seconds"] = old["seconds"]
        payload["resumed_from"] = old.get("resumed_from", []) + [old["command"]]
        payload["history"] = (old.get("history") or [{"command": c} for c in old.get("resumed_from", [])]) \
            + [{"command": old["command"], "status": old["status"], "seconds": old["seconds"]}]
        for key, sc in payload["scales"].items():  # the measured parts of the scales, if the same
            was = old["scales"].get(key, {})
            if {k: was.get(k) for k in ("training", "config")} == {k: sc[k] for k in ("training", "config")}:
                sc.update({k: was[k] for k in ("num_params", "train_s", "checkpoint") if k in was})
        for key, was in old["scales"].items():  # scales not run this time keep their description
            payload["scales"].setdefault(key, was)
    # A stored unit is done when it holds every run of its grid; one that lacks some (a larger
    # grid with --resume) is filled in: its seed's model and its reference are trained again.
    stored = {(u["scale"], u["seed"], u["removed_class"]): u for u in payload["removal"]}
    stored |= {("backdoor", u["seed"], None): u for u in payload["backdoor"]}
    grid_of = lambda k: grids.get(BACKDOOR_SCALE if k[0] == "backdoor" else k[0])
    done = {k for k, u in stored.items() if grid_of(k) is None or not _missing(u, grid_of(k))}

    def put(kind, unit, key):
        units = payload[kind]
        if key in stored:
            units[units.index(stored[key])] = unit
        else:
            units.append(unit)
        stored[key] = unit

    t0 = time.perf_counter() - payload["seconds"]

    def save(status="running"):
        payload["seconds"], payload["status"] = time.perf_counter() - t0, status
        write(name, payload, render(payload))

    # Seed-major order, the backdoor seeds spread over the removal seeds (before them), the
    # scales in the order given, so an interrupted run holds whole seeds of every task.
    per = -(-len(bd_seeds) // max(len(seeds), 1))
    for i, seed in enumerate(seeds or [None]):
        for bd_seed in bd_seeds[i * per:(i + 1) * per]:
            if ("backdoor", bd_seed, None) in done:
                continue
            log(f"backdoor seed {bd_seed}")
            key = ("backdoor", bd_seed, None)
            put("backdoor", backdoor_unit(scales.get(BACKDOOR_SCALE, SCALES[BACKDOOR_SCALE]),
                                          bd_seed, grids[BACKDOOR_SCALE], log, stored.get(key)),
                key)
            save()
        for key, scale in scales.items():
            todo = [c for c in classes if (key, seed, c) not in done] if seed is not None else []
            if not todo:
                continue
            ds = data.load(scale.dataset, seed=seed)
            net = models.create(scale.model, ds.num_classes)
            log(f"{key} seed {seed}: training {scale.model} on {len(ds.train.y)} images")
            fit, train_s = _fit(scale, seed, *ds.train, ds.val)
            payload["scales"][key]["num_params"] = sum(
                int(np.size(p)) for p in jax.tree_util.tree_leaves(fit.variables["params"]))
            payload["scales"][key].setdefault("train_s", {})[str(seed)] = train_s
            payload["scales"][key].setdefault("checkpoint", {})[str(seed)] = _checkpoint(fit)
            for removed in todo:
                log(f"{key} seed {seed}: class {removed}")
                unit = removal_unit(scale, seed, removed, (ds, net, fit.variables), grids[key],
                                    log, stored.get((key, seed, removed)))
                put("removal", {"scale": key, **unit}, (key, seed, removed))
                save()
    save("complete")
    print(render(payload))
    log(f"wrote {RESULTS / name}.json in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
