"""Findings label sets in the fast refit: one calibrated binary head per finding on the
frozen embeddings (``ml_backend.active.findings``), thresholds chosen per finding on the
labeled eval scans, a per-finding report, and the findings gate (the candidate and the
active version scored on the same eval scans, per-finding AUC compared).

A version's findings heads sit beside its class heads: ``findings-<set id>.npz`` in its
artifact folder, described in ``config["findings_sets"]``; the per-finding eval report and
the comparison are in ``metrics["findings"]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from annotator.selectors import findings_targets
from annotator.models import LabelSet, Project, Scan
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion
from ml_backend.services.artifacts import checkpoint_path
from ml_backend.services.inference import vectors_for

__all__ = ["FindingsScorer", "findings_head", "findings_predictions", "findings_proba",
           "findings_scorer", "mean_cardinality",
           "fit_findings_sets", "save_findings_heads"]

# Thresholds: the F1-optimal point on the eval split needs this many eval positives of the
# finding; below, the finding keeps 0.5 on its calibrated probability. A finding whose head
# is constant (never seen present, or never absent) is never preselected
# (``metrics.findings.NEVER``, above any probability).
MIN_THRESHOLD_POSITIVES = 3
NO_THRESHOLD = "not enough positives to choose a threshold"


def mean_cardinality(targets: np.ndarray) -> float | None:
    """The labelled scans' mean number of findings present (unknown answers count as not
    present), what the label-cardinality strategy departs from; None without a scan."""
    targets = np.asarray(targets, dtype=np.float64)
    if not len(targets):
        return None
    return float((targets == 1).sum(axis=1).mean())


def _multi_sets(project) -> list[LabelSet]:
    return list(project.label_sets.filter(kind=LabelSet.Kind.MULTI).order_by("order", "pk"))


def fit_findings_sets(project, encoder: ModelVersion, *, seed: int = 0, report=None,
                      skip=frozenset()) -> list[dict]:
    """Fit every findings set that has answers on pool scans (at least one finding seen
    present and absent), but the sets in ``skip``. Returns one entry per fitted set:
    ``label_set``, ``head``, ``config`` (saved with the version), ``eval`` (targets, scans)
    and ``report``."""
    from ml_backend.active.findings import fit_findings_head
    from ml_backend.metrics.findings import NEVER, uncertain_policy

    fitted = []
    for label_set in _multi_sets(project):
        if label_set.pk in skip:
            continue
        scans, findings, raw = findings_targets(label_set, split="pool")
        if not scans:
            continue
        targets = uncertain_policy(raw, label_set.uncertain_policy)
        learnable = [f.name for i, f in enumerate(findings)
                     if np.nansum(targets[:, i] == 1) and np.nansum(targets[:, i] == 0)]
        if not learnable:
            if report is not None:
                report.log(f"{label_set.name}: no finding seen both present and absent yet")
            continue
        ids = np.array([f.pk for f in findings])
        head, details = fit_findings_head(vectors_for(encoder, scans), targets, ids, seed=seed)
        constant = np.array([d["calibration"] == "constant" for d in details["findings"]])
        head.thresholds = np.where(constant, NEVER, head.thresholds)   # until eval says more
        eval_scans, _, eval_raw = findings_targets(label_set, split="eval")
        eval_targets = uncertain_policy(eval_raw, "ignore")    # uncertain never scores a model
        names = [f.name for f in findings]
        result = None
        if eval_scans:
            head.thresholds, result = eval_thresholds(
                label_set, eval_targets, head.predict_proba(vectors_for(encoder, eval_scans)),
                names)
        config = {"id": label_set.pk, "name": label_set.name, "head": f"findings-{label_set.pk}.npz",
                  "findings": [{"id": f.pk, "name": f.name} for f in findings],
                  "uncertain_policy": label_set.uncertain_policy,
                  "num_scans": len(scans), "learnable": learnable,
                  "mean_cardinality": mean_cardinality(targets),
                  "thresholds": {n: float(t) for n, t in zip(names, head.thresholds)},
                  "threshold_rule": (
                      "F1-optimal" if label_set.threshold_rule == "f1" else
                      f"the highest with sensitivity >= {label_set.target_sensitivity:g}")
                  + f" on the eval split (findings with >= {MIN_THRESHOLD_POSITIVES} eval "
                    "positives), else 0.5; a finding whose head is constant (never seen "
                    "present, or never absent), or (F1 rule) whose threshold picks eval "
                    "scans no richer in it than its prevalence (95% Wilson bound), is never "
                    "preselected",
                  "fit": details["findings"]}
        fitted.append({"label_set": label_set, "head": head, "config": config,
                       "eval": (eval_scans, eval_targets), "report": result})
        if report is not None:
            macro = result["macro_auc"] if result else None
            report.log(f"{label_set.name}: findings heads on {len(scans)} scans, "
                       f"{len(learnable)} of {len(findings)} findings learnable; eval macro AUC "
                       + (f"{macro:.3f}" if macro is not None else "n/a"))
    return fitted


def eval_thresholds(label_set: LabelSet, eval_targets: np.ndarray, proba: np.ndarray,
                    names: list[str]) -> tuple[np.ndarray, dict]:
    """A findings model's thresholds, chosen on the labeled eval scans by the set's rule (F1,
    or its target sensitivity), 0.5 for a finding with too few eval positives, and
    ``NEVER`` (above any probability: never preselected) for a finding whose probability is
    the same on every scan (a constant head, which F1 would otherwise set at that very
    probability: "present" on every scan) or whose chosen threshold picks scans no richer in
    the finding than the eval split (``preselection_evidence``: a weakly learned head's
    F1-best point marks nearly every scan present); and the per-finding report at those
    thresholds, each finding's ``threshold_note`` saying when the threshold was not chosen.
    Heads and networks alike."""
    from ml_backend.metrics.findings import (NEVER, choose_thresholds, findings_report,
                                             preselection_evidence)

    positives = np.nansum(eval_targets == 1, axis=0).astype(int)
    enough = positives >= MIN_THRESHOLD_POSITIVES
    target = min(max(float(label_set.target_sensitivity), 0.01), 1.0)
    chosen = choose_thresholds(eval_targets, proba, method=label_set.threshold_rule,
                               target_sensitivity=target, never=NEVER)
    constant = chosen >= NEVER
    thresholds = np.where(constant, NEVER, np.where(enough, chosen, 0.5))
    evidence = preselection_evidence(eval_targets, proba, thresholds)
    weak = np.array([bool(enough[f] and not constant[f] and e is not None
                          and not e["enriched"]) for f, e in enumerate(evidence)])
    # the F1 rule asks for a balanced decision: one no better than chance is none. The
    # target-sensitivity rule is the team's explicit choice of sensitivity over PPV: its
    # threshold stands, and the report says what its preselection is worth.
    chance = weak & (label_set.threshold_rule == "f1")
    thresholds = np.where(chance, NEVER, thresholds)
    report = findings_report(eval_targets, proba, names, thresholds=thresholds)
    for f, name in enumerate(names):
        if constant[f]:
            note = (f"{NO_THRESHOLD}: the model gives every scan the same probability (it "
                    "has not seen this finding both present and absent), so it is never "
                    "preselected")
        elif chance[f]:
            e = evidence[f]
            note = (f"not preselected: at its F1-best threshold "
                    f"({chosen[f]:.3f}) the model marks {e['flagged']} eval scans present, "
                    f"{e['right']} rightly (PPV {e['ppv'] or 0:.2f}, 95% lower bound "
                    f"{e['ppv_low']:.2f}), no better than the finding's prevalence "
                    f"({e['prevalence']:.2f}): never preselected until labels teach it more")
        elif weak[f]:
            e = evidence[f]
            report["per_finding"][name]["preselection_note"] = (
                f"at the target sensitivity the model marks {e['flagged']} eval scans "
                f"present, {e['right']} rightly (PPV {e['ppv'] or 0:.2f}, 95% lower bound "
                f"{e['ppv_low']:.2f}): no better than the finding's prevalence "
                f"({e['prevalence']:.2f}), so its preselection tells few scans apart")
            continue
        elif not enough[f]:
            note = (f"{NO_THRESHOLD} ({positives[f]} eval positives, "
                    f"{MIN_THRESHOLD_POSITIVES} needed): 0.5 on the calibrated probability")
        else:
            continue
        report["per_finding"][name]["threshold_note"] = note
    return thresholds, report


def save_findings_heads(model: ModelVersion, fitted: list[dict]) -> None:
    """Save each fitted set's heads in the version's folder (a set scored by a findings
    network has its network file there instead)."""
    for entry in fitted:
        if entry.get("head") is not None:
            entry["head"].save(checkpoint_path(model, entry["config"]["head"]))


def findings_head(model: ModelVersion | None, label_set_id: int):
    """The version's findings head for a set, or None."""
    from ml_backend.active.findings import FindingsHead

    if model is None:
        return None
    for entry in (model.config or {}).get("findings_sets", []):
        if entry["id"] == label_set_id and "head" in entry:
            path = Path(checkpoint_path(model, entry["head"]))
            return FindingsHead.load(path) if path.exists() else None
    return None


class FindingsScorer:
    """What a version knows of one findings set, whatever it is (refit heads on embeddings,
    or a fine-tuned network): ``finding_ids``, ``thresholds`` and ``predict(scans)`` →
    ``(N, F)`` probabilities in ``finding_ids`` order."""

    def __init__(self, finding_ids, thresholds, predict, mean_cardinality=None):
        self.finding_ids = np.asarray(finding_ids)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.predict = predict
        # the labelled scans' mean number of findings (label-cardinality strategy); None
        # for a version saved before it was recorded
        self.mean_cardinality = mean_cardinality


def findings_scorer(model: ModelVersion | None, label_set_id: int) -> FindingsScorer | None:
    """The version's scorer for a findings set, or None when it has none."""
    if model is None:
        return None
    entry = next((e for e in (model.config or {}).get("findings_sets", [])
                  if e["id"] == label_set_id), None)
    if entry is None:
        return None
    if "net" in entry:                     # a fine-tuned findings network
        from ml_backend.services.artifacts import images_for
        from ml_backend.ssl.findings import predict_findings
        from ml_backend.ssl.train import load_classifier

        path = Path(checkpoint_path(model, entry["net"]))
        if not path.exists():
            return None
        network, pconfig = load_classifier(path)
        ids = [f["id"] for f in entry["findings"]]
        thresholds = [entry["thresholds"].get(f["name"], 0.5) for f in entry["findings"]]
        return FindingsScorer(ids, thresholds, lambda scans: predict_findings(
            network, images_for(scans, pconfig.image_size, pconfig.channels), pconfig),
            entry.get("mean_cardinality"))
    head = findings_head(model, label_set_id)
    if head is None:
        return None
    encoder = model.parent
    if encoder is None:
        raise TrainingError(f"{model.version} has no parent encoder")

    def predict(scans: list[Scan]) -> np.ndarray:
        try:
            vectors = vectors_for(encoder, scans)
        except TrainingError:            # a scan imported since the last embed
            from ml_backend.services.inference import embed_images

            vectors = embed_images(encoder, [s.preview.path for s in scans])
        return head.predict_proba(vectors)
    return FindingsScorer(head.finding_ids, head.thresholds, predict,
                          entry.get("mean_cardinality"))


def findings_proba(model: ModelVersion, label_set: LabelSet, scans: list[Scan],
                   finding_ids: list[int]) -> np.ndarray | None:
    """``(N, len(finding_ids))`` calibrated probabilities from the version for the set (NaN
    columns for findings it does not know), or None when it has nothing for the set."""
    scorer = findings_scorer(model, label_set.pk)
    if scorer is None:
        return None
    proba = scorer.predict(scans)
    column = {int(i): c for c, i in enumerate(scorer.finding_ids)}
    out = np.full((len(scans), len(finding_ids)), np.nan)
    for j, fid in enumerate(finding_ids):
        if fid in column:
            out[:, j] = proba[:, column[fid]]
    return out


def findings_predictions(model: ModelVersion | None, scans: list[Scan]
                         ) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
    """Per scan of a findings set: ``({finding name: probability}, {finding name: threshold})``
    from the version, scored in one batch per set. Scans of single-label sets, and sets the
    version has nothing for, are left out; a set that cannot be scored raises."""
    from annotator.models import LabelClass

    out: dict[int, tuple[dict[str, float], dict[str, float]]] = {}
    by_set: dict[int, list[Scan]] = {}
    for scan in scans:
        if scan.label_set_id is not None and scan.label_set.is_multi:
            by_set.setdefault(scan.label_set_id, []).append(scan)
    for set_id, members in by_set.items():
        scorer = findings_scorer(model, set_id)
        if scorer is None:
            continue
        proba = scorer.predict(members)
        names = dict(LabelClass.objects.filter(pk__in=[int(i) for i in scorer.finding_ids])
                     .values_list("pk", "name"))
        thresholds = {names[int(i)]: float(t)
                      for i, t in zip(scorer.finding_ids, scorer.thresholds) if int(i) in names}
        for scan, row in zip(members, proba):
            out[scan.pk] = ({names[int(i)]: float(p) for i, p in zip(scorer.finding_ids, row)
                             if int(i) in names}, thresholds)
    return out


def findings_gate(candidate: ModelVersion, fitted: list[dict], active: ModelVersion | None
                  ) -> tuple[bool, str, dict]:
    """Per set, the candidate and the active version on the same eval scans
    (``metrics.findings.compare_findings``): the candidate is held back when a paired
    bootstrap says the macro AUC, or a finding with enough eval positives, dropped beyond the
    project's gate tolerance; a finding the active version knew nothing of (a constant
    head) is new, not a bar."""
    from ml_backend.metrics.findings import compare_findings

    tolerance = float(Project.objects.filter(pk=candidate.project_id)
                      .values_list("gate_tolerance", flat=True).first() or 0.0)
    results, held = {}, []
    for entry in fitted:
        label_set, (scans, targets) = entry["label_set"], entry["eval"]
        names = [f["name"] for f in entry["config"]["findings"]]
        ids = [f["id"] for f in entry["config"]["findings"]]
        if not scans:
            results[label_set.name] = {"note": "no labeled eval scans: not compared"}
            continue
        try:
            active_proba = (findings_proba(active, label_set, scans, ids)
                            if active is not None else None)
        except (TrainingError, OSError, ValueError) as exc:
            results[label_set.name] = {"note": f"the active version cannot be scored ({exc})"}
            continue
        if active_proba is None:
            results[label_set.name] = {"note": "the active version has no findings head for "
                                               "this set: newly learned"}
            continue
        candidate_proba = (entry["head"].predict_proba(vectors_for(candidate.parent, scans))
                           if entry.get("head") is not None else entry["predict"](scans))
        comparison = compare_findings(targets, candidate_proba, active_proba, names,
                                      tolerance=tolerance)
        results[label_set.name] = comparison
        macro = comparison["macro_auc"]
        if macro["regression"]:
            held.append(f"{label_set.name}: macro AUC over {macro['findings']} findings "
                        f"{macro['delta']:+.3f} (95% bound {macro['upper']:+.3f})")
        held += [f"{label_set.name}: {name} {comparison['per_finding'][name]['delta']:+.3f} "
                 f"(95% bound {comparison['per_finding'][name]['upper']:+.3f})"
                 for name in comparison["regressed"]]
    if held:
        return False, (f"held back: AUC dropped beyond the tolerance ({tolerance:g}, paired "
                       "bootstrap on the eval scans) on " + "; ".join(held)), results
    return True, "", results
