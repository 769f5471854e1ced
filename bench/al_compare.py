"""Two strategies of a ``bench.al_sim`` run compared seed by seed, over windows of the curve.

    python -m bench.al_compare docs/al-sim-brain-typical-px-2026-12-06.json \\
        --reference hybrid --candidate hybrid+px --windows 10-40,50-100,110-200,10-200

``bench.al_sim`` prints each strategy's mean ± sd per label count; two strategies whose
curves cross within one sd of each other need the pairing the simulation already has: every
seed runs every strategy on the same cold start draw and eval set. For each window of label
counts (inclusive), this averages each run's metric over the window's points, then reports
each strategy's mean, the candidate minus the reference per seed (mean ± standard error
over seeds) and in how many seeds the candidate is ahead. A point without a head (labels of
one class only) counts as 0, as a clinician would see no suggestion there.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METRICS = ("macro_f1", "auc", "accuracy")


def parse_windows(text: str) -> list[tuple[int, int]]:
    windows = []
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high):
            raise argparse.ArgumentTypeError(f"{part!r}: expected LOW-HIGH label counts")
        windows.append((int(low), int(high)))
    return windows


def window_means(run: dict, metric: str, low: int, high: int) -> float | None:
    values = [point[metric] or 0.0 for point in run["points"]
              if low <= point["labels"] <= high]
    return sum(values) / len(values) if values else None


def compare(result: dict, reference: str, candidate: str, windows: list[tuple[int, int]],
            metric: str = "macro_f1") -> list[dict]:
    """One row per window: the strategies' means, the paired difference and the wins."""
    runs = {}
    for run in result["runs"]:
        runs.setdefault(run["strategy"], {})[run["seed"]] = run
    for name in (reference, candidate):
        if name not in runs:
            raise SystemExit(f"no runs of {name!r} (the file has {', '.join(sorted(runs))})")
    seeds = sorted(set(runs[reference]) & set(runs[candidate]))
    if not seeds:
        raise SystemExit(f"{reference!r} and {candidate!r} share no seed")
    rows = []
    for low, high in windows:
        ref = [window_means(runs[reference][s], metric, low, high) for s in seeds]
        cand = [window_means(runs[candidate][s], metric, low, high) for s in seeds]
        if any(v is None for v in ref + cand):
            raise SystemExit(f"no points between {low} and {high} labels")
        diff = [c - r for c, r in zip(cand, ref)]
        mean = sum(diff) / len(diff)
        se = (math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff))
              if len(diff) > 1 else None)
        row = {"window": [low, high], "seeds": len(seeds), reference: sum(ref) / len(ref),
               candidate: sum(cand) / len(cand), "difference": mean, "standard_error": se,
               "candidate_ahead": sum(d > 0 for d in diff)}
        for name, values in runs.items():
            if name not in (reference, candidate):
                means = [window_means(values[s], metric, low, high) for s in sorted(values)]
                row[name] = sum(means) / len(means)
        rows.append(row)
    return rows


def format_rows(rows: list[dict], reference: str, candidate: str, metric: str) -> str:
    others = [k for k in rows[0] if k not in ("window", "seeds", reference, candidate,
                                               "difference", "standard_error",
                                               "candidate_ahead")]
    head = (["labels"] + others + [reference, candidate, f"{candidate} − {reference}",
                                   "seeds ahead"])
    lines = [f"mean {metric} over each window, per seed, then over seeds",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        se = row["standard_error"]
        cells = ([f"{row['window'][0]}–{row['window'][1]}"]
                 + [f"{row[k]:.3f}" for k in others + [reference, candidate]]
                 + [f"{row['difference']:+.3f}" + ("" if se is None else f" ± {se:.3f}"),
                    f"{row['candidate_ahead']} / {row['seeds']}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.al_compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="bench.al_sim JSON files")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--windows", type=parse_windows, default=parse_windows("10-200"))
    parser.add_argument("--metric", choices=METRICS, default="macro_f1")
    args = parser.parse_args(argv)
    for path in args.results:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: {exc}") from None
        rows = compare(result, args.reference, args.candidate, args.windows, args.metric)
        print(f"\n{path}")
        print(format_rows(rows, args.reference, args.candidate, args.metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
