"""The shape of a prediction in Label Studio's JSON, shared by the ML-backend endpoints
(``ml_backend/views.py``) and the sync that pushes predictions with tasks
(``annotator/label_studio``, which builds the labeling config with these names).

A single-label set answers through one single-choice ``diagnosis`` control. A findings set
(several findings per scan) answers through two multiple-choice controls on the same image:
``findings`` (the findings present, or "No finding") and ``uncertain`` (the findings the reader
is unsure of); a finding in neither is absent."""

import math

FROM_NAME, TO_NAME = "diagnosis", "image"
FINDINGS_NAME, UNCERTAIN_NAME = "findings", "uncertain"
NO_FINDING = "No finding"


def prediction_json(model_version: str, class_name: str, confidence: float) -> dict:
    """One single-choice prediction; ``score`` is the confidence (Label Studio orders tasks
    by it, least confident first)."""
    return {"model_version": model_version, "score": round(float(confidence), 6),
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": [class_name]}}]}


def findings_confidence(scores: dict[str, float], thresholds: dict[str, float]) -> float:
    """How sure the model is of a scan's whole findings answer: one minus the largest binary
    entropy (in bits) over its findings, each probability taken relative to its threshold
    (a finding at its threshold is the least sure). 1 = sure of every finding."""
    worst = 0.0
    for name, p in scores.items():
        t = min(max(float(thresholds.get(name, 0.5)), 1e-6), 1 - 1e-6)
        # map p so that the threshold sits at 0.5: below it scaled into [0, .5), above (.5, 1]
        q = 0.5 * p / t if p < t else 0.5 + 0.5 * (p - t) / (1 - t)
        q = min(max(q, 1e-9), 1 - 1e-9)
        worst = max(worst, -(q * math.log2(q) + (1 - q) * math.log2(1 - q)))
    return 1.0 - worst


def findings_prediction_json(model_version: str, scores: dict[str, float],
                             thresholds: dict[str, float]) -> dict:
    """A findings prediction: the findings at or above their saved threshold preselected
    ("No finding" when none is), every finding's probability and threshold kept beside the
    choices (``scores`` / ``thresholds``, which Label Studio stores with the result), and
    ``score`` = :func:`findings_confidence` for the least-confident-first order."""
    present = [name for name, p in scores.items() if p >= thresholds.get(name, 0.5)]
    return {"model_version": model_version,
            "score": round(findings_confidence(scores, thresholds), 6),
            "result": [{"from_name": FINDINGS_NAME, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": present or [NO_FINDING]},
                        "scores": {k: round(float(v), 4) for k, v in scores.items()},
                        "thresholds": {k: round(float(v), 4) for k, v in thresholds.items()}}]}
