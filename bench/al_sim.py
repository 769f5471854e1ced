"""Active-learning simulation: replay the labelling loop with the train labels as the oracle.

    python -m bench.al_sim --train ../shared/data/pneumoniamnist/pneumoniamnist.npz#train \\
        --eval '../shared/data/pneumoniamnist/pneumoniamnist.npz#val' \\
        --strategies random,entropy,margin,hybrid --start 20 --step 10 --budget 200 \\
        --seeds 5 --image-size 32 --small-input no --epochs 15 --batch-size 256 \\
        --out bench/results/al_sim.json --plot bench/results/al_sim.png

Steps:

1. Decode train and eval scans (``bench.ssl_eval.load_data``, same cache) and embed them with
   a SimCLRv2 encoder: ``--encoder PATH`` (a checkpoint from ``ml_backend.ssl.train``), or the
   encoder ``bench.ssl_eval`` caches in ``--cache-dir`` (same key: an encoder ssl_eval already
   pretrained on the same images with the same config is reused, else one is pretrained).
2. For each seed and strategy: a cold start of ``--start`` scans (``cold_start`` — typical
   scans of k-means clusters — for every strategy except ``random``, which draws at random),
   then until ``--budget``: fit the calibrated linear head (``fit_head``) on the labeled
   embeddings, evaluate it on the eval set, and query ``--step`` more scans from the
   unlabeled pool with the strategy. While the labels cover only one class there is no head:
   the point is recorded as None and the next batch comes from ``diversity`` (``random`` for
   the random baseline).
3. Report learning curves (mean ± std over seeds), the labels each strategy needs to reach
   random's score at the budget (">budget" when never), and the cold-start gain over random
   at ``--start`` labels: a table on stdout, a JSON file and a PNG plot.

A multi-label ("findings") train source (``ml_backend.data.findings``: the NIH CSV, a
CheXpert or 0/1 CSV, a ChestMNIST-style npz) is replayed as the product queries a findings
set (``services.queries._query_set``): the same cold start, then, once one finding has been
seen both present and absent (``services.findings.fit_findings_sets``), the refit's
findings head (``fit_findings_head``, one calibrated binary head per finding) scores the
pool and a strategy of ``FINDINGS_STRATEGY_FOR`` queries by ``query_findings`` over all
findings of a scan (entropy → mean_entropy, margin and least_confident → max_entropy, hybrid
→ cardinality against the labeled scans' mean number of findings, at once: no typical picks
once a head exists); random, diversity and coreset run as they are. Points: macro AUC over the findings with an eval positive, over those with
at least ``MIN_POSITIVES`` eval positives, and the any-finding AUC
(``metrics.findings.findings_report``), uncertain eval answers left out, uncertain train
answers by ``--uncertain`` (the label set's policy; the product's default ignores them).
Images are read in grey, as ``bench.findings_eval`` reads them. Scans carry no patient key
here, as the product's PNG imports carry none: the patient rule (``max_per_group``) has
nothing to act on, in the product or here.

    python -m bench.al_sim --train ../shared/data/nih_cxr14_subset/labels.csv#train \\
        --eval ../shared/data/nih_cxr14_subset/labels.csv#val \\
        --encoder ml_backend/starter/simclr-resnet18-64px.pt \\
        --strategies random,entropy+px1,margin+px1,hybrid+px1 --out bench/results/al_findings.json
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bench.findings_eval import _align, _at_size, _macro, load_findings
from bench.ssl_eval import (
    embed_layers,
    embed_scales,
    embed_sets,
    get_encoder,
    load_data,
    log,
    machine_info,
    pretrain_config,
    write_json,
)
from ml_backend.active.features import PIXEL_SIDE, PIXEL_WEIGHT, thumbnails
from ml_backend.active.findings import FINDINGS_STRATEGY_FOR, fit_findings_head, query_findings
from ml_backend.active.refit import PRODUCT_BALANCE, PRODUCT_PROTOTYPE_N0, fit_head
from ml_backend.active.strategies import PRODUCT_TYPICAL_BELOW, STRATEGIES, QueryContext, query
from ml_backend.data.datasets import SourceError
from ml_backend.data.findings import is_findings_source
from ml_backend.metrics.findings import POLICIES, findings_report, uncertain_policy
from ml_backend.metrics.reports import classification_report
from ml_backend.ssl.train import load_pretrained, pick_device

METRICS = ("auc", "macro_f1", "accuracy")
TARGET_METRICS = ("auc", "macro_f1")
# what the table, the labels-to-reach and the plot's panels read: metric → (title, short name)
TITLES = {"auc": ("AUC", "AUC"), "macro_f1": ("macro-F1", "F1")}
# findings sources: every point records these three, and all three are targets
MIN_POSITIVES = 5       # the data README's floor; bench.findings_eval's --min-positives
FINDINGS_TITLES = {"macro_auc": ("macro AUC", "macro"),
                   "macro_auc_min5": (f"macro AUC ({MIN_POSITIVES}+ pos)", f"{MIN_POSITIVES}+pos"),
                   "any_finding_auc": ("any-finding AUC", "any")}
FINDINGS_METRICS = tuple(FINDINGS_TITLES)
BASELINE = "random"
FALLBACK = "diversity"  # what non-random strategies query with while there is no head


# --- arguments -------------------------------------------------------------------------


def parse_strategies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no strategies given")
    # ``hybrid@T``: hybrid with typical picks below T labeled scans per class; ``+px``: the
    # typical picks cluster the embedding and the thumbnail side by side
    unknown = [n for n in names if strategy_spec(n)[0] not in STRATEGIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown strateg{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"choose from {', '.join(sorted(STRATEGIES))}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("a strategy is listed twice")
    return names


def strategy_spec(name: str) -> tuple[str, int, bool | str]:
    """``hybrid@10+px`` → ("hybrid", 10, True): the strategy, its ``typical_below`` and
    whether its typical picks cluster the embedding and a 16 px thumbnail side by side
    (``features.cluster_inputs``, what the cluster view clusters) instead of the embedding
    alone — ``+px1`` ("first") for the first batch only, before any label; a plain name runs
    as the product runs it (``PRODUCT_TYPICAL_BELOW`` for hybrid, the embedding alone)."""
    pixels: bool | str = False
    if name.endswith("+px1"):
        pixels, name = "first", name.removesuffix("+px1")
    elif name.endswith("+px"):
        pixels, name = True, name.removesuffix("+px")
    base, _, below = name.partition("@")
    if below:
        if not below.isdigit():
            raise argparse.ArgumentTypeError(f"{name}: expected NAME@N with N a whole number")
        return base, int(below), pixels
    return base, PRODUCT_TYPICAL_BELOW, pixels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.al_sim",
        description="Replay active learning on labelled data: learning curves per strategy.")
    parser.add_argument("--train", required=True,
                        help="train source spec (the pool; its labels are the oracle)")
    parser.add_argument("--eval", required=True,
                        help="eval source spec, or split:F to hold out a fraction of --train")
    parser.add_argument("--strategies", type=parse_strategies,
                        default=["random", "entropy", "margin", "hybrid"],
                        help="comma-separated strategy names (default random,entropy,margin,"
                             "hybrid)")
    parser.add_argument("--start", type=int, default=20, help="cold-start labels")
    parser.add_argument("--step", type=int, default=10, help="labels queried per round")
    parser.add_argument("--budget", type=int, default=200, help="final number of labels")
    parser.add_argument("--seeds", type=int, default=5, help="repetitions per strategy")
    parser.add_argument("--encoder", default=None,
                        help="SimCLRv2 checkpoint (ml_backend.ssl.train); default: the cached "
                             "encoder of bench.ssl_eval, pretrained when missing")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default 32, or the --encoder checkpoint's size")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--small-input", choices=["auto", "yes", "no"], default="auto",
                        help="CIFAR-style 3x3 stem without max-pool (auto: size <= 64)")
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    parser.add_argument("--batch-size", type=int, default=256, help="pretraining batch size")
    parser.add_argument("--embed-scales", default="1",
                        help="the embedding reads each scan at these multiples of the "
                             "encoder's size, side by side (the product's "
                             "MEDLABEL_EMBED_SCALES, default there 1,2)")
    parser.add_argument("--embed-layers", default="4",
                        help="the encoder's residual stages pooled into the embedding at "
                             "each size (the product's MEDLABEL_EMBED_LAYERS, default there "
                             "3,4; 4: the encoder's output alone)")
    parser.add_argument("--cache-dir", default="bench/cache")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--max-train", type=int, default=None,
                        help="stratified subsample of the train set (findings: random)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="stratified subsample of the eval set (findings: random)")
    parser.add_argument("--uncertain", choices=POLICIES, default="ignore",
                        help="findings sources: uncertain train answers (the label set's "
                             "policy; default ignore, the product's); uncertain eval answers "
                             "never score the head")
    parser.add_argument("--out", default="bench/results/al_sim.json")
    parser.add_argument("--plot", default=None,
                        help="PNG of the learning curves (default: --out with .png)")
    return parser


def check_args(args) -> None:
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.start < 1 or args.step < 1:
        raise SystemExit("--start and --step must be >= 1")
    if args.budget < args.start:
        raise SystemExit("--budget must be >= --start")
    embed_scales(args)                        # a bad --embed-scales or --embed-layers fails
    embed_layers(args)                        # here, before any decoding


# --- the simulation --------------------------------------------------------------------


def full_proba(head, x: np.ndarray, num_classes: int) -> np.ndarray:
    """The head's probabilities with one column per class (0 for classes it has not seen)."""
    proba = np.zeros((len(x), num_classes), dtype=np.float32)
    proba[:, np.asarray(head.class_ids, dtype=np.int64)] = head.predict_proba(x)
    return proba


def evaluate(head, x_eval: np.ndarray, y_eval: np.ndarray, class_names: list[str]) -> dict:
    report = classification_report(y_eval, full_proba(head, x_eval, len(class_names)),
                                   class_names)
    # Two classes: macro_auc is the AUC of the positive (second) class.
    return {"auc": report["macro_auc"], "macro_f1": report["macro_f1"],
            "accuracy": report["accuracy"]}


def round_seed(seed: int, round_index: int) -> int:
    """A different, reproducible seed per seed and query round."""
    return seed * 1_000_003 + round_index


def is_multi_label(y: np.ndarray) -> bool:
    """Findings targets are ``(N, F)`` (1, 0, NaN); class labels ``(N,)``."""
    return np.ndim(y) == 2


def learnable_findings(targets: np.ndarray) -> int:
    """How many findings the labeled scans show both present and absent: the product fits a
    findings set's heads once there is one (``services.findings.fit_findings_sets``)."""
    t = np.asarray(targets, dtype=np.float64)
    return int(((t == 1).any(axis=0) & (t == 0).any(axis=0)).sum())


def labeled_cardinality(targets: np.ndarray) -> float:
    """The labeled scans' mean number of findings present (unknown answers count as not
    present): what the product's refit records for the label-cardinality strategy
    (``services.findings.mean_cardinality``, passed to ``query_findings`` by
    ``services.queries._query_set``)."""
    return float((np.asarray(targets, dtype=np.float64) == 1).sum(axis=1).mean())


def evaluate_findings(head, x_eval: np.ndarray, y_eval: np.ndarray, names: list[str]) -> dict:
    """Macro AUC over the findings with an eval positive (and negative), over those with at
    least ``MIN_POSITIVES`` eval positives, and the any-finding AUC (``bench.findings_eval``)."""
    report = findings_report(y_eval, head.predict_proba(x_eval), names)
    return {"macro_auc": report["macro_auc"],
            "macro_auc_min5": _macro(report, names, y_eval,
                                     MIN_POSITIVES)["macro_auc_min_positives"],
            "any_finding_auc": report["any_finding_auc"]}


def what_is_labeled(y: np.ndarray) -> dict:
    """What the labeled rows hold that decides whether the product has a head: the classes
    labeled (two needed), or the findings seen both present and absent (one needed)."""
    if is_multi_label(y):
        return {"findings_learnable": learnable_findings(y)}
    return {"classes_labeled": int(len(np.unique(y)))}


def fit_round(emb: np.ndarray, y: np.ndarray, class_names: list[str], seed: int):
    """The refit's head on the labeled rows as the product fits it, or None while the
    product would have none (labels of one class; no finding seen both present and absent)."""
    if is_multi_label(y):
        if not learnable_findings(y):
            return None
        return fit_findings_head(emb, y, np.array(class_names), seed=seed)[0]
    if len(np.unique(y)) < 2:
        return None
    return fit_head(emb, y, seed=seed, prototype_n0=PRODUCT_PROTOTYPE_N0,
                    balance=PRODUCT_BALANCE)[0]


def score_round(head, x_eval: np.ndarray, y_eval: np.ndarray, class_names: list[str]) -> dict:
    """The head's metrics on the eval set (all None without a head)."""
    findings = is_multi_label(y_eval)
    if head is None:
        return {m: None for m in (FINDINGS_METRICS if findings else METRICS)}
    return (evaluate_findings if findings else evaluate)(head, x_eval, y_eval, class_names)


def simulate(strategy: str, seed: int, emb_train: np.ndarray, y_train: np.ndarray,
             emb_eval: np.ndarray, y_eval: np.ndarray, class_names: list[str], *,
             start: int, step: int, budget: int, thumbs_train: np.ndarray | None = None) -> dict:
    """One active-learning run. Returns its points (one per refit) and queries.
    ``thumbs_train``: the train scans' thumbnails, which a ``+px`` strategy's typical picks
    cluster beside the embedding (standardised over the pool and the labeled scans, as the
    product's worklist would over its candidates and labeled scans)."""
    label, (strategy, typical_below, pixels) = strategy, strategy_spec(strategy)
    if pixels and thumbs_train is None:
        raise ValueError(f"{label}: needs the train scans' thumbnails")
    n_train = len(y_train)
    budget = min(budget, n_train)
    num_classes = len(class_names)
    findings = is_multi_label(y_train)
    labeled: list[int] = []
    in_pool = np.ones(n_train, dtype=bool)
    points, queries = [], []
    fit_seconds = query_seconds = 0.0

    def take(name: str, count: int, round_index: int, proba_pool=None,
             findings_pool=None) -> None:
        """Query ``count`` scans with ``name``; ``findings_pool``: the findings head's
        probabilities on the pool, which a findings set's uncertainty strategies rank by."""
        nonlocal query_seconds
        pool = np.flatnonzero(in_pool)
        count = min(count, len(pool))
        if count < 1:
            return
        if findings_pool is not None:       # services.queries._query_set, with a head
            started = time.perf_counter()
            picked, _, _ = query_findings(name, findings_pool, class_names, count,
                                          mean_cardinality=labeled_cardinality(
                                              y_train[labeled]))
            query_seconds += time.perf_counter() - started
            record(FINDINGS_STRATEGY_FOR[name], pool[picked], round_index)
            return
        joined = bool(pixels) and (pixels is True or not labeled)   # "first": no label yet
        context = QueryContext(
            proba=proba_pool, embeddings=emb_train[pool],
            labeled_embeddings=emb_train[labeled] if labeled else None,
            class_names=class_names, seed=round_seed(seed, round_index),
            typical_below=typical_below,
            thumbs=thumbs_train[pool] if joined else None,
            labeled_thumbs=thumbs_train[labeled] if joined and labeled else None,
            typical_pixel_weight=PIXEL_WEIGHT if joined else 0.0)
        started = time.perf_counter()
        selection = query(name, context, count)
        query_seconds += time.perf_counter() - started
        record(name, pool[np.asarray(selection.indices, dtype=np.int64)], round_index)

    def record(name: str, chosen: np.ndarray, round_index: int) -> None:
        if len(set(chosen.tolist())) != len(chosen) or not in_pool[chosen].all():
            raise RuntimeError(f"{name} returned a scan twice or one already labeled")
        in_pool[chosen] = False
        labeled.extend(int(i) for i in chosen)
        queries.append({"round": round_index, "labels_before": len(labeled) - len(chosen),
                        "strategy_used": name, "indices": [int(i) for i in chosen]})

    take(BASELINE if strategy == BASELINE else "cold_start", start, 0)
    round_index = 0
    while True:
        round_index += 1
        rows = np.array(labeled, dtype=np.int64)
        started = time.perf_counter()
        head = fit_round(emb_train[rows], y_train[rows], class_names, seed)
        if head is not None:
            fit_seconds += time.perf_counter() - started
        points.append({"labels": len(labeled),
                       **score_round(head, emb_eval, y_eval, class_names),
                       **what_is_labeled(y_train[rows])})
        if len(labeled) >= budget or not in_pool.any():
            break
        count = min(step, budget - len(labeled))
        if head is None:
            take(BASELINE if strategy == BASELINE else FALLBACK, count, round_index)
        elif findings:   # a findings set's head: its probabilities are no class probabilities
            take(strategy, count, round_index, findings_pool=head.predict_proba(
                emb_train[in_pool]) if strategy in FINDINGS_STRATEGY_FOR else None)
        else:
            proba_pool = full_proba(head, emb_train[in_pool], num_classes)
            take(strategy, count, round_index, proba_pool)
    return {"strategy": label, "seed": seed, "points": points, "queries": queries,
            "labeled_order": labeled, "fit_seconds": fit_seconds,
            "query_seconds": query_seconds}


# --- aggregation -----------------------------------------------------------------------


def _mean_std(values: list) -> tuple[float | None, float | None, int]:
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return None, None, 0
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    return float(np.mean(defined)), std, len(defined)


def learning_curves(runs: list[dict], strategies: list[str],
                    metrics: tuple[str, ...] = METRICS) -> dict:
    """Per strategy: label counts and, per metric, mean / std / n (defined seeds) per count."""
    curves = {}
    for strategy in strategies:
        rows = [r for r in runs if r["strategy"] == strategy]
        counts = sorted({p["labels"] for r in rows for p in r["points"]})
        curve = {"labels": counts, "seeds": len(rows)}
        for metric in metrics:
            stats = {"mean": [], "std": [], "n": []}
            for count in counts:
                values = [p[metric] for r in rows for p in r["points"] if p["labels"] == count]
                mean, std, n = _mean_std(values)
                stats["mean"].append(mean)
                stats["std"].append(std)
                stats["n"].append(n)
            curve[metric] = stats
        curves[strategy] = curve
    return curves


def labels_to_reach(labels: list[int], values: list, target: float | None) -> int | None:
    """The first label count whose value is at least ``target``; None if none is (undefined
    values are skipped; an undefined target is never reached)."""
    if target is None:
        return None
    for count, value in zip(labels, values):
        if value is not None and value >= target - 1e-12:
            return int(count)
    return None


def value_at(curve: dict, metric: str, count: int) -> float | None:
    if count not in curve["labels"]:
        return None
    return curve[metric]["mean"][curve["labels"].index(count)]


def summarise(curves: dict, start: int, budget: int,
              metrics: tuple[str, ...] = TARGET_METRICS) -> dict:
    """Random's score at the budget, labels needed to reach it, and the cold-start gain."""
    baseline = curves.get(BASELINE)
    end = max(baseline["labels"]) if baseline and baseline["labels"] else budget
    targets = {m: value_at(baseline, m, end) if baseline else None for m in metrics}
    to_reach, gains = {}, {}
    for strategy, curve in curves.items():
        row = {}
        for metric in metrics:
            needed = labels_to_reach(curve["labels"], curve[metric]["mean"], targets[metric])
            row[metric] = needed if needed is not None else f">{end}"
            row[f"{metric}_fraction_of_budget"] = needed / end if needed is not None else None
        to_reach[strategy] = row
        gains[strategy] = {}
        for metric in metrics:
            mine = value_at(curve, metric, start)
            theirs = value_at(baseline, metric, start) if baseline else None
            gains[strategy][metric] = (mine - theirs if mine is not None and theirs is not None
                                       else None)
            gains[strategy][f"{metric}_at_start"] = mine
    return {"baseline": BASELINE if baseline else None, "budget_labels": end,
            "baseline_at_budget": targets, "labels_to_reach_baseline": to_reach,
            "cold_start_gain": gains}


# --- output ----------------------------------------------------------------------------


def _cell(mean, std) -> str:
    return "     n/a     " if mean is None else f"{mean:.3f} ± {std:.3f}"


def format_table(curves: dict, summary: dict, seeds: int, titles: dict = TITLES) -> str:
    """A table per metric of ``titles`` (metric → (title, short name)), then the labels to
    reach random at the budget and the cold-start gain."""
    strategies = list(curves)
    lines = []
    for metric, (title, _) in titles.items():
        lines.append(f"{title} (mean ± std over {seeds} seed{'s' if seeds != 1 else ''})")
        header = f"{'labels':>6}  " + "  ".join(f"{s:<13}" for s in strategies)
        lines += [header, "-" * len(header)]
        counts = sorted({c for curve in curves.values() for c in curve["labels"]})
        for count in counts:
            cells = []
            for s in strategies:
                curve = curves[s]
                if count in curve["labels"]:
                    i = curve["labels"].index(count)
                    cells.append(_cell(curve[metric]["mean"][i], curve[metric]["std"][i]))
                else:
                    cells.append(" " * 13)
            lines.append(f"{count:>6}  " + "  ".join(cells))
        lines.append("")
    targets = summary["baseline_at_budget"]
    end = summary["budget_labels"]

    def fmt(v, signed=False):
        return "n/a" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")

    reached = ", ".join(f"{title} {fmt(targets[m])}" for m, (title, _) in titles.items())
    lines.append(f"labels to reach {BASELINE}@{end} ({reached}) and cold-start gain over "
                 f"{BASELINE}:")
    reach_cols = [(m, f"labels {short}") for m, (_, short) in titles.items()]
    gain_cols = [(m, f"gain {short}") for m, (_, short) in titles.items()]
    widths = {name: max(10 if name.startswith("labels") else 9, len(name))
              for _, name in reach_cols + gain_cols}
    header = "  ".join([f"{'strategy':<16}"] + [f"{name:>{widths[name]}}"
                                                 for _, name in reach_cols + gain_cols])
    lines += [header, "-" * len(header)]
    for s in strategies:
        reach, gain = summary["labels_to_reach_baseline"][s], summary["cold_start_gain"][s]
        lines.append("  ".join([f"{s:<16}"]
                               + [f"{str(reach[m]):>{widths[n]}}" for m, n in reach_cols]
                               + [f"{fmt(gain[m], True):>{widths[n]}}" for m, n in gain_cols]))
    return "\n".join(lines)


COLOURS = {"random": (110, 110, 110)}
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _tick_label(value: float, step: float) -> str:
    if step >= 1 and float(value).is_integer():
        return str(int(value))
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def plot_curves(curves: dict, path: Path, *, title: str = "", titles: dict = TITLES) -> None:
    """A panel per metric of ``titles`` (AUC and macro-F1 vs labels for classes), a line per
    strategy with a ±std band."""
    panels = [(metric, label) for metric, (label, _) in titles.items()]
    width, panel_height, legend_height = 600 * len(panels), 480, 50
    height = panel_height + legend_height + (30 if title else 0)
    top_offset = 30 if title else 0
    image = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    colours = {}
    for i, name in enumerate(curves):
        colours[name] = COLOURS.get(name) or PALETTE[i % len(PALETTE)]
    if title:
        w, _ = _text_size(draw, title, font)
        draw.text(((width - w) / 2, 8), title, fill="black", font=font)

    all_counts = sorted({c for curve in curves.values() for c in curve["labels"]}) or [0, 1]
    x_low, x_high = all_counts[0], all_counts[-1]
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1

    for panel, (metric, label) in enumerate(panels):
        left = panel * width // len(panels) + 75
        right = (panel + 1) * width // len(panels) - 25
        top, bottom = top_offset + 35, top_offset + panel_height - 55
        values = []
        for curve in curves.values():
            for mean, std in zip(curve[metric]["mean"], curve[metric]["std"]):
                if mean is not None:
                    values += [mean - (std or 0.0), mean + (std or 0.0)]
        y_low, y_high = (min(values), max(values)) if values else (0.0, 1.0)
        pad = max((y_high - y_low) * 0.08, 0.01)
        y_low, y_high = max(0.0, y_low - pad), min(1.0, y_high + pad)
        if y_high - y_low < 0.02:
            y_low, y_high = max(0.0, y_low - 0.01), min(1.0, y_high + 0.01)
        y_ticks = [t for t in nice_ticks(y_low, y_high, 6) if y_low - 1e-9 <= t <= y_high + 1e-9]
        x_ticks = [t for t in nice_ticks(x_low, x_high, 6) if x_low - 1e-9 <= t <= x_high + 1e-9]

        def px(x, left=left, right=right):
            return left + (x - x_low) / (x_high - x_low) * (right - left)

        def py(y, top=top, bottom=bottom, y_low=y_low, y_high=y_high):
            return bottom - (y - y_low) / (y_high - y_low) * (bottom - top)

        # grid, axes, ticks
        y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 0.1
        for t in y_ticks:
            y = py(t)
            draw.line([(left, y), (right, y)], fill=(232, 232, 232))
            text = _tick_label(t, y_step)
            w, h = _text_size(draw, text, small)
            draw.text((left - 8 - w, y - h / 2 - 2), text, fill="black", font=small)
        x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1
        for t in x_ticks:
            x = px(t)
            draw.line([(x, top), (x, bottom)], fill=(232, 232, 232))
            draw.line([(x, bottom), (x, bottom + 5)], fill="black")
            text = _tick_label(t, x_step)
            w, _ = _text_size(draw, text, small)
            draw.text((x - w / 2, bottom + 8), text, fill="black", font=small)
        draw.rectangle([left, top, right, bottom], outline="black")
        w, _ = _text_size(draw, "labels", font)
        draw.text(((left + right) / 2 - w / 2, bottom + 28), "labels", fill="black", font=font)
        heading = f"{label} vs labels"
        w, _ = _text_size(draw, heading, font)
        draw.text(((left + right) / 2 - w / 2, top - 25), heading, fill="black", font=font)
        w, h = _text_size(draw, label, font)
        rotated = Image.new("RGBA", (w + 6, h + 8), (255, 255, 255, 0))
        ImageDraw.Draw(rotated).text((3, 0), label, fill="black", font=font)
        rotated = rotated.rotate(90, expand=True)
        image.alpha_composite(rotated, (int(left - 70), int((top + bottom) / 2 - rotated.height / 2)))

        # ±std bands (translucent), then the mean lines with markers
        band = Image.new("RGBA", image.size, (255, 255, 255, 0))
        band_draw = ImageDraw.Draw(band)
        for name, curve in curves.items():
            segment = [(c, m, s) for c, m, s in zip(curve["labels"], curve[metric]["mean"],
                                                   curve[metric]["std"]) if m is not None]
            if len(segment) >= 2:
                upper = [(px(c), py(min(y_high, m + s))) for c, m, s in segment]
                lower = [(px(c), py(max(y_low, m - s))) for c, m, s in reversed(segment)]
                band_draw.polygon(upper + lower, fill=colours[name] + (40,))
        image.alpha_composite(band)
        draw = ImageDraw.Draw(image)
        for name, curve in curves.items():
            line = []
            for c, m in zip(curve["labels"], curve[metric]["mean"]):
                if m is None:  # undefined point: break the line
                    if len(line) >= 2:
                        draw.line(line, fill=colours[name], width=3)
                    line = []
                    continue
                line.append((px(c), py(m)))
                draw.ellipse([px(c) - 3, py(m) - 3, px(c) + 3, py(m) + 3], fill=colours[name])
            if len(line) >= 2:
                draw.line(line, fill=colours[name], width=3)

    # legend, centred under both panels
    entries = [(name, _text_size(draw, name, font)[0]) for name in curves]
    total = sum(30 + w + 30 for _, w in entries)
    x, y = (width - total) / 2, top_offset + panel_height + 10
    for name, w in entries:
        draw.line([(x, y + 9), (x + 24, y + 9)], fill=colours[name], width=4)
        draw.text((x + 30, y), name, fill="black", font=font)
        x += 30 + w + 30
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        image.convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- main ------------------------------------------------------------------------------


def random_rows(count: int | None, n: int) -> np.ndarray:
    """A seeded random subset of ``count`` rows (all when ``count`` is None or too large)."""
    if not count or count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=count, replace=False))


def load_findings_data(args) -> dict:
    """A findings source as ``load_data`` gives one of classes (same keys), decoded as
    ``bench.findings_eval`` decodes it (same cache): ``y_train`` / ``y_eval`` are ``(N, F)``
    targets (1 present, 0 absent, NaN unknown), ``class_names`` the findings."""
    if args.eval.startswith("split:"):
        raise SystemExit(f"--eval {args.eval}: a findings source names its eval split "
                         "(e.g. labels.csv#val); split:F is for single-label sources")
    if str(getattr(args, "channels", "1")) != "1":
        raise SystemExit("findings sources are read in grey: use a grey encoder")
    cache_dir = Path(args.cache_dir)
    try:
        train = load_findings(args.train, args.image_size, cache_dir)
        evaluation = load_findings(args.eval, args.image_size, cache_dir)
    except SourceError as exc:
        raise SystemExit(f"cannot read the findings source: {exc}") from None
    names, y_train, y_eval = _align(train, evaluation)
    y_train = uncertain_policy(y_train, args.uncertain)
    y_eval = uncertain_policy(y_eval, "ignore")          # uncertain never scores the head
    big = args.image_size * embed_scales(args)[-1]
    x_big = ((train["images"], evaluation["images"]) if big == args.image_size else
             _at_size(train, evaluation, (args.train, args.eval), big, cache_dir))
    rows_train = random_rows(args.max_train, len(y_train))
    rows_eval = random_rows(args.max_eval, len(y_eval))
    y_train, y_eval = y_train[rows_train], y_eval[rows_eval]
    eval_positives = np.nansum(y_eval == 1, axis=0).astype(int)
    info = {"kind": "findings", "train_spec": args.train, "eval_spec": args.eval,
            "layout": train["layout"], "notes": train["notes"], "findings": names,
            "uncertain": args.uncertain, "num_train": int(len(y_train)),
            "num_eval": int(len(y_eval)), "train_failed": train["failed"],
            "eval_failed": evaluation["failed"],
            "train_positives": np.nansum(y_train == 1, axis=0).astype(int).tolist(),
            "eval_positives": eval_positives.tolist(),
            "findings_with_eval_positive": [n for n, c in zip(names, eval_positives) if c],
            "findings_min_positives": [n for n, c in zip(names, eval_positives)
                                       if c >= MIN_POSITIVES]}
    return {"x_train": train["images"][rows_train], "y_train": y_train,
            "x_eval": evaluation["images"][rows_eval], "y_eval": y_eval,
            "class_names": names, "info": info,
            "x_train_big": x_big[0][rows_train], "x_eval_big": x_big[1][rows_eval]}


def run_line(run: dict, titles: dict) -> str:
    """One run's first and last points, for the log."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    first, last = run["points"][0], run["points"][-1]
    parts = []
    for i, (metric, (title, _)) in enumerate(titles.items()):
        at = (f" @ {first['labels']}", f" @ {last['labels']}") if i == 0 else ("", "")
        parts.append(f"{title} {fmt(first[metric])}{at[0]} → {fmt(last[metric])}{at[1]}")
    return f"seed {run['seed']} {run['strategy']:<10} " + ", ".join(parts)


def load_encoder(args, data: dict | None, cache_dir: Path):
    """``(model, config, info)`` from ``--encoder`` or the ssl_eval encoder cache."""
    if args.encoder:
        model, config = load_pretrained(args.encoder)
        log(f"encoder: {args.encoder} ({config.arch} at {config.image_size}px)")
        return model, config, {"encoder_cached": True, "checkpoint": str(args.encoder),
                               "seconds": 0.0, "source": "--encoder"}
    config = pretrain_config(args)
    model, info = get_encoder(data["x_train"], config, cache_dir, args.device)
    return model, config, {**{k: v for k, v in info.items() if k != "history"},
                           "source": "ssl_eval cache"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    started = time.perf_counter()
    device = pick_device(args.device)
    args.device = device.type
    cache_dir = Path(args.cache_dir)
    log(f"device {device.type}")

    if args.encoder:
        model, config, encoder_info = load_encoder(args, None, cache_dir)
        if args.image_size not in (None, config.image_size):
            log(f"warning: --image-size {args.image_size} ignored: the encoder was trained at "
                f"{config.image_size}px")
        args.image_size = config.image_size
        args.channels = str(config.channels)      # a colour encoder reads the scans in colour
    else:
        args.image_size = args.image_size or 32
    findings = is_findings_source(args.train)
    data = load_findings_data(args) if findings else load_data(args)
    titles = FINDINGS_TITLES if findings else TITLES
    if not args.encoder:
        model, config, encoder_info = load_encoder(args, data, cache_dir)
    class_names = data["class_names"]
    log(f"{'findings' if findings else 'classes'} {class_names}: {len(data['y_train'])} "
        f"train (pool) / {len(data['y_eval'])} eval scans")
    if findings:
        log(f"eval positives {dict(zip(class_names, data['info']['eval_positives']))}")
    if args.budget > len(data["y_train"]):
        log(f"warning: --budget {args.budget} exceeds the pool; capped at "
            f"{len(data['y_train'])}")

    embed_started = time.perf_counter()
    embeddings = embed_sets(model, data, config, args)
    emb_train, emb_eval = embeddings["train"], embeddings["eval"]
    thumbs_train = (thumbnails(data["x_train"], PIXEL_SIDE)
                    if any(strategy_spec(s)[2] for s in args.strategies) else None)
    embed_seconds = time.perf_counter() - embed_started
    log(f"embedded {len(emb_train) + len(emb_eval)} scans in {embed_seconds:.1f}s")

    runs = []
    for seed in range(args.seeds):
        for strategy in args.strategies:
            run_started = time.perf_counter()
            run = simulate(strategy, seed, emb_train, data["y_train"], emb_eval, data["y_eval"],
                           class_names, start=args.start, step=args.step, budget=args.budget,
                           thumbs_train=thumbs_train)
            run["seconds"] = time.perf_counter() - run_started
            runs.append(run)
            log(f"{run_line(run, titles)}  ({run['seconds']:.1f}s)")

    curves = learning_curves(runs, args.strategies,
                             FINDINGS_METRICS if findings else METRICS)
    summary = summarise(curves, args.start, min(args.budget, len(data["y_train"])),
                        tuple(titles))
    log("")
    log(format_table(curves, summary, args.seeds, titles))

    plot_path = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    plot_curves(curves, plot_path, title=f"Active learning{' (findings)' if findings else ''}: "
                f"{args.train} (mean ± std over {args.seeds} seeds)", titles=titles)
    log(f"wrote {plot_path}")

    payload = {
        "args": vars(args),
        "machine": machine_info(device),
        "data": data["info"],
        "encoder": {**encoder_info, "config": asdict(config)},
        "strategies": args.strategies,
        "curves": curves,
        "summary": summary,
        "runs": runs,
        "plot": str(plot_path),
        "timings": {"embed_seconds": embed_seconds,
                    "simulate_seconds": sum(r["seconds"] for r in runs),
                    "total_seconds": time.perf_counter() - started},
    }
    if findings:
        payload = {"kind": "findings", "metrics": {m: t for m, (t, _) in titles.items()},
                   "product_scores": {s: FINDINGS_STRATEGY_FOR.get(strategy_spec(s)[0])
                                      for s in args.strategies}, **payload}
    out = Path(args.out)
    write_json(out, payload)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
