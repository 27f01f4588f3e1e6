"""The demo's results: speed-up metrics, compute accounting, the table, the JSON and the PNG.

Definitions (the README and docs/demo.md explain them in words):

- ``final_acc``: the test metric after the last step, mean over seeds (and its spread).
- ``steps_to_uniform_final``: the first evaluated step at which a method's seed-mean
  curve reaches uniform's final (seed-mean) value; None if it never does. For uniform
  itself this is where its own curve first got there (before the end when it peaks
  early and then fits the noise); its ratios below are 1 by definition.
- ``speedup_steps``: uniform's total steps / that step count (the JEST paper's "uniform
  needs N steps to get there, this method M"). ``speedup_vs_first_reach`` divides
  uniform's own first-reach step instead (smaller when uniform peaks early and then
  overfits the noise): the conservative figure.
- compute, in forward-pass units F per trained example, as docs/design.md counts it:
  a plain step costs 3F per example (forward + backward); a selection step costs the
  learner's forward on the whole super-batch (B/b per trained example) plus the
  backward (2F; the forward on the chosen b is the scoring pass's), and the reference's
  forward on the super-batch (another B/b) unless its outputs are cached:
  (2 + B/b) F cached, (2 + 2B/b) F live. ``compute_speedup`` = uniform's total compute /
  the compute this method spent to reach uniform's final value (against uniform's whole
  budget, like ``speedup_steps``). One-off costs (training
  the reference, one cached reference pass per training example) are reported apart, and
  in ``compute_speedup_with_one_off``.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field

import numpy as np

METHOD_ORDER = ("uniform", "topk", "joint")
LABELS = {
    "uniform": "uniform",
    "topk": "learnability + topk (RHO-LOSS)",
    "joint": "learnability + joint (JEST)",
}
COLORS = {"uniform": "tab:gray", "topk": "tab:blue", "joint": "tab:red"}


@dataclass
class MethodRuns:
    """One method's runs over seeds: evaluated steps (E,), metric curves (seeds, E), the
    share of corrupted examples among those trained on, and wall-clock seconds, per seed."""

    method: str
    steps: np.ndarray
    curves: list[list[float]] = field(default_factory=list)
    corrupted_selected: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    fallbacks: list[int] = field(default_factory=list)

    def add(self, result) -> MethodRuns:
        """Append one seed's RunResult (from training.train_run)."""
        self.curves.append(result.values)
        self.corrupted_selected.append(result.corrupted_selected)
        self.seconds.append(result.seconds)
        self.fallbacks.append(result.fallbacks)
        return self

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.curves, dtype=np.float64)

    @property
    def mean_curve(self) -> np.ndarray:
        return self.array.mean(axis=0)


def steps_to_reach(steps: np.ndarray, curve: np.ndarray, target: float) -> int | None:
    """The first step whose value reaches ``target`` (up to float rounding), or None."""
    hit = np.flatnonzero(np.asarray(curve) >= target - 1e-9)
    return int(steps[hit[0]]) if hit.size else None


def cost_per_example(method: str, super_batch: int, sub_batch: int) -> dict[str, float]:
    """Forward passes F per trained example, reference cached and live (see the module docstring)."""
    if method == "uniform":
        return {"cached": 3.0, "uncached": 3.0}
    ratio = super_batch / sub_batch
    return {"cached": 2.0 + ratio, "uncached": 2.0 + 2.0 * ratio}


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _std(values: list[float]) -> float:
    return float(np.std(values)) if len(values) > 1 else 0.0


def summarize(runs: dict[str, MethodRuns], *, task: str, metric: str, config: dict,
              reference_training_F: float = 0.0, cache_fill_F: float = 0.0) -> dict:
    """The demo's result as a JSON-ready dict: {"task", "metric", "config", "methods": {...}}.

    ``reference_training_F`` and ``cache_fill_F`` (one reference pass per training
    example) are the one-off costs of selection; ``compute_speedup_with_one_off`` adds
    them to each method's compute (the cache fill only where the reference is cached).
    """
    one_off = {"cached": reference_training_F + cache_fill_F, "uncached": reference_training_F}
    uniform = runs["uniform"]
    total_steps = int(uniform.steps[-1])
    target = float(uniform.mean_curve[-1])
    uniform_first = steps_to_reach(uniform.steps, uniform.mean_curve, target)
    big_b, small_b = int(config["super_batch"]), int(config["sub_batch"])
    uniform_compute = total_steps * small_b * 3.0
    methods: dict[str, dict] = {}
    for name in [m for m in METHOD_ORDER if m in runs] + [m for m in runs if m not in METHOD_ORDER]:
        r = runs[name]
        arr = r.array
        reach = steps_to_reach(r.steps, r.mean_curve, target)
        per_seed = [steps_to_reach(r.steps, c, target) for c in arr]
        cost = cost_per_example(name, big_b, small_b)
        baseline = name == "uniform"  # the yardstick: its ratios are 1 by definition
        methods[name] = {
            "final_acc": float(arr[:, -1].mean()),
            "final_acc_std": _std(list(arr[:, -1])),
            "final_acc_per_seed": [float(v) for v in arr[:, -1]],
            "best_acc": float(r.mean_curve.max()),
            "steps_to_uniform_final": reach,
            "steps_to_uniform_final_per_seed": per_seed,
            "speedup_steps": 1.0 if baseline else _ratio(total_steps, reach),
            "speedup_vs_first_reach": 1.0 if baseline else _ratio(uniform_first, reach),
            "compute_per_example_F": cost,
            "compute_speedup": {
                kind: 1.0 if baseline else _ratio(uniform_compute, None if reach is None else reach * small_b * c)
                for kind, c in cost.items()
            },
            "compute_speedup_with_one_off": {
                kind: 1.0 if baseline else _ratio(
                    uniform_compute, None if reach is None else reach * small_b * c + one_off[kind])
                for kind, c in cost.items()
            },
            "corrupted_selected": float(np.mean(r.corrupted_selected)) if r.corrupted_selected else None,
            "corrupted_selected_per_seed": [float(v) for v in r.corrupted_selected],
            "seconds_per_run": float(np.mean(r.seconds)) if r.seconds else None,
            "fallbacks": int(sum(r.fallbacks)),
        }
    return {
        "task": task,
        "metric": metric,
        "target": target,
        "total_steps": total_steps,
        "config": config,
        "one_off_F": {"reference_training": reference_training_F, "reference_cache_fill": cache_fill_F},
        "uniform_compute_F": uniform_compute,
        "methods": methods,
        "curves": {name: _curve(r) for name, r in runs.items()},
    }


def _curve(r: MethodRuns) -> dict:
    return {"steps": [int(s) for s in r.steps], "mean": [float(v) for v in r.mean_curve],
            "std": [float(v) for v in r.array.std(axis=0)]}


def _fmt(value: float | None, spec: str, none: str = "never") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(summary: dict) -> str:
    """The result as a plain-text table, one row per method, with a header saying what ran."""
    cfg = summary["config"]
    metric = summary["metric"].replace("_", " ")
    lines = [
        f"task: {summary['task']} ({cfg.get('description', '')}); metric: {metric} on the clean test split",
        f"B={cfg['super_batch']}, b={cfg['sub_batch']} (f={cfg['filter_ratio']}), "
        f"{summary['total_steps']} steps, {len(cfg['seeds'])} seed(s), score_gain={cfg['score_gain']}, "
        f"n_chunks={cfg['n_chunks']}, scorer={cfg['scorer']}",
        f"reference model (trained on {cfg.get('n_reference', '?')} clean examples): {metric} "
        f"{cfg.get('reference_metric', float('nan')):.4f}; target = uniform's final {metric}: "
        f"{summary['target']:.4f}",
        "",
    ]
    head = ["method", "final (mean ± sd)", "best", "steps to target", "speed-up", "speed-up*",
            "F/example", "compute speed-up", "corrupted chosen"]
    rows = [head]
    for name, m in summary["methods"].items():
        cost = m["compute_per_example_F"]
        comp = m["compute_speedup"]
        corrupted = m["corrupted_selected"]
        rows.append([
            name,
            f"{m['final_acc']:.4f} ± {m['final_acc_std']:.4f}",
            f"{m['best_acc']:.4f}",
            _fmt(m["steps_to_uniform_final"], "d"),
            _fmt(m["speedup_steps"], ".2f", "-") + ("x" if m["speedup_steps"] else ""),
            _fmt(m["speedup_vs_first_reach"], ".2f", "-") + ("x" if m["speedup_vs_first_reach"] else ""),
            f"{cost['cached']:.2f} / {cost['uncached']:.2f}",
            f"{_fmt(comp['cached'], '.2f', '-')}x / {_fmt(comp['uncached'], '.2f', '-')}x",
            "-" if corrupted is None else f"{100 * corrupted:.1f}%",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    one_off = summary.get("one_off_F") or {}
    with_one_off = [
        f"{name} {_fmt(m['compute_speedup_with_one_off']['cached'], '.2f', '-')}x / "
        f"{_fmt(m['compute_speedup_with_one_off']['uncached'], '.2f', '-')}x"
        for name, m in summary["methods"].items() if name != "uniform"]
    lines += [
        "",
        "best: the highest point of the seed-mean curve.",
        "speed-up: uniform's steps / steps to target; speed-up*: uniform's own first step at the "
        "target / steps to target.",
        "F/example and compute speed-up: reference outputs cached / computed live (a plain step is "
        "3F per example; see docs/design.md).",
    ]
    if any(one_off.values()):
        lines.append(f"one-off, not in the ratios: training the reference {one_off['reference_training']:,.0f} F, "
                     f"filling its cache {one_off['reference_cache_fill']:,.0f} F (uniform's whole run: "
                     f"{summary['uniform_compute_F']:,.0f} F)")
        lines.append("compute speed-up with the one-off costs counted: " + ", ".join(with_one_off))
    if summary.get("plot"):
        lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def to_json(summary: dict, curves: bool = False) -> str:
    """The summary as JSON (per-step curves only if ``curves``)."""
    out = {k: v for k, v in summary.items() if curves or k != "curves"}
    return json.dumps(out, indent=2, sort_keys=False)


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=size, dpi=110)


def _draw(ax, summary: dict, width: int = 88) -> None:
    """One summary's seed-mean curves with ±1 sd bands (from ``summary["curves"]``),
    uniform's final value dashed, each method's first step at it marked, the reference
    alone dotted."""
    target = summary["target"]
    curves = summary["curves"]
    for name in [m for m in METHOD_ORDER if m in curves]:
        steps, mean, std = (np.asarray(curves[name][k]) for k in ("steps", "mean", "std"))
        color = COLORS.get(name)
        ax.plot(steps, mean, color=color, lw=1.8, label=LABELS.get(name, name))
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)
        reach = summary["methods"][name]["steps_to_uniform_final"]
        if reach is not None and name != "uniform":
            ax.plot([reach], [target], marker="o", color=color, ms=5)
    ax.axhline(target, color="black", ls="--", lw=0.9, label=f"uniform's final ({target:.3f})")
    cfg = summary["config"]
    ref = cfg.get("reference_metric")
    if ref is not None:
        ax.axhline(ref, color="tab:green", ls=":", lw=1.2,
                   label=f"reference model alone ({ref:.3f}; {cfg.get('n_reference', '?')} clean examples)")
    ax.set_xlabel("learner steps (sub-batches of b = %d)" % cfg["sub_batch"])
    ax.set_ylabel(summary["metric"].replace("_", " "))
    title = (f"{summary['task']}: {cfg.get('description', '')}, B={cfg['super_batch']}, "
             f"b={cfg['sub_batch']}, {len(cfg['seeds'])} seed(s), mean ± sd")
    ax.set_title("\n".join(textwrap.wrap(title, width)), fontsize=9)
    means = [np.asarray(c["mean"]) for c in curves.values()]
    lo = min(float(np.min(m[len(m) // 5:])) for m in means)
    hi = max([float(np.max(m)) for m in means] + ([ref] if ref is not None else []))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.02))
    ax.grid(alpha=0.3)


def _save(fig, path: str | os.PathLike) -> str:
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def plot(runs: dict[str, MethodRuns], summary: dict, path: str | os.PathLike) -> str:
    """Write a PNG of the metric against steps for one summary (see ``_draw``); ``runs``
    are the summary's own (its curves were made from them)."""
    fig = _figure((7.5, 5.2))
    ax = fig.add_subplot()
    _draw(ax, summary)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_grid(summaries: list[dict], path: str | os.PathLike, columns: int = 2) -> str:
    """Write one PNG with a panel per summary (each a ``--json --curves`` result)."""
    rows = -(-len(summaries) // columns)
    fig = _figure((6.0 * columns, 4.3 * rows + 0.6))
    axes = [fig.add_subplot(rows, columns, i + 1) for i in range(len(summaries))]
    for ax, summary in zip(axes, summaries):
        _draw(ax, summary, width=80)
        ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m jest_stream.demo.report OUT.png A.json B.json ...``: one figure, a
    panel per saved ``jest-stream demo --json --curves`` result."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m jest_stream.demo.report", description=main.__doc__)
    p.add_argument("out", help="the PNG to write")
    p.add_argument("results", nargs="+", help="JSON files written by jest-stream demo --json --curves")
    args = p.parse_args(argv)
    summaries = []
    for name in args.results:
        with open(name) as fh:
            summary = json.load(fh)
        if "curves" not in summary:
            raise SystemExit(f"{name}: no curves; run jest-stream demo with --json --curves")
        summaries.append(summary)
    print(plot_grid(summaries, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
