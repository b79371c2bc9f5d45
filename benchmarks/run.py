"""Run every benchmark, then collect the results into results/SUMMARY.md with plots.

    python -m benchmarks.run [--quick] [--only core,lowrank] [--list] [--summary-only]

Each benchmark runs as its own process, ``python -m benchmarks.<name> [--quick]``,
in the fixed order of ``BENCHMARKS``, with its output streamed through. A
benchmark whose module is not there is reported as missing and skipped; a
failing one is recorded and the rest still run, and the exit status is 1 if
any failed. Then:

* ``results/run.json`` (+ ``run.md``): per benchmark the command, exit status
  and wall time (and the last lines of output of a failure);
* PNG plots under ``results/`` from whichever result JSONs exist (``PLOTS``;
  matplotlib's Agg backend, nothing is shown);
* ``results/SUMMARY.md``: the run table, then each benchmark's own
  ``results/<name>.md`` in the same order, with its plots.

``--summary-only`` redoes the plots and SUMMARY.md from existing results without
running anything; ``--list`` prints the plan. ``--results DIR`` (or the
environment variable GIFJAX_BENCH_RESULTS) sends everything to DIR instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from collections import deque

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(ROOT) not in sys.path:  # run as a file
    sys.path.insert(0, str(ROOT))
DEFAULT_RESULTS = pathlib.Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str                  # what --only takes
    module: str                # run as `python -m <module>`
    results: tuple[str, ...]   # result basenames under results/, first existing one is used

    def command(self, quick: bool) -> list[str]:
        return [sys.executable, "-m", self.module] + (["--quick"] if quick else [])

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False


def _bench(name: str, *results: str) -> Benchmark:
    return Benchmark(name, f"benchmarks.{name}", results or (name,))


BENCHMARKS = [
    _bench("core"),
    _bench("selection_bench", "selection"),
    _bench("lowrank"),
    _bench("solvers", "solvers", "solver_cases"),
    _bench("memory"),
    _bench("precision"),
    _bench("parallel"),
    _bench("evaluation"),
    _bench("tasks_report", "tasks", "tasks_quick"),
    _bench("selection_rules", "selection_rules", "selection_rules_quick"),
    _bench("peer"),
]


def results_dir(path=None) -> pathlib.Path:
    return pathlib.Path(path or os.environ.get("GIFJAX_BENCH_RESULTS") or DEFAULT_RESULTS)


def select(names: str | None) -> list[Benchmark]:
    if not names:
        return list(BENCHMARKS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {b.name: b for b in BENCHMARKS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"benchmarks.run: unknown benchmark(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return [b for b in BENCHMARKS if b.name in wanted]  # the fixed order, not the given one


def run_one(bench: Benchmark, quick: bool, env: dict, tail_lines: int = 30) -> dict:
    """Run one benchmark as a subprocess, streaming its output; return its record."""
    cmd = bench.command(quick)
    record = {"name": bench.name, "command": " ".join([os.path.basename(cmd[0])] + cmd[1:])}
    if not bench.available():
        print(f"\n=== {bench.name}: module {bench.module} not found — skipped", flush=True)
        return dict(record, status="missing", returncode=None, seconds=0.0)
    print(f"\n=== {bench.name}: {record['command']}", flush=True)
    tail = deque(maxlen=tail_lines)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    seconds = time.perf_counter() - t0
    status = "ok" if returncode == 0 else "failed"
    print(f"=== {bench.name}: {status} (exit {returncode}) in {seconds:.1f} s", flush=True)
    record.update(status=status, returncode=returncode, seconds=seconds)
    if status == "failed":
        record["output_tail"] = list(tail)
    return record


def run_markdown(records: list[dict], quick: bool) -> str:
    lines = [f"### Benchmark runs (last: {'--quick' if quick else 'full'}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             "| benchmark | command | status | exit | wall s | when |", "|---|---|---|---|---|---|"]
    for r in records:
        rc = "—" if r["returncode"] is None else str(r["returncode"])
        lines.append(f"| {r['name']} | `{r['command']}` | {r['status']} | {rc} | "
                     f"{r['seconds']:.1f} | {r.get('time', '')} |")
    return "\n".join(lines) + "\n"


def write_run(out: pathlib.Path, records: list[dict], quick: bool, total_s: float) -> None:
    """Write run.json/run.md; records of benchmarks not run this time are kept from the last file."""
    out.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    merged = {}
    try:
        merged = {r["name"]: r for r in json.loads((out / "run.json").read_text())["benchmarks"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    merged.update({r["name"]: dict(r, quick=quick, time=now) for r in records})
    order = [b.name for b in BENCHMARKS]
    rows = sorted(merged.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    payload = {"quick": quick, "python": sys.executable, "total_s": total_s, "time": now,
               "ran": [r["name"] for r in records],
               "failed": [r["name"] for r in records if r["status"] == "failed"], "benchmarks": rows}
    (out / "run.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "run.md").write_text(run_markdown(rows, quick))


# ----------------------------------------------------------------------------- SUMMARY.md

def result_file(bench: Benchmark, out: pathlib.Path, suffix: str) -> pathlib.Path | None:
    for base in bench.results:
        path = out / f"{base}{suffix}"
        if path.exists():
            return path
    return None


def _demote(text: str) -> str:
    """Headings of an included file go below its section: "# x" / "## x" become "### x"."""
    lines, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if line[level:level + 1] == " " and level < 3:
                line = "###" + line[level:]
        lines.append(line)
    return "\n".join(lines)


def _images(out: pathlib.Path, stem: str) -> list[str]:
    """Markdown links to out/<stem>_*.png, not those of a longer result name (selection_rules_*)."""
    others = [b for bench in BENCHMARKS for b in bench.results if b != stem and b.startswith(stem)]
    pngs = [p for p in sorted(out.glob(f"{stem}_*.png"))
            if not any(p.name.startswith(o + "_") for o in others)]
    return [" ".join(f"![{p.stem}]({p.name})" for p in pngs), ""] if pngs else []


def summary(out: pathlib.Path, benchmarks=None) -> pathlib.Path:
    """Write out/SUMMARY.md: run.md, then every benchmark's <name>.md (with its plots)."""
    benchmarks = BENCHMARKS if benchmarks is None else benchmarks
    parts = ["# Benchmark summary", "",
             "Generated by `python -m benchmarks.run` from the files in this folder; each "
             "section is that benchmark's own `<name>.md` (regenerate with "
             "`python -m benchmarks.run --summary-only`).", ""]
    if (out / "run.md").exists():
        parts += [(out / "run.md").read_text().rstrip(), ""] + _images(out, "run")
    missing = []
    for bench in benchmarks:
        md = result_file(bench, out, ".md")
        if md is None:
            missing.append(bench.name)
            continue
        note = []
        meta = result_file(bench, out, ".json")
        if meta is not None:
            try:
                data = json.loads(meta.read_text())
            except (OSError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            if data.get("quick"):
                note.append("--quick")
            if data.get("skipped"):
                note.append("skipped")
            when = (data.get("environment") or {}).get("time")
            if when:
                note.append(when)
        head = f"## {bench.name} (`{md.name}`{', ' + ', '.join(note) if note else ''})"
        parts += [head, "", _demote(md.read_text().rstrip()), ""] + _images(out, md.stem)
    if missing:
        parts += [f"No results yet for: {', '.join(missing)}.", ""]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


# ----------------------------------------------------------------------------- plots

def _load(out: pathlib.Path, name: str):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_suffix(".png.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def plot_core(out, plt):
    data = _load(out, "core")
    if not data or "gif_hvp_counts" not in data:
        return []
    counts = data["gif_hvp_counts"]
    masks = [k for k in counts if isinstance(counts[k], dict) and "lstsq" in counts[k]]
    solvers = [("lstsq", "LSTSQ (CGLS)"), ("cg_normal", "CG (normal eq.)"),
               ("richardson", "Richardson (paper)")]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / len(solvers)
    for k, (key, label) in enumerate(solvers):
        xs = [i + (k - 1) * width for i in range(len(masks))]
        hvps = [counts[m][key]["hvps"] for m in masks]
        bars = ax.bar(xs, hvps, width, label=label)
        for bar, m in zip(bars, masks):
            if not counts[m][key]["converged"]:
                bar.set_hatch("//")
                ax.annotate("not converged", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(masks)), [f"{float(m):.0%} mask" for m in masks])
    ax.set_yscale("log")
    ax.set_ylabel("HVPs to rel. normal residual 1e-6")
    ax.set_title("GIF on a digits MLP: HVPs per solver" + (" (--quick)" if data.get("quick") else ""))
    ax.legend(fontsize=8)
    paths = [_save(fig, out / "core_hvps.png")]
    plt.close(fig)
    cost = data.get("hvp_cost")
    if cost:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        models = list(cost)
        for k, (key, label) in enumerate((("masked_hvp_over_grad", "fresh masked HVP"),
                                          ("loop_product_over_grad", "per product in a solver loop"))):
            ax.bar([i + (k - 0.5) * 0.4 for i in range(len(models))],
                   [cost[m][key] for m in models], 0.4, label=label)
        ax.set_xticks(range(len(models)), [f"{m.upper()} ({cost[m]['params']:,} params)" for m in models])
        ax.axhline(2.0, color="k", lw=0.8, ls="--")
        ax.set_ylabel("time ÷ one gradient")
        ax.set_title("HVP cost relative to a gradient")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "core_hvp_cost.png"))
        plt.close(fig)
    return paths


def plot_lowrank(out, plt):
    data = _load(out, "lowrank")
    if not data or "lowrank" not in data:
        return []
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for rank, entry in data["lowrank"].items():
        qs = sorted(int(q) for q in entry["per_query_s"])
        ax.plot(qs, [entry["per_query_s"][str(q)] * 1e3 for q in qs], "o-", label=f"low rank {rank}")
    cg = data.get("cg") or {}
    if cg:
        qs = sorted(int(q) for q in cg)
        ax.plot(qs, [cg[str(q)]["per_query_s"] * 1e3 for q in qs], "ks--", label="vmapped CG")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("queries Q")
    ax.set_ylabel("ms per query (factorisation included)")
    ax.set_title("Per-query time vs Q" + (" (--quick)" if data.get("quick") else ""))
    ax.legend(fontsize=8)
    paths = [_save(fig, out / "lowrank_per_query.png")]
    plt.close(fig)
    acc = data.get("accuracy") or {}
    if acc:
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        for label, entry in acc.items():
            ranks = sorted(int(r) for r in entry if r.isdigit())
            ax.plot(ranks, [entry[str(r)]["spearman"] for r in ranks], "o-", label=f"λ = {label}")
            ax.plot(ranks, [entry[str(r)]["complement_spearman"] for r in ranks], "o:",
                    label=f"λ = {label}, 1/λ complement")
        ax.set_xlabel("rank")
        ax.set_ylabel("Spearman vs exact scores")
        ax.set_title("Low-rank score accuracy")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "lowrank_accuracy.png"))
        plt.close(fig)
    return paths


def plot_selection(out, plt):
    data = _load(out, "selection")
    if not data or "fractions" not in data:
        return []
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ratios = [f["ratio"] for f in data["fractions"]]
    ax.plot(ratios, [f["selected_fraction"] for f in data["fractions"]], "o-", label="selected")
    ax.plot(ratios, ratios, "k:", label="requested")
    ax.set_xlabel("requested ratio")
    ax.set_ylabel("selected fraction of parameters")
    ax.set_title("highest-k selection")
    ax.legend(fontsize=8)
    path = _save(fig, out / "selection_fractions.png")
    plt.close(fig)
    return [path]


def plot_tasks(out, plt):
    import numpy as np

    name = "tasks" if (out / "tasks.json").exists() else "tasks_quick"
    data = _load(out, name)
    if not data or "class_removal" not in data:
        return []
    runs = data["class_removal"]["runs"]
    settings = [s for s in dict.fromkeys(r["setting"] for r in runs) if not s.endswith("/all")]
    methods = ["pif", "fif", "gif"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(settings) + 2), 4.0))
    width = 0.8 / (len(methods) + 1)
    f1_if = [r["f1"] for r in runs if r["method"] == "if" and r["setting"] == "heldout/all"]
    base = [b["retrained"]["f1"] for b in data["class_removal"]["baselines"]]
    for k, m in enumerate(methods):
        vals = [[r["f1"] for r in runs if r["method"] == m and r["setting"] == s] for s in settings]
        ax.bar([i + (k - 1) * width for i in range(len(settings))],
               [np.mean(v) if v else np.nan for v in vals], width,
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], capsize=2,
               label=m.upper())
    if f1_if:
        ax.axhline(np.mean(f1_if), color="k", ls="--", lw=0.8, label="IF (all params)")
    if base:
        ax.axhline(np.mean(base), color="g", ls=":", lw=1, label="retrained")
    ax.set_xticks(range(len(settings)), [s.replace("/", "\n") for s in settings], fontsize=7)
    ax.set_ylabel("test F1 (mean ± std over seeds)")
    ax.set_title(f"Class removal, {len(data['seeds'])} seed(s)")
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    path = _save(fig, out / f"{name}_f1.png")
    plt.close(fig)
    return [path]


def plot_memory(out, plt):
    data = _load(out, "memory")
    if not data or not isinstance(data.get("runs"), list):
        return []
    runs = [r for r in data["runs"] if {"n_train", "source", "peak_mib"} <= set(r)]
    if not runs:
        return []
    sources = list(dict.fromkeys(r["source"] for r in runs))
    sizes = sorted({r["n_train"] for r in runs})
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    width = 0.8 / len(sizes)
    for k, n in enumerate(sizes):
        vals = [next((r["peak_mib"] for r in runs if r["source"] == s and r["n_train"] == n), 0)
                for s in sources]
        ax.bar([i + (k - (len(sizes) - 1) / 2) * width for i in range(len(sources))], vals, width,
               label=f"N = {n:,}")
    ax.set_xticks(range(len(sources)), sources)
    ax.set_ylabel("peak RSS MiB")
    ax.set_title("score_stream peak memory vs N")
    ax.set_ylim(0, 1.25 * max(r["peak_mib"] for r in runs))
    ax.legend(fontsize=8)
    path = _save(fig, out / "memory_peak.png")
    plt.close(fig)
    return [path]


def plot_parallel(out, plt):
    data = _load(out, "parallel")
    res = data.get("results") if isinstance(data, dict) else None
    if not isinstance(res, dict):
        return []
    rows = [(k, v["seconds"]) for k, v in res.items() if isinstance(v, dict) and "seconds" in v]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.3))
    ax.barh([k for k, _ in rows], [v * 1e3 for _, v in rows])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("ms (median)")
    ax.set_title(f"influence_scores on {data.get('devices', '?')} devices"
                 + (" (--quick)" if data.get("quick") else ""))
    path = _save(fig, out / "parallel_times.png")
    plt.close(fig)
    return [path]


def plot_peer(out, plt):
    data = _load(out, "peer")
    if not data or data.get("skipped") or not data.get("jobs"):
        return []
    jobs = data["jobs"]
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for k, (key, label) in enumerate((("gifjax_s", "gifjax (dense)"), ("pydvl_s", "pyDVL DirectInfluence"))):
        ax.bar([i + (k - 0.5) * 0.4 for i in range(len(jobs))], [j[key] for j in jobs], 0.4, label=label)
    ax.set_xticks(range(len(jobs)), [f"{j['model']}\n{j['params']} params, max|ΔI| {j['max_abs_diff']:.1e}"
                                     for j in jobs], fontsize=7)
    ax.set_ylabel("wall s (median)")
    ax.set_title("Exact influence matrix: gifjax vs pyDVL")
    ax.legend(fontsize=8)
    path = _save(fig, out / "peer_times.png")
    plt.close(fig)
    return [path]


def plot_run(out, plt):
    data = _load(out, "run")
    if not data:
        return []
    rows = [r for r in data.get("benchmarks", []) if r.get("status") in ("ok", "failed")]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6.0, 0.4 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows], [r["seconds"] for r in rows],
            color=["tab:blue" if r["status"] == "ok" else "tab:red" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("wall s")
    ax.set_title("Benchmark run times" + (" (--quick)" if data.get("quick") else ""))
    path = _save(fig, out / "run_times.png")
    plt.close(fig)
    return [path]


# result JSON basename -> plotter; a plotter returns the PNGs it wrote ([] if its JSON is absent)
PLOTS = {"core": plot_core, "lowrank": plot_lowrank, "selection": plot_selection,
         "tasks": plot_tasks, "memory": plot_memory, "parallel": plot_parallel, "peer": plot_peer,
         "run": plot_run}


def plots(out: pathlib.Path) -> list[pathlib.Path]:
    """Draw every plot whose JSON exists; a failing plotter is reported, not fatal."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks.run: matplotlib is not installed — no plots (pip install -e '.[bench]')")
        return []
    written = []
    for name, fn in PLOTS.items():
        try:
            written += fn(out, plt)
        except Exception as e:  # noqa: BLE001 - a plot must never fail the run
            print(f"benchmarks.run: plot for {name} failed: {type(e).__name__}: {e}")
            plt.close("all")
    return written


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", help="comma-separated benchmark names (run in the fixed order)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--summary-only", action="store_true",
                        help="only redo the plots and SUMMARY.md from existing results")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--results", help="results folder (default benchmarks/results, or "
                                          "$GIFJAX_BENCH_RESULTS)")
    args = parser.parse_args(argv)
    chosen = select(args.only)
    out = results_dir(args.results)
    if args.list:
        for b in chosen:
            state = "" if b.available() else "   (module not found: would be skipped)"
            print(" ".join(["python"] + b.command(args.quick)[1:]) + state)
        return 0
    failed = []
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        env = dict(os.environ, GIFJAX_BENCH_RESULTS=str(out.resolve()))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        records = [run_one(b, args.quick, env) for b in chosen]
        write_run(out, records, args.quick, time.perf_counter() - t0)
        failed = [r["name"] for r in records if r["status"] == "failed"]
        missing = [r["name"] for r in records if r["status"] == "missing"]
        print(f"\n=== done in {time.perf_counter() - t0:.0f} s: "
              f"{sum(r['status'] == 'ok' for r in records)} ok"
              + (f", failed: {', '.join(failed)}" if failed else "")
              + (f", missing: {', '.join(missing)}" if missing else ""))
    if not args.no_plots:
        for p in plots(out):
            print(f"plot: {p}")
    print(f"summary: {summary(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
