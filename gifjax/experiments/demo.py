"""Make a trained classifier forget one class with IF, PIF, FIF and GIF, and compare with retraining.

What it does (offline; 25–40 s on 2 CPU cores with the defaults, compilation included):

1. loads scikit-learn's bundled 8×8 handwritten digits (no download) and
   splits them into train / validation / test;
2. trains a small CNN (~20k parameters) on the training split;
3. retrains it from scratch without one class — the gold standard an
   influence estimate tries to match without retraining;
4. for each estimator — IF (all parameters), PIF (projected), FIF (frozen
   non-selected parameters) and GIF (generalized, Lyu et al. 2024) — selects
   5 % of each layer's parameters by the highest-k rule on the removed
   class's images, computes the parameter update that removes that class,
   walks along it and keeps the step with the best F1 on the validation split;
5. prints, on the test split: self-acc (accuracy on the removed class, lower
   is better), test-acc (the other classes), F1 = 2(1 − self)(test) /
   ((1 − self) + test), the wall time and the number of Hessian-vector
   products (HVPs) — next to the retrained model;
6. saves a plot of F1 along the step search for each estimator.

Examples:
  python -m gifjax.demo                              # remove class 0 from the digits CNN
  python -m gifjax.demo --class 3 --ratio 0.1 --scores gradients
  python -m gifjax.demo --estimators gif,fif --protocol paper --out gif.png
  python -m gifjax.demo --fast                       # ~20 s: tiny run, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import numpy as np

DEFAULT_PLOT = "gifjax_demo.png"
ESTIMATORS = ("if", "pif", "fif", "gif")
NAMES = {"if": "IF", "pif": "PIF", "fif": "FIF", "gif": "GIF"}


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"got {text!r}; expected a fraction in (0, 1], e.g. 0.05 for 5 % of each layer")
    return value


def _estimators(text: str) -> tuple:
    names = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in ESTIMATORS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"got {text!r}; expected a comma-separated list of distinct names from "
            f"{','.join(ESTIMATORS)}, e.g. if,gif")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .data import NAMES as DATASETS
    from .models import MODELS
    from .tasks.common import RULES

    parser = argparse.ArgumentParser(
        prog="python -m gifjax.demo",
        description=__doc__.split("\n\nExamples:")[0],
        epilog="Examples:" + __doc__.split("\n\nExamples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="digits", choices=DATASETS,
        help="data set (default: digits, bundled with scikit-learn, no download; the others "
             "need tensorflow-datasets and a prepared copy)")
    add("--model", default="cnn", choices=tuple(MODELS),
        help="model (default: cnn, ~20k parameters; tinynet is the paper's MNIST net; "
             "vgg11 / resnet18 are for accelerators)")
    add("--class", dest="removed_class", type=int, default=0, metavar="C",
        help="the class to remove, 0 … num_classes-1 (default: 0)")
    add("--ratio", type=_ratio, default=0.05,
        help="fraction of each layer's parameters that PIF/FIF/GIF may change, in (0, 1] "
             "(default: 0.05); IF always changes all")
    add("--rule", default="highest", choices=RULES,
        help="how units are selected from their scores (default: highest = highest-k)")
    add("--scores", default="outputs", choices=("outputs", "gradients"),
        help="unit scores on the removed class: |mean output| or |mean output-gradient| "
             "(default: outputs)")
    add("--estimators", type=_estimators, default=ESTIMATORS, metavar="LIST",
        help="comma-separated estimators to run (default: if,pif,fif,gif)")
    add("--protocol", default="heldout", choices=("heldout", "paper"),
        help="heldout (default): Hessian from training data, step chosen on the validation "
             "split, numbers on test. paper: the GIF paper's code — Hessian from test images, "
             "step chosen on test (optimistic; for comparison)")
    add("--seed", type=int, default=0, help="data split, initialisation, selection (default: 0)")
    add("--epochs", type=_positive_int, default=None,
        help="training epochs for the model and the baseline (default: 20; 5 with --fast)")
    add("--max-train", type=_positive_int, default=None, metavar="N",
        help="use only N training examples (default: all; 400 with --fast)")
    add("--out", default=DEFAULT_PLOT, metavar="PNG",
        help=f"where to save the plot (default: ./{DEFAULT_PLOT})")
    add("--no-plot", action="store_true", help="do not save the plot (no matplotlib needed)")
    add("--fast", action="store_true",
        help="tiny run, ~20 s, mostly compilation (400 examples, 5 epochs, 10 solver "
             "iterations, coarse step grid): checks the pipeline, not the method")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    t_start = time.perf_counter()

    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401  (checked now, not after minutes of work)
        except ImportError:
            parser.error("argument --out: saving the plot needs matplotlib; "
                         "pip install 'gifjax[demo]' (or matplotlib), or pass --no-plot")

    from . import data
    from .tasks import TaskConfig, TrainConfig, class_removal

    max_train = args.max_train or (400 if args.fast else None)
    try:
        ds = data.load(args.dataset, seed=args.seed, max_train=max_train,
                       max_test=1000 if args.fast else None)
    except (RuntimeError, ImportError) as e:
        parser.error(f"argument --dataset: {args.dataset!r} could not be loaded: {e}")
    if not 0 <= args.removed_class < ds.num_classes:
        parser.error(f"argument --class: got {args.removed_class}; expected an int in "
                     f"[0, {ds.num_classes}) for {args.dataset}")
    for name, split in (("training", ds.train), ("validation", ds.val), ("test", ds.test)):
        if not (split.y == args.removed_class).any():
            parser.error(f"argument --class: class {args.removed_class} has no {name} examples "
                         f"here; expected a class present in every split (use more data)")

    training = TrainConfig(epochs=args.epochs or (5 if args.fast else 20), seed=args.seed)
    config = TaskConfig(ratio=args.ratio, rule=args.rule, scores=args.scores,
                        protocol=args.protocol, seed=args.seed)
    if args.fast:
        config = dataclasses.replace(config, max_steps=10, hessian_size=128, num_steps=16)

    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    exp = class_removal.run_experiment(ds, args.removed_class, model=args.model,
                                       methods=args.estimators, config=config,
                                       training=training, log=say)
    print(report(exp, ds, config, training))
    if not args.no_plot:
        path = plot(exp, config, args.out)
        print(f"\nplot of F1 along the step search: {path}")
    print(f"total wall time: {time.perf_counter() - t_start:.1f} s")
    return exp


def report(exp, ds, config, training) -> str:
    """The demo's text report: set-up, the table, and which estimator won."""
    runs = exp.runs
    masked = [r for r in runs if r.method != "if"]
    total = runs[0].num_params
    pick = "validation" if config.protocol == "heldout" else "TEST (leaky)"
    hess = "training" if config.protocol == "heldout" else "test"
    lines = [
        f"remove class {exp.removed_class} from a {type(exp.model).__name__} ({total:,} parameters) "
        f"trained on {ds.name}: {len(ds.train.y)} train / {len(ds.val.y)} val / "
        f"{len(ds.test.y)} test images",
        f"selection: {config.ratio:g} of each layer, {config.rule}-k {config.scores}"
        + (f" -> {masked[0].num_selected:,} parameters for PIF/FIF/GIF "
           f"(scored in {exp.selection_s:.1f} s)" if masked else ""),
        f"solver: LSTSQ (CGLS) x {config.max_steps} iterations, damping {config.damping:g}, "
        f"Hessian on {config.hessian_size or 'all'} {hess} images; step chosen by F1 on "
        f"{pick} over {config.num_steps + 1} steps",
        "",
        table(exp),
    ]
    best = max(runs, key=lambda r: r.metrics.f1)
    lines += ["", f"best estimator here: {NAMES[best.method]} (test F1 {best.metrics.f1:.3f}; "
              f"retrained {exp.retrained.f1:.3f}). Times exclude compilation "
              f"({sum(r.compile_s for r in runs):.0f} s in all)."]
    return "\n".join(lines)


def table(exp) -> str:
    """The results table (test split): original, retrained and one row per estimator."""
    head = (f"{'':10s}{'self-acc':>10s}{'test-acc':>10s}{'F1':>8s}{'step':>8s}"
            f"{'time s':>9s}{'HVPs':>7s}")
    rule = "-" * len(head)
    row = lambda name, m, step, t, h: (f"{name:10s}{m.self_acc:10.3f}{m.test_acc:10.3f}"
                                       f"{m.f1:8.3f}{step:>8s}{t:>9s}{h:>7s}")
    lines = [head, rule,
             row("original", exp.original, "-", "-", "-"),
             row("retrained", exp.retrained, "-", f"{exp.retrain_s:.1f}", "-")]
    for r in exp.runs:
        lines.append(row(NAMES[r.method], r.metrics, f"{r.step:.3g}", f"{r.time_s:.1f}",
                         str(r.num_hvps)))
    lines += [rule, "self-acc: accuracy on the removed class (lower is better); test-acc: on the "
              "other classes; time: solve + step search (retrained: training time)"]
    return "\n".join(lines)


def plot(exp, config, out) -> pathlib.Path:
    """Save F1 along the step grid per estimator (selection split and test) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "validation" if config.protocol == "heldout" else "test"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, attr, title in ((axes[0], "curve", f"F1 on the {split} split (chooses the step)"),
                            (axes[1], "test_curve", "F1 on the test split")):
        for r in exp.runs:
            curve = getattr(r, attr)
            line, = ax.plot(r.steps, curve.f1, label=NAMES[r.method])
            k = int(np.argmin(np.abs(r.steps - r.step)))
            ax.plot(r.steps[k], curve.f1[k], "o", color=line.get_color())
        ax.axhline(exp.retrained.f1, color="k", ls="--", lw=1, label="retrained (test)")
        ax.set_xscale("symlog", linthresh=config.min_step)
        ax.set_xlim(0, config.max_step)
        ax.set_xlabel("step length s (distance moved along the unit update direction)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("F1 = 2(1 - self)(test) / ((1 - self) + test)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"removing class {exp.removed_class}: {config.ratio:g} {config.rule}-k "
                 f"{config.scores}, {config.protocol} protocol (dots: chosen steps)", fontsize=11)
    fig.tight_layout()
    path = pathlib.Path(out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
