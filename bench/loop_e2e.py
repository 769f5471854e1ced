"""The product's active-learning loop end to end: import, pretrain, worklist, refits, gate.

    python -m bench.loop_e2e --train ../shared/data/brain_mri/Training --eval split:0.2 \\
        --budget 200 --step 10 --seeds 3 --strategies worklist,random \\
        --pretrain-epochs 4 --image-size 64 --save-encoder /tmp/brain_enc.pt \\
        --out bench/results/loop_e2e_brain.json --plot bench/results/loop_e2e_brain.png

    # a mixed project: one label set per --train source, one --eval per --train (same order)
    python -m bench.loop_e2e --train '../shared/data/pneumoniamnist/pneumoniamnist.npz#train' \\
        --train ../shared/data/brain_mri/Training \\
        --eval '../shared/data/pneumoniamnist/pneumoniamnist.npz#val' --eval split:0.2 \\
        --label-sets "chest X-ray" "brain MRI" --max-pool-per-source 1500 0 ...

Unlike ``bench.al_sim`` (the library replayed on arrays), this drives the product itself,
in-process, on a throw-away SQLite database and media / artifact folders in a temp dir:

1. A real project (``project_create``), one label set per ``--train`` source with all its
   classes made up front. ``--gate-eval-per-class`` scans per class of each train source
   (whole near-duplicate groups, so no group straddles) are imported LABELED with
   ``split="eval"``: the project's own eval set, which the promotion gate uses. The rest
   (``--max-pool-per-source``: a stratified subset) is imported UNLABELED as the pool through
   ``import_job_create`` + ``import_job_run``; the oracle (sha256 of each file → its class)
   is kept aside. ``--eval`` sets are never imported: they are decoded with the import's
   pipeline (``decode_scan`` + ``render_preview``, then ``load_images``) and scored offline.
   ``--eval split:F`` holds out the grouped fraction F of that train source exactly as
   ``bench.ssl_eval`` / ``bench.al_sim`` do (same groups, same seed), kept out of the pool
   and of the gate eval.
2. An encoder: a pretraining run in the project (``training_run_create(kind="pretrain")`` +
   ``training_run_execute``: it also embeds every scan and activates), or
   ``--encoder-checkpoint`` (an ``encoder.pt``: a ModelVersion + a full ``embed`` run).
3. Per seed and strategy, on the same project (reset in between: pool annotations,
   classifiers, predictions, query rounds and refit runs deleted; encoder and embeddings
   kept), ``refit_every = query_batch_size = --step``. ``worklist``: the first round is the
   product's cold start; reader1 answers the current round in rank order through the
   label page's own helpers (``lease_next``, the suggestion ``_suggestion`` shows, then
   ``annotation_create`` with what was shown); the refit is queued by ``annotation_create``
   itself and runs inline (``ML_TASKS_IN_THREAD=0``, eager Celery); a promoted refit makes
   the next round, and when a round runs out first (a refit held back or failed) the bench
   asks ``query_round_create`` for a new one. ``random``: the same, answering seeded random
   unlabeled pool scans. ``--second-reader-error e``: reader2 labels every scan too, with a
   wrong class of the scan's label set with probability e. ``--vary-gate``: seed s > 0
   draws its own gate eval scans (``pick_gate`` with seed s, whole near-duplicate groups)
   among the project's scans and returns the rest to the pool, as another project of the
   same sources would have them (seed 0 keeps the first draw); without it the worklist
   is one deterministic path and its seeds only vary ``random``.
4. After every ``--step`` labels: the ACTIVE model's macro-F1 / accuracy / macro AUC (one vs
   rest) / ECE on ``--eval`` (per label set and overall; a set the model has no head for
   yet counts as missed), refits promoted / held back / failed, the newest held-back reason,
   step and refit wall times. At the end of each run the offline linear probe (``fit_head``
   per label set on the same labeled scans' stored embeddings) is scored the same way, and
   every stored Prediction is checked for a class outside its scan's label set.

A **findings source** (several findings per scan: ``labels.csv#train`` of the NIH subset,
a CheXpert or 0/1 CSV, a ChestMNIST-style npz; ``ml_backend.data.findings``) runs alone, the
way a clinician uses a findings project (``bench.loop_e2e_findings`` holds its pure parts):

    python -m bench.loop_e2e --train '../shared/data/nih_cxr14_subset/labels.csv#train' \
        --eval '../shared/data/nih_cxr14_subset/labels.csv#val' \
        --encoder-checkpoint ml_backend/starter/simclr-resnet18-64px.pt \
        --budget 200 --step 10 --seeds 5 --vary-gate --strategies worklist,random

- The gate eval split is whole patients (the NIH ``<patient>_<film>`` names, CheXpert's
  ``patientNNNNN`` folders, and near-duplicate groups): about ``--gate-eval-per-class``
  positives of each finding (never more than half of a finding's positives, so the pool
  keeps some of each) and as many scans without a finding. It is imported as a 0/1 findings
  CSV with ``split="eval"``, which makes the findings label set (``--label-sets`` or
  "Findings") and its findings, as ``manage.py import_scans labels.csv#train`` does; the
  pool is imported unlabeled into that set. ``--eval split:F`` holds out whole patients.
- Reader1 answers each served scan as the findings label page sends it: the page's rows
  (``label_page._findings_suggestion`` / ``_findings_rows``: each finding's probability and
  threshold, preselected at or above it), then the true findings ("no finding" when all are
  absent) with the scores shown, through the answer view's ``labeling.answer_submit``.
  The refit fits the findings heads inline and the findings gate promotes or holds them;
  the worklist ranks by ``FINDINGS_STRATEGY_FOR`` of the project's strategy.
- After every step the ACTIVE version's findings heads are scored on ``--eval``: macro AUC
  over the findings with an eval positive, over those with at least 5, any-finding AUC,
  micro AUC, macro AP; with the newest held-back refit's gate comparison per finding. At the
  end the offline probe (``fit_findings_head`` on the labeled scans' stored embeddings, the
  product's targets and the true ones) is scored the same way; the suggestions are counted
  (preselected findings present, present findings preselected, findings outside the set),
  and every stored answer is checked against the findings the reader gave.
- ``--promote-held-back`` (any source): an admin promotes every refit the gate holds back
  by hand ("promote anyway", ``model_version_promote``) at the next step.

Output: JSON (written after every run), a PNG of macro-F1 against labels (±sd over seeds,
one panel per label set for a mixed project; for findings one panel per AUC measure), and
markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPORT_COUNTS = (10, 20, 50, 100, 150, 200)
STRATEGIES = ("worklist", "random")
METRICS = ("macro_f1", "accuracy", "macro_auc", "ece")
DROP_LIMIT = 0.05
FINDINGS_SET = "Findings"       # a findings source's label set without --label-sets


@dataclass(frozen=True)
class Measures:
    """What a run's curves, tables and plot read: the measures averaged over seeds, the
    headline one (labels saved, the largest fall, the probe), the table's columns."""
    metrics: tuple
    headline: str
    headline_words: str
    columns: tuple                   # (metric, words) per table column group


# a findings run's answers and suggestions, counted (``one_run``; summed over runs)
FINDINGS_CHECKS = ("answers", "shown", "preselected", "preselected_present", "present_shown",
                   "present_preselected", "exact", "outside_set", "head_outside_set",
                   "stored_outside_set", "answers_unlike_truth")

CLASS_MEASURES = Measures(METRICS, "macro_f1", "macro-F1",
                          (("macro_f1", "macro-F1"), ("macro_auc", "AUC"), ("ece", "ECE")))


def findings_measures() -> Measures:
    from bench.loop_e2e_findings import FINDINGS_METRICS, MIN_POSITIVES

    return Measures(FINDINGS_METRICS, "macro_auc", "macro AUC",
                    (("macro_auc", "macro AUC"),
                     ("macro_auc_min5", f"macro AUC (>={MIN_POSITIVES} pos.)"),
                     ("any_finding_auc", "any-finding AUC")))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- arguments -------------------------------------------------------------------------


def parse_strategies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"strategies: a comma-separated list of {', '.join(STRATEGIES)} (got {text!r})")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loop_e2e",
                                description=__doc__.splitlines()[0])
    p.add_argument("--train", action="append", required=True,
                   help="a labeled source spec (repeat for a mixed project: one label set each)")
    p.add_argument("--eval", action="append", required=True,
                   help="evaluation spec for the --train of the same position, or split:F")
    p.add_argument("--label-sets", nargs="+", default=None,
                   help="label set names, one per --train (default: the project's one set)")
    p.add_argument("--budget", type=int, default=200, help="labels per run")
    p.add_argument("--step", type=int, default=10,
                   help="refit_every and query_batch_size; a point is recorded every step")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--strategies", type=parse_strategies, default=list(STRATEGIES))
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128, help="pretraining batch size")
    p.add_argument("--small-input", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--encoder-checkpoint", default=None,
                   help="an encoder.pt from an earlier run (skips pretraining)")
    p.add_argument("--save-encoder", default=None, help="copy the encoder checkpoint here")
    p.add_argument("--second-reader-error", type=float, default=None,
                   help="reader2 labels every scan too, wrong with this probability")
    p.add_argument("--gate-eval-per-class", type=int, default=10,
                   help="labeled eval scans per class (the project's eval split for the "
                        "gate); whole near-duplicate groups, so a class may get a few more")
    p.add_argument("--vary-gate", action="store_true",
                   help="each seed >= 1 draws its own gate eval scans among the project's "
                        "scans (the rest back in the pool): the worklist's spread over "
                        "projects, not one deterministic path")
    p.add_argument("--max-pool-per-source", type=int, nargs="+", default=None,
                   help="stratified subset of each source's pool: one value for all, or one "
                        "per --train (0: no limit)")
    p.add_argument("--query-strategy", default=None,
                   help="the project's query strategy (default: the product's default)")
    p.add_argument("--gate-tolerance", type=float, default=None,
                   help="the project's gate tolerance (default: the product's default)")
    p.add_argument("--promote-held-back", action="store_true",
                   help="an admin promotes every refit the gate holds back, by hand, at the "
                        "next step (\"promote anyway\"): the loop as if the gate let every "
                        "refit through")
    p.add_argument("--cache-dir", default="bench/cache", help="decoded-array cache (ssl_eval's)")
    p.add_argument("--workdir", default=None, help="default: a temp folder, removed at the end")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--out", default="bench/results/loop_e2e.json")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    return p


def check_args(args) -> None:
    if len(args.eval) != len(args.train):
        raise SystemExit("give one --eval per --train (same order; split:F for a hold-out)")
    if args.label_sets is not None and len(args.label_sets) != len(args.train):
        raise SystemExit("give one --label-sets name per --train")
    if args.label_sets is not None and len({n.lower() for n in args.label_sets}) != len(
            args.label_sets):
        raise SystemExit("--label-sets names must differ")
    if args.step < 1 or args.budget < args.step or args.seeds < 1:
        raise SystemExit("need --step >= 1, --budget >= --step, --seeds >= 1")
    if args.second_reader_error is not None and not 0 <= args.second_reader_error <= 1:
        raise SystemExit("--second-reader-error is a probability")
    if args.max_pool_per_source and len(args.max_pool_per_source) not in (1, len(args.train)):
        raise SystemExit("--max-pool-per-source: one value, or one per --train")
    if args.gate_eval_per_class < 1:
        raise SystemExit("--gate-eval-per-class must be >= 1 (the gate needs an eval split)")
    if args.encoder_checkpoint and not Path(args.encoder_checkpoint).is_file():
        raise SystemExit(f"--encoder-checkpoint {args.encoder_checkpoint}: no such file")
    from ml_backend.data.findings import is_findings_source

    findings = [is_findings_source(spec) for spec in args.train]
    if any(findings):
        if len(args.train) > 1:
            raise SystemExit("a findings source (several findings per scan) runs alone: give "
                             "one --train for it (a project mixing findings and classes is "
                             "not measured here)")
        if args.second_reader_error is not None:
            raise SystemExit("--second-reader-error is for class sources (a wrong class); a "
                             "findings source has no second reader here")
        if not args.eval[0].startswith("split:") and not is_findings_source(args.eval[0]):
            raise SystemExit(f"--eval {args.eval[0]}: not a findings source (the --train is "
                             "one): give its eval split, e.g. labels.csv#val, or split:F")


# --- data: pool, gate eval and offline eval per source ----------------------------------


@dataclass
class Source:
    index: int
    spec: str
    eval_spec: str
    set_name: str | None
    class_names: list[str]
    gate: list = field(default_factory=list)      # (SourceItem, label)
    pool: list = field(default_factory=list)
    evaluation: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    # --vary-gate: per seed s >= 1, the names of its gate eval scans, drawn among gate + pool
    gates: dict = field(default_factory=dict)
    # a findings source: its findings, in column order; each label above is then the scan's
    # answer per finding (``loop_e2e_findings.truth_key``), not a class name
    findings: list | None = None


def pick_gate(labels: np.ndarray, groups: np.ndarray, candidates: np.ndarray, per_class: int,
              seed: int = 0) -> np.ndarray:
    """Indices (into ``labels``) of about ``per_class`` scans per class, taken as whole
    near-duplicate groups from ``candidates`` (a group never straddles gate eval and pool)."""
    rng = np.random.default_rng(seed)
    cand_groups = groups[candidates]
    members: dict[int, list[int]] = {}
    for idx, g in zip(candidates.tolist(), cand_groups.tolist()):
        members.setdefault(int(g), []).append(int(idx))
    chosen: set[int] = set()
    counts: Counter = Counter()
    for cls in sorted(set(labels[candidates].tolist())):
        options = sorted({int(g) for idx, g in zip(candidates, cand_groups)
                          if labels[idx] == cls} - chosen)
        order = [options[i] for i in rng.permutation(len(options))]
        # singletons / small groups first, so the per-class count is met closely
        order.sort(key=lambda g: len(members[g]) > max(1, per_class - counts[cls]))
        for g in order:
            if counts[cls] >= per_class:
                break
            if g in chosen:
                continue
            chosen.add(g)
            counts.update(labels[members[g]].tolist())
    return np.array(sorted(i for g in chosen for i in members[g]), dtype=np.int64)


def _pool_cap(values: list[int] | None, index: int) -> int | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else values[index]


def prepare_sources(args, group_size: int) -> list[Source]:
    from bench.ssl_eval import grouped_holdout, load_spec, near_duplicate_groups, \
        stratified_subset
    from ml_backend.data.datasets import read_source

    from ml_backend.data.findings import is_findings_source

    sources = []
    for i, (spec, eval_spec) in enumerate(zip(args.train, args.eval)):
        if is_findings_source(spec):
            sources.append(prepare_findings_source(args, i, spec, eval_spec, group_size))
            continue
        listing = read_source(spec)
        by_name = {item.name: item for item in listing.items}
        data = load_spec(spec, group_size, Path(args.cache_dir))
        names, labels = data["names"], data["labels"]
        groups = near_duplicate_groups(data["images"])
        sizes = np.bincount(groups)
        info = {"spec": spec, "eval_spec": eval_spec, "decoded": int(len(names)),
                "unlabeled_skipped": int(data["unlabeled"]), "failed": int(data["failed"]),
                "grouping_image_size": group_size, "near_duplicate_groups": int(len(sizes)),
                "scans_in_duplicate_groups": int(sizes[sizes > 1].sum()),
                "largest_group": int(sizes.max())}
        class_names = sorted(set(labels.tolist()))
        if eval_spec.startswith("split:"):
            try:
                fraction = float(eval_spec.split(":", 1)[1])
            except ValueError:
                raise SystemExit(f"--eval {eval_spec!r}: expected split:FRACTION") from None
            train_idx, eval_idx = grouped_holdout(labels, groups, fraction)
            evaluation = [(by_name[names[j]], str(labels[j])) for j in eval_idx]
            info["split"] = fraction
        else:
            train_idx = np.arange(len(names))
            evaluation = [(item, item.label) for item in read_source(eval_spec).items
                          if item.label is not None]
        unknown = [lab for _, lab in evaluation if lab not in class_names]
        if unknown:
            log(f"warning: {eval_spec}: {len(unknown)} eval scans of classes not in {spec} "
                "dropped")
            evaluation = [(it, lab) for it, lab in evaluation if lab in class_names]
        gate_idx = pick_gate(labels, groups, train_idx, args.gate_eval_per_class)
        pool_idx = np.setdiff1d(train_idx, gate_idx)
        info["pool_before_subset"] = int(len(pool_idx))
        cap = _pool_cap(args.max_pool_per_source, i)
        if cap and cap < len(pool_idx):
            keep = stratified_subset(labels[pool_idx], cap, seed=0)
            pool_idx = pool_idx[keep]
        set_name = args.label_sets[i] if args.label_sets else None
        project_idx = np.concatenate([gate_idx, pool_idx])
        gates = {seed: [names[j] for j in pick_gate(labels, groups, project_idx,
                                                    args.gate_eval_per_class, seed=seed)]
                 for seed in range(1, args.seeds)} if args.vary_gate else {}
        source = Source(index=i, spec=spec, eval_spec=eval_spec, set_name=set_name,
                        class_names=class_names,
                        gate=[(by_name[names[j]], str(labels[j])) for j in gate_idx],
                        pool=[(by_name[names[j]], str(labels[j])) for j in pool_idx],
                        evaluation=evaluation, info=info, gates=gates)
        info.update({"classes": class_names,
                     "gate_eval": dict(Counter(lab for _, lab in source.gate)),
                     "pool": dict(Counter(lab for _, lab in source.pool)),
                     "eval": dict(Counter(lab for _, lab in source.evaluation))})
        log(f"source {i} {spec}: {len(sizes)} near-duplicate groups over {len(names)} scans; "
            f"pool {len(source.pool)}, gate eval {len(source.gate)}, eval "
            f"{len(source.evaluation)} ({eval_spec})")
        sources.append(source)
    return sources


def prepare_findings_source(args, index: int, spec: str, eval_spec: str,
                            group_size: int) -> Source:
    """A findings source's gate eval, pool and --eval: whole patients (and near-duplicate
    groups) never straddle them (``loop_e2e_findings``)."""
    from bench.findings_eval import _align, load_findings
    from bench.loop_e2e_findings import counts, patient_groups, pick_gate_findings, truth_key
    from bench.ssl_eval import grouped_holdout, near_duplicate_groups
    from ml_backend.data.findings import read_findings_source

    listing = read_findings_source(spec)
    names = [item.name for item in listing.items]
    data = load_findings(spec, group_size, Path(args.cache_dir))
    near = None
    if not data["failed"]:
        near = near_duplicate_groups(data["images"])
    else:
        log(f"warning: {spec}: {data['failed']} scans could not be decoded; grouped by "
            "patient only (no near-duplicate groups)")
    groups = patient_groups(names, near)
    targets = listing.targets
    keys = [truth_key(row) for row in targets]
    sizes = np.bincount(groups)
    info = {"spec": spec, "eval_spec": eval_spec, "kind": "findings", "layout": listing.layout,
            "rows": len(names), "failed": int(data["failed"]), "grouping_image_size": group_size,
            "patient_groups": int(len(sizes)), "largest_group": int(sizes.max()),
            "notes": listing.notes}
    if eval_spec.startswith("split:"):
        try:
            fraction = float(eval_spec.split(":", 1)[1])
        except ValueError:
            raise SystemExit(f"--eval {eval_spec!r}: expected split:FRACTION") from None
        any_finding = (np.nan_to_num(targets) == 1).any(axis=1).astype(int)
        train_idx, eval_idx = grouped_holdout(any_finding, groups, fraction)
        evaluation = [(listing.items[j], keys[j]) for j in eval_idx]
        info["split"] = fraction
    else:
        other = read_findings_source(eval_spec)
        _, _, y_eval = _align({"findings": listing.findings, "targets": targets},
                              {"findings": other.findings, "targets": other.targets})
        train_idx = np.arange(len(names))
        evaluation = [(item, truth_key(row)) for item, row in zip(other.items, y_eval)]
        shared = ({p for p in map(_patient, other.items) if p}
                  & {p for p in map(_patient, listing.items) if p})
        info["eval_patients_also_in_train"] = len(shared)
    gate_idx = pick_gate_findings(targets, groups, train_idx, args.gate_eval_per_class)
    pool_idx = np.setdiff1d(train_idx, gate_idx)
    info["pool_before_subset"] = int(len(pool_idx))
    cap = _pool_cap(args.max_pool_per_source, index)
    if cap and cap < len(pool_idx):
        pool_idx = np.sort(np.random.default_rng(0).choice(pool_idx, size=cap, replace=False))
    project_idx = np.concatenate([gate_idx, pool_idx])
    gates = {seed: [names[j] for j in pick_gate_findings(
        targets, groups, project_idx, args.gate_eval_per_class, seed=seed)]
        for seed in range(1, args.seeds)} if args.vary_gate else {}
    source = Source(index=index, spec=spec, eval_spec=eval_spec,
                    set_name=args.label_sets[index] if args.label_sets else None,
                    class_names=list(listing.findings),
                    gate=[(listing.items[j], keys[j]) for j in gate_idx],
                    pool=[(listing.items[j], keys[j]) for j in pool_idx],
                    evaluation=evaluation, info=info, gates=gates,
                    findings=list(listing.findings))
    info.update({"findings": list(listing.findings),
                 "gate_eval": counts([k for _, k in source.gate], source.findings),
                 "pool": counts([k for _, k in source.pool], source.findings),
                 "eval": counts([k for _, k in source.evaluation], source.findings),
                 "gate_eval_scans": len(source.gate), "pool_scans": len(source.pool),
                 "eval_scans": len(source.evaluation),
                 "gate_eval_patients": int(len(set(groups[gate_idx].tolist()))),
                 "groups_in_gate_and_pool": int(len(set(groups[gate_idx].tolist())
                                                    & set(groups[pool_idx].tolist())))})
    log(f"source {index} {spec} (findings, {len(source.findings)}): {len(sizes)} patient "
        f"groups over {len(names)} scans; pool {len(source.pool)}, gate eval "
        f"{len(source.gate)}, eval {len(source.evaluation)} ({eval_spec})")
    return source


def _patient(item) -> str | None:
    from bench.loop_e2e_findings import patient_of

    return patient_of(item.name)


def _extension(data: bytes, name: str) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    suffix = Path(name.split("#")[-1]).suffix.lower()
    return suffix if suffix and len(suffix) <= 5 else ".dcm"


def write_items(entries, folder: Path, *, class_folders: bool,
                written: list | None = None) -> tuple[dict, int]:
    """Write the items' bytes (flat, or one folder per class). Returns ({sha256: label},
    number of sha collisions with a different label); ``written`` gets each file's name."""
    oracle, conflicts = {}, 0
    for k, (item, label) in enumerate(entries):
        data = item.load()
        target = (folder / label) if class_folders else folder
        target.mkdir(parents=True, exist_ok=True)
        name = f"{k:05d}{_extension(data, item.name)}"
        (target / name).write_bytes(data)
        if written is not None:
            written.append(name)
        sha = hashlib.sha256(data).hexdigest()
        if sha in oracle and oracle[sha] != label:
            conflicts += 1
        oracle.setdefault(sha, label)
    return oracle, conflicts


def eval_previews(entries, folder: Path) -> tuple[list[Path], list[str], int]:
    """Decode eval items exactly as the import does (decode_scan + render_preview)."""
    from django.conf import settings

    from ml_backend.data.decode import ScanDecodeError, decode_scan, render_preview

    folder.mkdir(parents=True, exist_ok=True)
    paths, labels, failed = [], [], 0
    for k, (item, label) in enumerate(entries):
        try:
            decoded = decode_scan(item.load(), name=item.name, salt=settings.DEID_SALT,
                                  max_pixels=settings.IMPORT_MAX_PIXELS)
            png = render_preview(decoded.pixels, max_side=settings.PREVIEW_MAX_SIDE)
        except (ScanDecodeError, OSError, ValueError):
            failed += 1
            continue
        path = folder / f"{k:05d}.png"
        path.write_bytes(png)
        paths.append(path)
        labels.append(label)
    return paths, labels, failed


# --- metrics ---------------------------------------------------------------------------


def score(y: np.ndarray, proba: np.ndarray, names: list[str], applies=None) -> dict:
    """classification_report's headline numbers; a row with no probability anywhere (no
    head for its label set yet) is a missed prediction, never a guess of class 0.
    ``applies`` (boolean, like ``proba``): the classes of each scan's own label set, so a
    class's AUC is over its own set's scans (as the product's reports score it), not lifted
    by another anatomy's scans as easy negatives."""
    from sklearn.metrics import f1_score

    from ml_backend.metrics.reports import classification_report

    report = classification_report(y, proba, names, applies=applies)
    result = {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
              "macro_auc": report["macro_auc"], "ece": report["ece"], "n": int(len(y))}
    none = proba.max(axis=1) <= 0
    if none.any():
        pred = np.where(none, -1, proba.argmax(axis=1))
        used = sorted(set(y.tolist()) | set(pred[pred >= 0].tolist()))
        result["accuracy"] = float(np.mean(pred == y))
        result["macro_f1"] = float(f1_score(y, pred, labels=used, average="macro",
                                            zero_division=0))
    result["no_prediction"] = int(none.sum())
    result["recall"] = {n: round(float(report["per_class"][n]["recall"] or 0.0), 4)
                        for n in names}
    return result


@dataclass
class EvalSet:
    name: str            # the label set's name
    set_id: int
    class_ids: list[int]
    class_names: list[str]
    y: np.ndarray
    vectors: np.ndarray | None = None
    thumbs: np.ndarray | None = None     # what a head with a pixel block reads beside them
    paths: list = field(default_factory=list)


def score_heads(heads, evals: list[EvalSet], pixels: dict | None = None) -> dict:
    """Score a SetHeads on every eval set: per label set and overall (all classes).
    ``pixels``: the version's pixel block (its config's ``pixels``), if its heads read one."""
    from ml_backend.active.features import head_inputs

    all_ids = [c for ev in evals for c in ev.class_ids]
    all_names = [n for ev in evals for n in ev.class_names]
    column = {c: i for i, c in enumerate(heads.class_ids)}
    blocks, ys, masks, result = [], [], [], {"per_set": {}}
    offset = 0
    for ev in evals:
        proba = heads.predict_proba(head_inputs(ev.vectors, ev.thumbs if pixels else None),
                                    [ev.set_id] * len(ev.y))
        mine = np.zeros((len(ev.y), len(ev.class_ids)), dtype=np.float64)
        for j, c in enumerate(ev.class_ids):
            if c in column:
                mine[:, j] = proba[:, column[c]]
        result["per_set"][ev.name] = score(ev.y, mine, ev.class_names)
        wide = np.zeros((len(ev.y), len(all_ids)))
        wide[:, offset:offset + len(ev.class_ids)] = mine
        blocks.append(wide)
        mask = np.zeros(wide.shape, dtype=bool)
        mask[:, offset:offset + len(ev.class_ids)] = True
        masks.append(mask)
        ys.append(ev.y + offset)
        offset += len(ev.class_ids)
    result["overall"] = score(np.concatenate(ys), np.concatenate(blocks), all_names,
                              applies=np.concatenate(masks))
    return result


def _mean_sd(values) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "sd": sd, "n": len(vals)}


def _metric(point: dict, scope: str, metric: str):
    block = point.get("active")
    if not block:
        return None
    data = block["overall"] if scope == "overall" else block["per_set"].get(scope)
    return None if data is None else data.get(metric)


def summarise(runs: list[dict], strategies: list[str], scopes: list[str], budget: int,
              measures: Measures = CLASS_MEASURES) -> dict:
    head = measures.headline
    curves = {}
    for strategy in strategies:
        rows = [r for r in runs if r["strategy"] == strategy]
        counts = sorted({p["labels"] for r in rows for p in r["points"]})
        curve = {"labels": counts, "seeds": len(rows)}
        for scope in scopes:
            curve[scope] = {}
            for metric in measures.metrics:
                stats = [_mean_sd([_metric(p, scope, metric) for r in rows for p in r["points"]
                                   if p["labels"] == c]) for c in counts]
                curve[scope][metric] = {k: [s[k] for s in stats] for k in ("mean", "sd", "n")}
        curves[strategy] = curve
    summary = {"curves": curves, "budget": budget}
    if "worklist" in curves and "random" in curves:
        saved = {}
        for scope in scopes:
            rnd = curves["random"][scope][head]["mean"]
            target = rnd[-1] if rnd else None
            reach = None
            wl = curves["worklist"]
            for c, m in zip(wl["labels"], wl[scope][head]["mean"]):
                if target is not None and m is not None and m >= target - 1e-12:
                    reach = c
                    break
            saved[scope] = {f"random_final_{head}": target, "worklist_labels_to_reach": reach,
                            "labels_saved": None if reach is None else budget - reach}
        summary["labels_saved"] = saved
    finals = {}
    for strategy in strategies:
        rows = [r for r in runs if r["strategy"] == strategy]
        finals[strategy] = {"runs": len(rows)}
        for scope in scopes:
            def final(metric: str) -> dict:
                return {
                    "active": _mean_sd([_metric(r["points"][-1], scope, metric) for r in rows]),
                    "probe": _mean_sd([(r["probe"]["overall"] if scope == "overall"
                                        else r["probe"]["per_set"].get(scope, {})).get(metric)
                                       if r.get("probe") else None for r in rows]),
                    "probe_true_labels": _mean_sd([
                        (r["probe_true_labels"]["overall"] if scope == "overall"
                         else r["probe_true_labels"]["per_set"].get(scope, {})).get(metric)
                        if r.get("probe_true_labels") else None for r in rows])}
            finals[strategy][scope] = final(head)
            if measures is not CLASS_MEASURES:       # every measure, not the headline alone
                finals[strategy][scope]["by_metric"] = {m: final(m) for m in measures.metrics}
        finals[strategy]["held_back_refits"] = [r["refits"]["held_back"] for r in rows]
        finals[strategy]["failed_refits"] = [r["refits"]["failed"] for r in rows]
        finals[strategy]["promoted_refits"] = [r["refits"]["promoted"] for r in rows]
        finals[strategy]["max_drop"] = [r["max_drop"] for r in rows]
        finals[strategy]["fell_more_than_limit"] = [r["fell_more_than_limit"] for r in rows]
        finals[strategy]["seconds"] = [r["seconds"] for r in rows]
        finals[strategy]["labels_per_set"] = [r["points"][-1].get("labels_per_set")
                                              for r in rows if r["points"]]
        if measures is not CLASS_MEASURES:
            # refits promoted / held back by each count of labels (mean over runs), and which
            # findings the gate named when it held one back
            finals[strategy]["refits_by_labels"] = {
                c: {k: _mean_sd([p.get(k) for r in rows for p in r["points"]
                                 if p["labels"] == c])
                    for k in ("promoted", "held_back", "failed", "manual_rounds",
                              "promoted_by_hand")}
                for c in curves[strategy]["labels"]}
            finals[strategy]["held_back_findings"] = dict(Counter(
                finding for r in rows for finding in r.get("held_back_findings", [])
            ).most_common())
    summary["final"] = finals
    checks = []          # each step whose newest refit was held back: right to hold it back?
    for r in runs:
        for point in r["points"]:
            if point.get("newest") and point.get("active"):
                checks.append({"strategy": r["strategy"], "seed": r["seed"],
                               "labels": point["labels"], "held_back": point["newest_version"],
                               "active": point["active_version"],
                               f"held_back_{head}": point["newest"]["overall"][head],
                               f"active_{head}": point["active"]["overall"][head]})
    summary["held_back_checks"] = checks
    summary["pixel_choices"] = [
        {"strategy": r["strategy"], "seed": r["seed"],
         "steps": [{"labels": p["labels"], "sets": p.get("active_pixels")} for p in r["points"]]}
        for r in runs]
    summary["wrong_set_predictions"] = sum(r["wrong_set"]["predicted_class"] for r in runs)
    summary["wrong_set_probability_keys"] = sum(r["wrong_set"]["probability_keys"] for r in runs)
    summary["wrong_set_suggestions_shown"] = sum(r["suggestions"]["wrong_set"] for r in runs)
    summary["predictions_checked"] = sum(r["wrong_set"]["checked"] for r in runs)
    summary["any_drop_over_limit"] = any(r["fell_more_than_limit"] for r in runs)
    worklists = [r["labeled_order_digest"] for r in runs if r["strategy"] == "worklist"]
    summary["worklist_runs_identical"] = len(set(worklists)) <= 1 if worklists else None
    if measures is not CLASS_MEASURES:
        summary["findings_suggestions"] = {
            k: sum(r["findings_suggestions"][k] for r in runs) for k in FINDINGS_CHECKS}
    return summary


# --- tables and plot -------------------------------------------------------------------


def _cell(stats: dict | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    if stats.get("n", 1) > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def pixel_choice_lines(summary: dict) -> list[str]:
    """``strategy/seed set: k of n`` — the steps whose active head for ``set`` read the
    thumbnail, of the steps where that set had a head, and the label counts where it did."""
    lines = []
    for run in summary.get("pixel_choices") or []:
        counts: dict = {}
        for step in run["steps"]:
            for name, used in (step["sets"] or {}).items():
                entry = counts.setdefault(name, [0, 0, []])
                entry[1] += 1
                if used:
                    entry[0] += 1
                    entry[2].append(step["labels"])
        for name, (used, total, where) in counts.items():
            at = f" (at {', '.join(map(str, where))} labels)" if used and used < total else ""
            lines.append(f"{run['strategy']}/{run['seed']} {name}: {used} of {total}{at}")
    return lines


def tables(summary: dict, strategies: list[str], scopes: list[str],
           measures: Measures = CLASS_MEASURES) -> str:
    curves, lines = summary["curves"], []
    key, words = measures.headline, measures.headline_words
    for scope in scopes:
        lines.append(f"\n**{scope}** — active model on --eval, mean ± sd over seeds")
        head = "| labels | " + " | ".join(" | ".join(f"{s} {w}" for s in strategies)
                                         for _, w in measures.columns) + " |"
        lines += [head, "|---:|" + "---:|" * (len(measures.columns) * len(strategies))]
        counts = sorted({c for s in strategies for c in curves[s]["labels"]})
        shown = [c for c in counts if c in REPORT_COUNTS] or counts
        if counts and counts[-1] not in shown:
            shown.append(counts[-1])
        for c in shown:
            cells = []
            for metric, _ in measures.columns:
                for s in strategies:
                    cv = curves[s]
                    if c in cv["labels"]:
                        k = cv["labels"].index(c)
                        m = cv[scope][metric]
                        cells.append(_cell({"mean": m["mean"][k], "sd": m["sd"][k],
                                            "n": m["n"][k]}))
                    else:
                        cells.append("—")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append(f"\n**At {summary['budget']} labels: the active model vs the offline linear "
                 f"probe on the same labels** ({words})")
    lines += ["| strategy | scope | active model | offline probe | probe on true labels | "
              "refits promoted / held back / failed (per run) |", "|---|---|---:|---:|---:|---|"]
    for s in strategies:
        f = summary["final"][s]
        refits = ", ".join(f"{a}/{b}/{c}" for a, b, c in zip(
            f["promoted_refits"], f["held_back_refits"], f["failed_refits"]))
        for scope in scopes:
            rows = [(words, f[scope])] if measures is CLASS_MEASURES else [
                (w, f[scope]["by_metric"][m]) for m, w in measures.columns]
            for w, cell in rows:
                label = scope if measures is CLASS_MEASURES else f"{scope}, {w}"
                lines.append(f"| {s} | {label} | {_cell(cell['active'])} | "
                             f"{_cell(cell['probe'])} | {_cell(cell['probe_true_labels'])} "
                             f"| {refits} |")
    if measures is not CLASS_MEASURES:
        lines.append("\n**Refits promoted / held back by then** (mean over runs)")
        lines += ["| labels | " + " | ".join(f"{s} promoted | {s} held back"
                                             for s in strategies) + " |",
                  "|---:|" + "---:|" * (2 * len(strategies))]
        counts = sorted({c for s in strategies for c in curves[s]["labels"]})
        for c in [c for c in counts if c in REPORT_COUNTS] or counts:
            cells = []
            for s in strategies:
                row = summary["final"][s]["refits_by_labels"].get(c)
                hand = "" if row is None or not row["promoted_by_hand"]["n"] else \
                    f" ({_cell(row['promoted_by_hand'], 1)} by hand)"
                cells += ["—", "—"] if row is None else [
                    _cell(row["promoted"], 1) + hand, _cell(row["held_back"], 1)]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        for s in strategies:
            named = summary["final"][s]["held_back_findings"]
            if named:
                lines.append(f"Findings the gate named when it held a {s} refit back: "
                             + ", ".join(f"{n} {k}" for n, k in named.items()))
    checks = [c for c in summary.get("held_back_checks") or []
              if c[f"held_back_{key}"] is not None and c[f"active_{key}"] is not None]
    if checks:
        worse = sum(c[f"held_back_{key}"] < c[f"active_{key}"] for c in checks)
        lines.append(f"\nSteps whose newest refit was held back by the gate: {len(checks)}; the "
                     f"held-back version was worse on --eval than the active one in {worse}: "
                     + ", ".join(f"{c['strategy']}/{c['seed']}@{c['labels']} "
                                 f"{c[f'held_back_{key}']:.3f} vs {c[f'active_{key}']:.3f}"
                                 for c in checks[:12]))
    if len(scopes) > 1:
        lines.append("\nLabels per label set at the budget (per run): " + "; ".join(
            f"{s}: " + ", ".join(str(x) for x in summary["final"][s]["labels_per_set"])
            for s in strategies))
    choices = pixel_choice_lines(summary)
    if choices:
        lines.append("\nThe active model's heads that kept the thumbnail (label set: steps "
                     "with it / steps with a head, per run): " + "; ".join(choices))
    if "labels_saved" in summary:
        lines.append(f"\n**Labels the worklist needs to reach random's final {words}**")
        for scope, row in summary["labels_saved"].items():
            target = row[f"random_final_{key}"]
            reach = row["worklist_labels_to_reach"]
            lines.append(f"- {scope}: random@{summary['budget']} = "
                         f"{'—' if target is None else f'{target:.3f}'}; worklist reaches it at "
                         f"{reach if reach is not None else '>' + str(summary['budget'])} labels")
    lines.append(f"\nLargest fall of the active model's {words} between steps (positive = "
                 "fell, negative = it only rose): "
                 + "; ".join(f"{s}: " + ", ".join(f"{d:+.3f}" if d is not None else "—"
                                                  for d in summary["final"][s]["max_drop"])
                             for s in strategies)
                 + f" (any over {DROP_LIMIT}: {summary['any_drop_over_limit']})")
    lines.append(f"Stored predictions whose class is outside the scan's label set: "
                 f"{summary['wrong_set_predictions']} of {summary['predictions_checked']} "
                 f"(probability keys outside the set: {summary['wrong_set_probability_keys']}; "
                 f"suggestions shown from another set: {summary['wrong_set_suggestions_shown']})")
    if "findings_suggestions" in summary:
        f = summary["findings_suggestions"]
        lines.append(f"Findings suggestions: {f['shown']} of {f['answers']} answers were shown "
                     f"the model's findings; preselected {f['preselected']} findings, "
                     f"{f['preselected_present']} of them present (PPV "
                     f"{_ratio_words(f['preselected_present'], f['preselected'])}); "
                     f"{f['present_preselected']} of the {f['present_shown']} present findings "
                     f"shown were preselected (sensitivity "
                     f"{_ratio_words(f['present_preselected'], f['present_shown'])}); the "
                     f"preselection was the whole answer on {f['exact']} scans. Findings "
                     f"outside the scan's set: suggested {f['outside_set']}, in the active "
                     f"version's heads {f['head_outside_set']}, in stored shown scores "
                     f"{f['stored_outside_set']}; answers stored unlike the reader's "
                     f"findings: {f['answers_unlike_truth']}")
    return "\n".join(lines)


def _ratio_words(num: int, den: int) -> str:
    return "—" if not den else f"{num / den:.2f}"


def plot(path: Path, summary: dict, strategies: list[str], scopes: list[str],
         measures: Measures = CLASS_MEASURES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per label set (macro-F1), or for a findings set one per measure
    panels = ([(scope, measures.headline, measures.headline_words)
               for scope in (scopes if len(scopes) > 1 else ["overall"])]
              if measures is CLASS_MEASURES else
              [("overall", m, w) for m, w in measures.columns])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    colours = {"worklist": "#4c78a8", "random": "#e45756"}
    for ax, (scope, metric, words) in zip(axes[0], panels):
        for s in strategies:
            cv = summary["curves"][s]
            x = np.array(cv["labels"], dtype=float)
            m = np.array([np.nan if v is None else v for v in cv[scope][metric]["mean"]])
            sd = np.array([0.0 if v is None else v for v in cv[scope][metric]["sd"]])
            ax.plot(x, m, marker="o", ms=3, color=colours.get(s), label=f"{s} (active model)")
            ax.fill_between(x, m - sd, m + sd, color=colours.get(s), alpha=0.2)
            final = summary["final"][s][scope]
            probe = (final if measures is CLASS_MEASURES else final["by_metric"][metric])["probe"]
            if probe["mean"] is not None:
                ax.errorbar([summary["budget"] * (1 + 0.015 * (1 if s == "random" else -1))],
                            [probe["mean"]], yerr=[probe["sd"] or 0], fmt="x",
                            color=colours.get(s), label=f"{s}: offline probe at the budget")
        ax.set_title(f"{scope}: {words} on --eval")
        ax.set_xlabel("labels")
        ax.set_ylabel(words)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


# --- main ------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    started_all = time.perf_counter()
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loop-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "MEDIA_ROOT": str(workdir / "media"), "ARTIFACTS_ROOT": str(workdir / "artifacts"),
        "INCOMING_ROOT": str(workdir / "incoming"), "LOG_LEVEL": "WARNING", "DEBUG": "1",
        "ML_TASKS_IN_THREAD": "0"})
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "medsite.settings")
    os.environ.pop("CELERY_BROKER_URL", None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a kill still cleans up
    try:
        return _run(args, workdir, out, plot_path, started_all)
    finally:
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: Path, out: Path, plot_path: Path, started_all: float) -> int:
    import django

    django.setup()
    import torch
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import transaction
    from django.utils import timezone

    from annotator import label_page, labeling, selectors
    from ml_backend.errors import ModelUnavailable
    from annotator import services as annotator_services
    from annotator.models import (
        Annotation,
        LabelClass,
        LabelSet,
        Membership,
        Project,
        Scan,
        ScanLease,
    )
    from annotator.findings import findings_answer_create
    from annotator.selectors import findings_for_set, findings_targets
    from bench.loop_e2e_findings import (
        findings_scores,
        key_targets,
        states_of,
        write_findings_csv,
    )
    from ml_backend import services as ml
    from ml_backend.active.features import PIXEL_SIDE, block_weights, thumbnails
    from ml_backend.active.refit import (
        PRODUCT_PROTOTYPE_N0,
        SetHeads,
        fit_head,
        fit_head_choosing_block,
    )
    from ml_backend.data.arrays import load_images
    from ml_backend.models import ModelVersion, Prediction, QueryRound, TrainingRun
    from ml_backend.ssl.train import embed, load_pretrained

    try:
        from ml_backend import dispatch
    except ImportError:  # pragma: no cover - older trees
        dispatch = None

    timings: dict[str, float] = {}
    if args.encoder_checkpoint:
        _, ckpt_config = load_pretrained(args.encoder_checkpoint)
        group_size = ckpt_config.image_size
    else:
        group_size = args.image_size

    # 1. data ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    sources = prepare_sources(args, group_size)
    timings["prepare_sources_s"] = time.perf_counter() - t0

    call_command("migrate", verbosity=0)
    User = get_user_model()
    importer = User.objects.create_user("importer")
    reader1 = User.objects.create_user("reader1")
    reader2 = User.objects.create_user("reader2")
    admin = User.objects.create_user("admin")        # --promote-held-back promotes as admin
    project = annotator_services.project_create(name="loop-e2e", created_by=importer)
    for reader in (reader1, reader2):
        annotator_services.membership_set(project=project, user=reader,
                                          role=Membership.Role.CLINICIAN)
    if args.promote_held_back:
        annotator_services.membership_set(project=project, user=admin,
                                          role=Membership.Role.ADMIN)

    # a findings source: its set and findings are made by the import of its labeled gate
    # eval scans (a findings CSV), as ``manage.py import_scans labels.csv#train`` makes them
    findings_mode = sources[0].findings is not None
    measures = findings_measures() if findings_mode else CLASS_MEASURES
    set_of_source, classes = {}, {}
    for src in sources:
        if src.findings is not None:
            continue
        label_set = (annotator_services.label_set_create(project=project, name=src.set_name)
                     if src.set_name else annotator_services.label_set_default(project))
        set_of_source[src.index] = label_set
        for name in src.class_names:
            classes[name], _ = annotator_services.label_class_get_or_create(
                project=project, name=name, label_set=label_set)

    oracle: dict[str, str] = {}
    import_info = []
    t0 = time.perf_counter()
    for src in sources:
        tag = src.set_name or f"source {src.index}"
        gate_dir = workdir / f"src{src.index}" / "gate"
        pool_dir = workdir / f"src{src.index}" / "pool"
        written: list[str] = []
        gate_oracle, _ = write_items(src.gate, gate_dir, class_folders=src.findings is None,
                                     written=written)
        for sha, label in gate_oracle.items():
            oracle.setdefault(sha, label)
        gate_source, gate_layout = str(gate_dir), "class-folders"
        if src.findings is not None:
            gate_source = str(write_findings_csv(gate_dir / "findings.csv", written,
                                                 [k for _, k in src.gate], src.findings))
            gate_layout = "auto"
        pool_oracle, conflicts = write_items(src.pool, pool_dir, class_folders=False)
        src.info["pool_sha_label_conflicts"] = conflicts
        for sha, label in pool_oracle.items():
            oracle.setdefault(sha, label)
        # the labeled eval split first: a pool file identical to one of them is then a
        # duplicate (not imported), never a pool scan that inherits the eval label
        for split, folder, layout in (("eval", gate_source, gate_layout),
                                      ("pool", str(pool_dir), "flat")):
            job = annotator_services.import_job_create(
                project=project, source=folder, dataset_name=f"{tag} {split}",
                split=split, layout=layout, created_by=importer,
                label_set=src.set_name or (FINDINGS_SET if src.findings is not None else ""))
            job = annotator_services.import_job_run(job_id=job.pk)
            row = {"source": src.index, "split": split, "status": job.status,
                   "imported": job.imported, "duplicates": job.duplicates, "failed": job.failed,
                   "labels_added": job.labels_added, "errors": job.errors[:5]}
            import_info.append(row)
            log(f"import {tag} {split}: {job.status}, {job.imported} imported, "
                f"{job.duplicates} duplicates, {job.failed} failed, {job.labels_added} labels")
            if job.status != "succeeded":
                raise SystemExit(f"import failed: {job.last_error}")
    timings["import_s"] = time.perf_counter() - t0
    leaked = Annotation.objects.filter(scan__project=project, scan__split="pool").count()
    if leaked:
        raise SystemExit(f"{leaked} pool scans came in labeled: the oracle would leak")

    finding_columns: dict[int, list[LabelClass]] = {}     # findings set id: its findings
    for src in sources:
        if src.findings is None:
            continue
        name = src.set_name or FINDINGS_SET
        label_set = LabelSet.objects.filter(project=project, name__iexact=name).first()
        if label_set is None or not label_set.is_multi:
            raise SystemExit(f"the findings import made no findings label set {name!r}")
        set_of_source[src.index] = label_set
        by_name = {f.name.casefold(): f for f in findings_for_set(label_set)}
        missing = [f for f in src.findings
                   if annotator_services.without_untypable(f).casefold() not in by_name]
        if missing:
            raise SystemExit(f"the import made no finding for {', '.join(missing[:5])} "
                             f"(label set {label_set.name!r} has "
                             f"{', '.join(sorted(by_name)[:8])}...)")
        finding_columns[label_set.pk] = [
            by_name[annotator_services.without_untypable(f).casefold()] for f in src.findings]

    every_scan = list(Scan.objects.filter(project=project).order_by("pk"))
    pool = [scan for scan in every_scan if scan.split == "pool"]
    # a class source: the scan's class; a findings source: its answer per finding (a tuple)
    truth: dict = {}
    for scan in every_scan:
        label = oracle.get(scan.sha256)
        if label is None:
            raise SystemExit(f"scan {scan.pk} ({scan.source_name}) is not in the oracle")
        if findings_mode:
            truth[scan.pk] = label
            if scan.label_set_id not in finding_columns:
                raise SystemExit(f"scan {scan.pk} is not in the findings label set")
            continue
        truth[scan.pk] = classes[label]
        if truth[scan.pk].label_set_id != scan.label_set_id:
            raise SystemExit(f"scan {scan.pk} is in the wrong label set")
    # --vary-gate: the sha256s of each seed's gate eval scans (seed 0: as imported)
    items = {src.index: {item.name: item for item, _ in src.gate + src.pool} for src in sources}
    gate_shas = {seed: {hashlib.sha256(items[src.index][name].load()).hexdigest()
                        for src in sources for name in src.gates[seed]}
                 for seed in range(1, args.seeds) if args.vary_gate}
    gate_shas[0] = set(Scan.objects.filter(project=project, split="eval")
                       .values_list("sha256", flat=True))
    set_classes = {ls.pk: list(LabelClass.objects.filter(label_set=ls).order_by("order", "pk"))
                   for ls in set_of_source.values()}
    set_classes.update(finding_columns)
    log(f"project ready: {len(pool)} pool scans, "
        f"{Scan.objects.filter(project=project, split='eval').count()} labeled eval scans, "
        f"label sets {[ls.name for ls in set_of_source.values()]}")

    # 2. encoder ------------------------------------------------------------------------
    t0 = time.perf_counter()
    if args.encoder_checkpoint:
        _, config = load_pretrained(args.encoder_checkpoint)
        version = f"p{project.pk}-enc-imported"
        directory = Path(settings.ARTIFACTS_ROOT) / "models" / version
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.encoder_checkpoint, directory / "encoder.pt")
        encoder = ModelVersion.objects.create(
            project=project, kind=ModelVersion.Kind.ENCODER, version=version,
            artifact_dir=str(directory), status=ModelVersion.Status.READY,
            config={"pretrain": asdict(config), "init_checkpoint": None,
                    "imported_from": str(Path(args.encoder_checkpoint).resolve()),
                    "embed_scales": list(settings.EMBED_SCALES),
                    "embed_layers": list(settings.EMBED_LAYERS)})
        ml.model_version_activate(encoder, reason="imported checkpoint (bench.loop_e2e)")
        run = ml.training_run_create(project=project, kind="embed", params={"full": True})
        run = ml.training_run_execute(run.pk)
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise SystemExit(f"embed run failed: {run.last_error}")
        encoder_info = {"source": "checkpoint", "path": str(args.encoder_checkpoint),
                        "embed_scales": list(settings.EMBED_SCALES),
                        "embed_layers": list(settings.EMBED_LAYERS)}
    else:
        params = {"epochs": args.pretrain_epochs, "image_size": args.image_size,
                  "batch_size": args.batch_size}
        if args.small_input != "auto":
            params["small_input"] = args.small_input == "yes"
        run = ml.training_run_create(project=project, kind="pretrain", params=params)
        last = [0.0]

        def progress(event: dict) -> None:
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                log("  pretrain " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                              f"{k}={v}" for k, v in event.items()))
        log(f"pretraining: {params} on "
            f"{Scan.objects.filter(project=project).count()} scans")
        run = ml.training_run_execute(run.pk, progress=progress)
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise SystemExit(f"pretraining failed: {run.last_error}")
        encoder_info = {"source": "pretrain run", "params": params}
    project.refresh_from_db()
    encoder = project.active_encoder
    checkpoint = Path(encoder.artifact_dir) / "encoder.pt"
    timings["encoder_s"] = time.perf_counter() - t0
    encoder_info.update({"version": encoder.version, "metrics": encoder.metrics,
                         "seconds": timings["encoder_s"]})
    if args.save_encoder:
        Path(args.save_encoder).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkpoint, args.save_encoder)
        encoder_info["saved_to"] = str(Path(args.save_encoder).resolve())
    log(f"encoder {encoder.version} ready in {timings['encoder_s']:.0f}s: {checkpoint}"
        + (f" (copied to {args.save_encoder}; reuse with --encoder-checkpoint)"
           if args.save_encoder else ""))

    # 3. the offline eval sets, embedded once with the active encoder ---------------------
    t0 = time.perf_counter()
    # as the product embeds with it: at each of the encoder's embed_scales
    simclr, pconfig = ml.encoder_network(encoder)
    evals: list[EvalSet] = []
    for src in sources:
        label_set = set_of_source[src.index]
        paths, labels, failed = eval_previews(src.evaluation, workdir / f"eval{src.index}")
        src.info["eval_decode_failed"] = failed
        if src.findings is not None:
            # (N, F) answers, uncertain read as unknown: it never scores a model, as the
            # refit's own eval (``services.findings``) reads it
            cls = set_classes[label_set.pk]
            y = key_targets(labels) if labels else np.zeros((0, len(cls)))
            y[y == -1] = np.nan
            ev = EvalSet(name=label_set.name, set_id=label_set.pk,
                         class_ids=[c.pk for c in cls], class_names=[c.name for c in cls],
                         y=y, paths=paths)
        else:
            cls = [c for c in set_classes[label_set.pk] if c.name in src.class_names]
            names = [c.name for c in cls]
            ev = EvalSet(name=label_set.name, set_id=label_set.pk,
                         class_ids=[c.pk for c in cls], class_names=names,
                         y=np.array([names.index(lab) for lab in labels]), paths=paths)
        images = load_images(paths, pconfig.image_size, pconfig.channels)
        ev.vectors = embed(simclr.encoder, images, pconfig)
        ev.thumbs = thumbnails(images, PIXEL_SIDE)
        evals.append(ev)
    timings["eval_embed_s"] = time.perf_counter() - t0
    scopes = ["overall"] + ([ev.name for ev in evals] if len(evals) > 1 else [])
    embedding_check = None
    if findings_mode:
        # the bench embeds --eval itself: does it read scans as the product's embed run did?
        # (the gate eval scans, re-embedded from their previews, against their stored vectors)
        sample = list(Scan.objects.filter(project=project, split="eval").order_by("pk")[:16])
        again = embed(simclr.encoder, load_images([s.preview.path for s in sample],
                                                  pconfig.image_size, pconfig.channels), pconfig)
        stored = ml.vectors_for(encoder, sample)
        embedding_check = {"scans": len(sample),
                           "max_abs_difference": float(np.abs(again - stored).max())}
        log(f"--eval embedded as the product embeds: {embedding_check}")
    log(f"eval sets embedded in {timings['eval_embed_s']:.0f}s: "
        + ", ".join(f"{ev.name} {len(ev.y)}" for ev in evals))

    config = {"args": vars(args), "argv": sys.argv, "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "sources": [s.info for s in sources],
              "imports": import_info, "encoder": encoder_info,
              "project_defaults": {}, "pool_scans": len(pool),
              "settings": {name: getattr(settings, name, None) for name in (
                  "REFIT_BALANCE", "QUERY_TYPICAL_BELOW", "STARTER_ENCODER")}}
    if findings_mode:
        config["kind"] = "findings"
        config["eval_embedding_check"] = embedding_check
    runs: list[dict] = []

    def save(complete: bool) -> dict:
        payload = {"config": config, "timings": {**timings,
                                                  "total_s": time.perf_counter() - started_all},
                   "complete": complete, "runs": runs}
        if runs:
            payload["summary"] = summarise(runs, args.strategies, scopes, args.budget,
                                           measures)
        write_json(out, payload)
        return payload

    # 4. the loop -------------------------------------------------------------------------
    score_cache: dict[int, dict] = {}

    def score_model(model) -> dict:
        if model.pk not in score_cache:
            score_cache[model.pk] = (score_findings(model) if findings_mode else score_heads(
                ml.version_heads(model), evals, model.config.get("pixels")))
        return score_cache[model.pk]

    def score_findings(model) -> dict:
        """The version's findings heads on --eval (the heads the label page and the worklist
        read); a finding of the set it has no head for scores 0 everywhere."""
        from ml_backend.services.findings import findings_head

        result: dict = {"per_set": {}}
        for ev in evals:
            head = findings_head(model, ev.set_id)
            block = findings_scores(ev.y, None, ev.class_names)
            if head is not None:
                raw = head.predict_proba(ev.vectors)
                column = {int(i): j for j, i in enumerate(head.finding_ids)}
                proba = np.zeros((len(ev.y), len(ev.class_ids)))
                for j, c in enumerate(ev.class_ids):
                    if c in column:
                        proba[:, j] = raw[:, column[c]]
                block = findings_scores(ev.y, proba, ev.class_names)
                block["head_outside_set"] = len(set(column) - set(ev.class_ids))
                block["findings_without_head"] = len(set(ev.class_ids) - set(column))
            result["per_set"][ev.name] = block
        result["overall"] = result["per_set"][evals[0].name]     # one findings set
        return result

    def import_answer(scan: Scan) -> None:
        """A gate eval scan's true answer, as its import stored it."""
        if findings_mode:
            states, _ = states_of(truth[scan.pk], [f.pk for f in set_classes[scan.label_set_id]])
            findings_answer_create(scan=scan, reader=importer, states=states,
                                   source=Annotation.Source.IMPORT)
            return
        Annotation.objects.create(scan=scan, label_class=truth[scan.pk],
                                  source=Annotation.Source.IMPORT,
                                  outcome=Annotation.Outcome.LABEL, reader=importer)

    def reset(project: Project, seed: int = 0) -> Project:
        if args.vary_gate:          # this seed's gate eval scans, labeled; the rest pool
            wanted = gate_shas[seed]
            Scan.objects.filter(project=project).exclude(sha256__in=wanted).update(split="pool")
            Scan.objects.filter(project=project, sha256__in=wanted).update(split="eval")
        Annotation.objects.filter(scan__project=project, scan__split="pool").delete()
        if args.vary_gate:          # a scan back in the gate keeps only its true label
            Annotation.objects.filter(scan__project=project, scan__split="eval").exclude(
                source=Annotation.Source.IMPORT).delete()
            for scan in Scan.objects.filter(project=project, split="eval",
                                            annotations__isnull=True):
                import_answer(scan)
        ScanLease.objects.filter(project=project).delete()
        QueryRound.objects.filter(project=project).delete()
        Project.objects.filter(pk=project.pk).update(active_model=None)
        for model in ModelVersion.objects.filter(project=project,
                                                 kind=ModelVersion.Kind.CLASSIFIER):
            ml.model_artifacts_remove(model)
            model.delete()                      # predictions and evaluations cascade
        TrainingRun.objects.filter(project=project).exclude(
            kind__in=["pretrain", "embed"]).delete()
        project = Project.objects.get(pk=project.pk)
        project.refit_every = args.step
        project.query_batch_size = args.step
        if args.query_strategy:
            project.query_strategy = args.query_strategy
        if args.gate_tolerance is not None:
            project.gate_tolerance = args.gate_tolerance
        project.save()
        config["project_defaults"] = {"query_strategy": project.query_strategy,
                                      "gate_tolerance": project.gate_tolerance,
                                      "refit_every": project.refit_every,
                                      "query_batch_size": project.query_batch_size}
        return project

    def idle() -> None:
        if dispatch is not None and hasattr(dispatch, "wait_idle"):
            dispatch.wait_idle(1800)

    def suggestion_for(project: Project, scan: Scan):
        try:
            return label_page._suggestion(project, scan)
        except ModelUnavailable:
            return None

    def answer(project: Project, scan: Scan, reader, label_class: LabelClass, item, stats):
        project.refresh_from_db()
        shown = suggestion_for(project, scan)
        suggested = None
        if shown is not None:
            suggested = LabelClass.objects.filter(pk=shown["class_id"]).first()
            stats["shown"] += 1
            stats["correct"] += int(shown["class_id"] == truth[scan.pk].pk)
            if suggested is not None and suggested.label_set_id != scan.label_set_id:
                stats["wrong_set"] += 1
        with transaction.atomic():   # the answer view's request transaction
            annotator_services.annotation_create(
                scan=scan, reader=reader, label_class=label_class,
                shown_model_version=project.active_model, shown_suggestion=suggested,
                shown_confidence=None if shown is None else shown["confidence"],
                shown_acquisition_score=None if item is None else item.score,
                query_round=None if item is None else item.query_round)
        labeling.lease_release(scan=scan, user=reader)
        idle()

    def answer_findings(project: Project, scan: Scan, reader, key: tuple, item, stats):
        """Reader1 answers a findings scan as the findings label page sends it: the page's
        rows (each finding with the active version's probability and threshold, preselected
        at or above it), then the reader's true findings with the scores shown
        (``label.js`` ``findingsAnswer``) through the answer view's ``answer_submit``."""
        project.refresh_from_db()
        page_findings = label_page.scan_classes(scan)
        try:
            shown = label_page._findings_suggestion(project, scan, page_findings)
        except (ModelUnavailable, OSError, ValueError):
            shown = None
        rows = label_page._findings_rows(page_findings, label_page.finding_hotkeys(
            page_findings), shown, scan)
        scores = {r["id"]: r["p"] for r in rows if r["p"] is not None}
        preselected = {r["id"] for r in rows if r["preselected"]}
        ids = [f.pk for f in set_classes[scan.label_set_id]]
        states, no_finding = states_of(key, ids)
        present = {fid for fid, state in states.items() if state == "present"}
        stats["answers"] += 1
        if shown is not None:
            stats["shown"] += 1
            stats["preselected"] += len(preselected)
            stats["preselected_present"] += len(preselected & present)
            stats["present_shown"] += len(present)
            stats["present_preselected"] += len(present & preselected)
            stats["exact"] += int(preselected == present)
            stats["outside_set"] += len(set(shown["scores"]) - set(ids))
        data = {"outcome": "findings", "shown_model_version": shown["model_version"]
                if shown else "", "shown_scores": {str(k): v for k, v in scores.items()},
                "shown_acquisition_score": "" if item is None else item.score,
                "query_round": "" if item is None else item.query_round_id}
        if no_finding:
            data["no_finding"] = True
        else:
            data["findings"] = {str(k): v for k, v in states.items()}
        with transaction.atomic():   # the answer view's request transaction
            labeling.answer_submit(project=project, scan=scan, user=reader, data=data)
        idle()

    def refit_state(project: Project, since) -> dict:
        versions = list(ModelVersion.objects.filter(project=project,
                                                    kind=ModelVersion.Kind.CLASSIFIER)
                        .order_by("created_at", "pk"))
        held = [v for v in versions if v.promoted_at is None
                and v.status == ModelVersion.Status.READY]
        refit_runs = TrainingRun.objects.filter(project=project, kind=TrainingRun.Kind.REFIT)
        return {"runs": refit_runs.count(),
                "promoted": sum(v.promoted_at is not None for v in versions),
                "held_back": len(held),
                "failed": refit_runs.filter(status=TrainingRun.Status.FAILED).count(),
                "newest_held_back_reason": held[-1].status_reason if held else None,
                "newest_failure": (refit_runs.filter(status=TrainingRun.Status.FAILED)
                                   .order_by("-created_at").values_list("last_error", flat=True)
                                   .first()),
                "refit_seconds_this_step": sum(
                    (r.finished_at - r.started_at).total_seconds()
                    for r in refit_runs.filter(finished_at__gte=since)
                    if r.started_at and r.finished_at),
                "refits_this_step": refit_runs.filter(created_at__gte=since).count()}

    def pixel_choices(model) -> dict | None:
        """Per label set of ``model``: did its head keep the thumbnail (the refit's
        out-of-fold choice, ``label_sets[].pixels`` of the version's config)?"""
        if model is None:
            return None
        return {entry["name"]: bool(entry.get("pixels"))
                for entry in (model.config or {}).get("label_sets", [])}

    def newest_findings_gate(project: Project) -> dict | None:
        """The newest refit the gate held back (newer than the active version): its findings
        gate comparison per finding, and its macro AUC on the gate eval scans."""
        newest = (ModelVersion.objects.filter(project=project,
                                              kind=ModelVersion.Kind.CLASSIFIER)
                  .exclude(status=ModelVersion.Status.TRAINING)
                  .order_by("-created_at", "-pk").first())
        if newest is None or newest.pk == project.active_model_id or newest.promoted_at:
            return None
        metrics = newest.metrics or {}
        name = evals[0].name
        gate_rows = (metrics.get("findings_gate") or {}).get(name) or {}
        return {"version": newest.version, "status": newest.status,
                "regressed": gate_rows.get("regressed"),
                "gate_eval_macro_auc": ((metrics.get("training") or {}).get("findings", {})
                                        .get(name) or {}).get("macro_auc"),
                "per_finding": {n: {k: r.get(k) for k in ("positives", "candidate_auc",
                                                          "active_auc", "delta", "status")}
                                for n, r in (gate_rows.get("per_finding") or {}).items()}}

    def promote_held_back(project: Project) -> dict | None:
        """--promote-held-back: an admin promotes the newest refit the gate held back by
        hand ("promote anyway", ``model_version_promote``: its predictions and the next
        round follow, as for a promotion by the gate)."""
        active = project.active_model
        newest = (ModelVersion.objects.filter(
            project=project, kind=ModelVersion.Kind.CLASSIFIER,
            status=ModelVersion.Status.READY, promoted_at=None)
            .order_by("-created_at", "-pk").first())
        if newest is None or (active is not None and newest.created_at < active.created_at):
            return None
        warning = ml.model_version_promote(newest, actor=admin)
        idle()
        return {"version": newest.version, "warning": warning}

    def findings_probe(project: Project):
        """The offline findings probe: ``fit_findings_head`` on the labeled pool scans' stored
        embeddings with the product's targets (readers' votes, the set's uncertain policy),
        and with the oracle's answers of the same scans, scored as the active model is.
        Returns (probe, probe on true answers, labeled scans, stored answers unlike the
        reader's findings)."""
        from ml_backend.active.findings import fit_findings_head
        from ml_backend.metrics.findings import uncertain_policy

        probe = probe_true = None
        labeled, unlike = 0, 0
        for ev in evals:
            label_set = LabelSet.objects.get(pk=ev.set_id)
            scans, findings, raw = findings_targets(label_set, split="pool")
            if not scans:
                continue
            labeled += len(scans)
            ids = [f.pk for f in findings]
            true = key_targets([truth[s.pk] for s in scans])
            order = [ids.index(f.pk) for f in set_classes[ev.set_id]]
            true_in_set_order = np.full(raw.shape, np.nan)
            true_in_set_order[:, order] = true
            unlike += int(np.sum(~((raw == true_in_set_order)
                                   | (np.isnan(raw) & np.isnan(true_in_set_order))).all(axis=1)))
            vectors = ml.vectors_for(encoder, scans)

            def fit(targets):
                head, _ = fit_findings_head(vectors, uncertain_policy(
                    targets, label_set.uncertain_policy), np.array(ids), seed=0)
                proba = head.predict_proba(ev.vectors)
                column = {c: j for j, c in enumerate(ids)}
                aligned = proba[:, [column[c] for c in ev.class_ids]]
                block = findings_scores(ev.y, aligned, ev.class_names)
                return {"per_set": {ev.name: block}, "overall": block}

            probe, probe_true = fit(raw), fit(true_in_set_order)
        return probe, probe_true, labeled, unlike

    def one_run(strategy: str, seed: int) -> dict:
        project = reset(Project.objects.get(pk=project_pk), seed)
        rng = random.Random(seed)
        noise = random.Random(1_000_003 + seed)
        pool = list(Scan.objects.filter(project=project, split="pool").order_by("pk"))
        unlabeled = [s.pk for s in pool]
        # this run's scans as they are now (--vary-gate moved some between eval and pool)
        pool_now = {s.pk: s for s in pool}
        labeled: list[int] = []
        per_set: Counter = Counter()
        points, stats = [], {"shown": 0, "correct": 0, "wrong_set": 0}
        if findings_mode:
            stats.update({k: 0 for k in FINDINGS_CHECKS})
        noise_stats = {"second_reader_labels": 0, "second_reader_wrong": 0}
        manual_rounds = 0
        by_hand: list[dict] = []         # --promote-held-back: the versions an admin promoted
        run_started = time.perf_counter()
        step_started, step_since = time.perf_counter(), timezone.now()
        if strategy == "worklist":
            ml.query_round_create(project=project)           # the product's cold start
        while len(labeled) < args.budget and unlabeled:
            item = None
            if strategy == "worklist":
                got = labeling.lease_next(project=project, user=reader1)
                if got is None:          # the round ran out before a promoted refit
                    ml.query_round_create(project=project)
                    manual_rounds += 1
                    got = labeling.lease_next(project=project, user=reader1)
                    if got is None:
                        break
                scan, item = got
                unlabeled.remove(scan.pk)
            else:
                scan = pool_now[unlabeled.pop(rng.randrange(len(unlabeled)))]
            (answer_findings if findings_mode else answer)(
                project, scan, reader1, truth[scan.pk], item, stats)
            labeled.append(scan.pk)
            per_set[set_names[scan.label_set_id]] += 1
            if args.second_reader_error is not None:
                given = truth[scan.pk]
                if noise.random() < args.second_reader_error:
                    others = [c for c in set_classes[scan.label_set_id] if c.pk != given.pk]
                    given = noise.choice(others)
                    noise_stats["second_reader_wrong"] += 1
                noise_stats["second_reader_labels"] += 1
                answer(project, scan, reader2, given, None, {"shown": 0, "correct": 0,
                                                             "wrong_set": 0})
            if len(labeled) % args.step == 0 or len(labeled) == args.budget:
                project.refresh_from_db()
                # why the gate held the newest refit back, finding by finding
                held_gate = newest_findings_gate(project) if findings_mode else None
                if args.promote_held_back:
                    promoted = promote_held_back(project)
                    if promoted is not None:
                        by_hand.append(promoted)
                        project.refresh_from_db()
                model = project.active_model
                state = refit_state(project, step_since)
                evaluation = (model.evaluations.order_by("-created_at").first()
                              if model is not None else None)
                newest = (ModelVersion.objects.filter(
                    project=project, kind=ModelVersion.Kind.CLASSIFIER,
                    status__in=[ModelVersion.Status.READY, ModelVersion.Status.ACTIVE,
                                ModelVersion.Status.RETIRED])
                    .order_by("-created_at", "-pk").first())
                point = {"labels": len(labeled), "labels_per_set": dict(per_set),
                         "annotations": Annotation.objects.filter(
                             scan__project=project, scan__split="pool").count(),
                         "active_version": model.version if model else None,
                         "active_num_labels": model.num_labels if model else None,
                         "active": score_model(model) if model else None,
                         "active_pixels": pixel_choices(model),
                         # the newest refit, promoted or held back: was holding it back right?
                         "newest_version": newest.version if newest else None,
                         "newest": (score_model(newest) if newest is not None
                                    and newest.pk != getattr(model, "pk", None) else None),
                         "gate_eval_macro_f1": evaluation.macro_f1 if evaluation else None,
                         "step_seconds": time.perf_counter() - step_started,
                         "manual_rounds": manual_rounds,
                         "suggestions_shown": stats["shown"],
                         "suggestions_correct": stats["correct"], **state}
                if args.promote_held_back:
                    point["promoted_by_hand"] = len(by_hand)
                if findings_mode:
                    point["newest_findings_gate"] = held_gate
                    # the preselection was the reader's whole answer (no finding to add or
                    # clear), and the gate's own eval figure of the active version
                    point["suggestions_correct"] = stats["exact"]
                    point["gate_eval_macro_auc"] = (
                        ((model.metrics or {}).get("training", {}).get("findings", {})
                         .get(evals[0].name) or {}).get("macro_auc") if model else None)
                points.append(point)
                f1 = _metric(point, "overall", measures.headline)
                log(f"  {strategy} seed {seed}: {len(labeled)} labels, active "
                    f"{point['active_version']}, {measures.headline_words} "
                    f"{'—' if f1 is None else f'{f1:.3f}'}, refits {state['promoted']} promoted"
                    f" / {state['held_back']} held back / {state['failed']} failed, step "
                    f"{point['step_seconds']:.1f}s (refit {state['refit_seconds_this_step']:.1f}s)")
                step_started, step_since = time.perf_counter(), timezone.now()
        project.refresh_from_db()
        seconds = time.perf_counter() - run_started

        # the offline probe on the same labels (the product's vote resolution) and on the
        # oracle's labels of the same scans
        if findings_mode:
            scans, class_ids = [], []
            probe, probe_true, probe_labels, unlike = findings_probe(project)
            stats["answers_unlike_truth"] = unlike
        else:
            scans, class_ids = selectors.training_labels(project, split="pool")
            probe = probe_true = None
            probe_labels = len(scans)
        if scans:
            # the product's head inputs: the embedding and, as the refit does, the thumbnail
            pixels = ({"side": PIXEL_SIDE, "weight": settings.REFIT_PIXEL_WEIGHT}
                      if settings.REFIT_PIXEL_WEIGHT > 0 else None)
            vectors = ml.head_inputs_for(encoder, scans, pixels)
            dim = ml.embedding_table(encoder).vectors.shape[1]
            weights = (block_weights(dim, vectors.shape[1] - dim, settings.REFIT_PIXEL_WEIGHT)
                       if pixels else None)

            def fit(labels_by_row):
                heads, ids = {}, []
                for set_id in sorted({s.label_set_id for s in scans}):
                    rows = [i for i, s in enumerate(scans) if s.label_set_id == set_id]
                    y = np.array([labels_by_row[i] for i in rows])
                    if len(set(y.tolist())) < 2:
                        continue
                    options = {"seed": 0, "prototype_n0": PRODUCT_PROTOTYPE_N0,
                               "balance": settings.REFIT_BALANCE}
                    head, _ = (fit_head_choosing_block(
                        vectors[rows], y, embedding_dim=dim, feature_weights=weights,
                        always=settings.REFIT_PIXELS == "always", **options)
                               if pixels else fit_head(vectors[rows], y, **options))
                    heads[set_id] = head
                    ids += [int(c) for c in head.class_ids]
                return (score_heads(SetHeads(heads=heads, class_ids=ids), evals, pixels)
                        if heads else None)

            probe = fit(class_ids)
            probe_true = fit([truth[s.pk].pk for s in scans])

        # every stored prediction: is its class (and every probability key) of the scan's set?
        class_set = dict(LabelClass.objects.filter(project=project)
                         .values_list("pk", "label_set_id"))
        wrong = {"checked": 0, "predicted_class": 0, "probability_keys": 0}
        for scan_set, predicted, probabilities in Prediction.objects.filter(
                scan__project=project).values_list("scan__label_set_id", "predicted_class_id",
                                                   "probabilities").iterator():
            wrong["checked"] += 1
            if findings_mode and predicted is None:    # a findings row names no one class
                pass
            else:
                wrong["predicted_class"] += int(class_set.get(predicted) != scan_set)
            wrong["probability_keys"] += int(any(class_set.get(int(k)) != scan_set
                                                 for k in probabilities))
        held_back_findings = []
        if findings_mode:
            # every score shown with an answer: a finding of the scan's own set?
            for scan_set, shown_scores in Annotation.objects.filter(
                    scan__project=project, scan__split="pool").exclude(
                    shown_scores=None).values_list("scan__label_set_id", "shown_scores"):
                stats["stored_outside_set"] += sum(
                    class_set.get(int(k)) != scan_set for k in shown_scores)
            stats["head_outside_set"] = sum(
                (p["active"] or {}).get("overall", {}).get("head_outside_set", 0)
                for p in points)
            # which findings the gate named for each refit it held back
            for metrics in ModelVersion.objects.filter(
                    project=project, kind=ModelVersion.Kind.CLASSIFIER, promoted_at=None,
                    status=ModelVersion.Status.READY).values_list("metrics", flat=True):
                for entry in ((metrics or {}).get("findings_gate") or {}).values():
                    held_back_findings += list((entry or {}).get("regressed") or [])
        drops = []
        values = [_metric(p, "overall", measures.headline) for p in points]
        defined = [v for v in values if v is not None]
        for a, b in zip(defined, defined[1:]):
            drops.append(a - b)
        max_drop = max(drops) if drops else None
        final_state = refit_state(project, timezone.now())
        return {"strategy": strategy, "seed": seed, "points": points, "seconds": seconds,
                "probe": probe, "probe_true_labels": probe_true,
                "probe_labels": probe_labels, "wrong_set": wrong, "suggestions": stats,
                **({"findings_suggestions": {k: stats[k] for k in FINDINGS_CHECKS},
                    "held_back_findings": held_back_findings} if findings_mode else {}),
                "second_reader": noise_stats if args.second_reader_error is not None else None,
                "refits": {k: final_state[k] for k in ("runs", "promoted", "held_back",
                                                       "failed")},
                "held_back_reasons": list(ModelVersion.objects.filter(
                    project=project, kind=ModelVersion.Kind.CLASSIFIER, promoted_at=None,
                    status=ModelVersion.Status.READY).order_by("created_at")
                    .values_list("version", "status_reason")),
                "final_active_version": project.active_model.version
                if project.active_model else None,
                "max_drop": max_drop,
                "fell_more_than_limit": bool(max_drop is not None and max_drop > DROP_LIMIT),
                "manual_rounds": manual_rounds,
                **({"promoted_by_hand": by_hand} if args.promote_held_back else {}),
                "labeled_order_digest": hashlib.sha256(
                    ",".join(map(str, labeled)).encode()).hexdigest()[:16],
                "gate_eval_digest": hashlib.sha256(",".join(sorted(
                    Scan.objects.filter(project=project, split="eval")
                    .values_list("sha256", flat=True))).encode()).hexdigest()[:16]}

    project_pk = project.pk
    set_names = {ls.pk: ls.name for ls in set_of_source.values()}
    for seed in range(args.seeds):
        for strategy in args.strategies:
            log(f"run: {strategy}, seed {seed}")
            result = one_run(strategy, seed)
            runs.append(result)
            payload = save(complete=False)
            log(f"run {strategy} seed {seed} done in {result['seconds']:.0f}s; JSON: {out}")
            plot(plot_path, payload["summary"], args.strategies, scopes, measures)

    payload = save(complete=True)
    plot(plot_path, payload["summary"], args.strategies, scopes, measures)
    print(tables(payload["summary"], args.strategies, scopes, measures), flush=True)
    log(f"done in {time.perf_counter() - started_all:.0f}s: {out}, {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
