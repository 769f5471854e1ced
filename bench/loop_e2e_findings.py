"""``bench.loop_e2e`` on a findings (multi-label) source: the pure parts. No Django.

- ``patient_groups``: which scans must stay together (one patient's films, and near-duplicate
  scans), read from the file names (NIH ChestX-ray14 ``00000001_000.png``, CheXpert
  ``.../patient00001/...``).
- ``pick_gate_findings``: the project's labeled eval split for the gate, as whole patients:
  about ``per_finding`` positives of every finding (never more than half of a finding's
  positives, so the pool keeps some of each) and ``per_finding`` scans without a finding.
- ``truth_key`` / ``states_of``: a scan's true findings (1, 0, -1 uncertain, None unknown) and
  the answer a reader gives for them.
- ``write_findings_csv``: the gate eval scans as a 0/1 findings CSV the product imports.
- ``findings_scores``: the active model (or a probe) on ``--eval``: macro AUC over the
  findings with at least one eval positive (the product's ``macro_auc``), over those with at
  least ``MIN_POSITIVES``, any-finding AUC, micro AUC, macro AP.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

# the measures a findings run records per step (``summarise`` averages them over seeds)
FINDINGS_METRICS = ("macro_auc", "macro_auc_min5", "any_finding_auc", "micro_auc", "macro_ap")
# findings with at least this many eval positives: the gate judges only those
# (``metrics.findings.compare_findings``), and their AUC is less of a coin toss
MIN_POSITIVES = 5

_NIH = re.compile(r"(?:^|/)(\d{8})_\d{3}\.\w+$")
_CHEXPERT = re.compile(r"(?:^|/)(patient\d+)/", re.IGNORECASE)


def patient_of(name: str) -> str | None:
    """The patient a file name says it belongs to, or None when it says nothing."""
    for pattern in (_NIH, _CHEXPERT):
        found = pattern.search(name.replace("\\", "/"))
        if found:
            return found.group(1).lower()
    return None


def patient_groups(names: list[str], near: np.ndarray | None = None) -> np.ndarray:
    """Group ids ``int64 (N,)``: scans of one patient share a group, and so do near-duplicate
    scans (``near``: ``bench.ssl_eval.near_duplicate_groups``), transitively; a scan whose
    name names no patient is its own patient."""
    n = len(names)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict = {}
    for i, name in enumerate(names):
        key = patient_of(name)
        if key is not None:
            join(i, first.setdefault(("patient", key), i))
        if near is not None:
            join(i, first.setdefault(("near", int(near[i])), i))
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def truth_key(row) -> tuple:
    """A targets row as a hashable answer: 1 present, 0 absent, -1 uncertain, None unknown."""
    return tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                 for v in np.asarray(row, dtype=np.float64).tolist())


def key_targets(keys) -> np.ndarray:
    """``(N, F)`` float targets (NaN unknown) from ``truth_key`` answers."""
    return np.array([[np.nan if v is None else float(v) for v in key] for key in keys],
                    dtype=np.float64).reshape(len(keys), -1)


STATE = {1: "present", 0: "absent", -1: "uncertain"}


def states_of(key: tuple, finding_ids: list[int]) -> tuple[dict[int, str], bool]:
    """What the reader marks for a scan with these true findings: ``({finding id: state},
    no_finding)``. Every finding known absent is the page's "no finding" (key 0: nothing is
    marked); an unknown finding is left unanswered."""
    states = {fid: STATE[v] for fid, v in zip(finding_ids, key) if v is not None}
    no_finding = bool(states) and all(s == "absent" for s in states.values()) \
        and len(states) == len(finding_ids)
    return states, no_finding


def pick_gate_findings(targets: np.ndarray, groups: np.ndarray, candidates: np.ndarray,
                       per_finding: int, seed: int = 0) -> np.ndarray:
    """Indices (into ``targets``) of the gate eval scans: whole groups (patients) from
    ``candidates``, the rarest finding first, until each finding has about ``per_finding``
    positives, never more than half of its positives among the candidates (a group that would
    push any finding past that half is passed over), then ``per_finding`` scans without a
    finding. Among the groups that fit, small ones first (in a random order of ``seed``)."""
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for idx in np.asarray(candidates).tolist():
        members.setdefault(int(groups[idx]), []).append(int(idx))
    positive = np.nan_to_num(targets, nan=0.0) == 1
    empty = (np.nan_to_num(targets, nan=1.0) == 0).all(axis=1)
    pos_of = {g: positive[m].sum(axis=0) for g, m in members.items()}
    empty_of = {g: int(empty[m].sum()) for g, m in members.items()}
    total = sum(pos_of.values()) if pos_of else np.zeros(targets.shape[1], dtype=int)
    allowance = np.asarray(total) // 2
    have = np.zeros(targets.shape[1], dtype=int)
    without = 0
    chosen: set[int] = set()
    order = [int(f) for f in np.argsort(total, kind="stable")] + [None]
    for f in order:
        need = per_finding if f is None else min(per_finding, int(allowance[f]))
        options = sorted(g for g in members if g not in chosen
                         and (empty_of[g] if f is None else pos_of[g][f]))
        options = [options[i] for i in rng.permutation(len(options))]
        options.sort(key=lambda g: len(members[g]))
        for g in options:
            if (without if f is None else have[f]) >= need:
                break
            if (have + pos_of[g] > allowance).any():
                continue
            chosen.add(g)
            have += pos_of[g]
            without += empty_of[g]
    return np.array(sorted(i for g in chosen for i in members[g]), dtype=np.int64)


def write_findings_csv(path: Path, file_names: list[str], keys: list[tuple],
                       findings: list[str]) -> Path:
    """A 0/1 findings CSV (``filename`` + one column per finding: 1, 0, -1 or blank) the
    import reads as a findings source (``ml_backend.data.findings``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", *findings])
        for name, key in zip(file_names, keys):
            writer.writerow([name, *("" if v is None else str(v) for v in key)])
    return path


def counts(keys: list[tuple], findings: list[str]) -> dict:
    """Positives per finding and scans without a finding."""
    y = key_targets(keys) if keys else np.zeros((0, len(findings)))
    out = {name: int((y[:, f] == 1).sum()) for f, name in enumerate(findings)}
    out["(no finding)"] = int((np.nan_to_num(y, nan=1.0) == 0).all(axis=1).sum()) if len(y) \
        else 0
    return out


def findings_scores(y: np.ndarray, proba: np.ndarray | None, names: list[str]) -> dict:
    """The findings measures (module docstring) of ``proba`` against ``y`` (``(N, F)``: 1, 0,
    NaN unknown or uncertain); ``proba`` None: no head for the set yet (every measure None)."""
    from ml_backend.metrics.findings import findings_report

    y = np.asarray(y, dtype=np.float64)
    if proba is None:
        return {**{m: None for m in FINDINGS_METRICS}, "n": int(len(y)),
                "no_prediction": int(len(y)), "findings_with_auc": 0, "findings_min5": [],
                "auc": {}}
    report = findings_report(y, np.asarray(proba, dtype=np.float64), names)
    per = report["per_finding"]
    judged = [n for n in names if per[n]["auc"] is not None
              and per[n]["positives"] >= MIN_POSITIVES]
    return {"macro_auc": report["macro_auc"],
            "macro_auc_min5": (float(np.mean([per[n]["auc"] for n in judged]))
                               if judged else None),
            "any_finding_auc": report["any_finding_auc"], "micro_auc": report["micro_auc"],
            "macro_ap": report["macro_ap"], "n": int(len(y)), "no_prediction": 0,
            "findings_with_auc": report["findings_with_auc"], "findings_min5": judged,
            "auc": {n: per[n]["auc"] for n in names}}
