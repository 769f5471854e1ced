"""Markdown tables for docs/benchmarks.md from a benchmark's JSON.

    python -m bench.tables bench/results/ssl_brain_mri.json
"""

from __future__ import annotations

import json
import sys

NAMES = {"pixels_logreg": "raw pixels + logreg (floor)", "supervised": "supervised from scratch",
         "linear_probe": "SimCLRv2 linear probe",
         "hybrid_probe": "embedding + 16 px thumbnail",
         "refit_head": "the refit's head (thumbnail where it helps out of fold)",
         "simclr_finetune": "SimCLRv2 fine-tuned (LP-FT)",
         "simclr_distill": "distilled student"}


def _cell(stats: dict) -> str:
    if stats.get("mean") is None:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def ssl_table(payload: dict) -> str:
    lines = ["| labels | method | runs | accuracy | macro-F1 | AUC (one-vs-rest) |",
             "|---|---|---:|---:|---:|---:|"]
    for fraction, methods in payload["aggregates"].items():
        count = payload["labeled_counts"].get(fraction, "?")
        for method, stats in methods.items():
            if not stats["runs"]:
                continue
            lines.append(f"| {float(fraction):.0%} ({count}) | {NAMES.get(method, method)} | "
                         f"{stats['runs']} | {_cell(stats['accuracy'])} | "
                         f"{_cell(stats['macro_f1'])} | {_cell(stats['macro_auc'])} |")
    free = payload.get("label_free", {})
    if free:
        lines.append("")
        view = next((row["kmeans_view"]["k"] for row in free.values() if "kmeans_view" in row),
                    None)
        head = "| label-free view | kNN@20 accuracy | k-means purity | NMI |"
        if view:
            head += f" purity, k = {view} | NMI, k = {view} |"
        lines.append(head)
        lines.append("|---|---:|---:|---:|" + ("---:|---:|" if view else ""))
        for name, row in free.items():
            line = (f"| {name} | {row['knn_accuracy']:.3f} | {row['kmeans']['purity']:.3f} | "
                    f"{row['kmeans']['nmi']:.3f} |")
            if view:
                other = row.get("kmeans_view")
                line += (f" {other['purity']:.3f} | {other['nmi']:.3f} |" if other
                         else " | |")
            lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    for path in argv:
        payload = json.load(open(path))
        if "aggregates" in payload:
            print(f"<!-- {path} -->")
            print(ssl_table(payload))
        else:
            print(f"{path}: no table format for this file")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
