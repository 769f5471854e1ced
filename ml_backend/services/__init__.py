"""The ML adapter's services, by concern (see docs/ARCHITECTURE.md):

- ``runs``: create / claim / execute / abandon training runs; the one refit trigger.
- ``training``: the run handlers (pretrain, embed, refit, fine-tune, distill).
- ``versions``: evaluate, gate, activate / promote, pool predictions.
- ``inference``: the one bounded cache of loaded models and indexes; predictors, Grad-CAM,
  classifying an uploaded image.
- ``embeddings``: similar scans, class candidates, novelty, clusters (the label-free view).
- ``queries``: query rounds and the label-quality check.
- ``artifacts``: where a version's files live.

``from ml_backend import services as ml; ml.similar_scans(...)`` works for every public
name below; the submodule is imported on first use, so importing this package costs
nothing (torch is loaded only by the code that runs a network).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "runs": ["training_run_create", "training_run_start", "training_run_claim", "training_run_execute",
             "runs_abandon_expired", "retrain_start", "refit_start_if_due", "refit_busy",
             "RunReporter", "LEASE"],
    "training": ["embed_with", "embed_part", "HANDLERS"],
    "versions": ["model_version_activate", "model_version_promote", "evaluate", "gate",
                 "predictions_refresh", "publish", "eval_set", "gate_verdict"],
    "inference": ["cache", "predictor_for", "version_heads", "vectors_for", "head_inputs_for",
                  "embedding_table",
                  "vector_index", "encoder_network", "classifier_network", "allowed_classes",
                  "scan_gradcam", "classify_image", "Predictor"],
    "embeddings": ["similar_scans", "class_candidates", "scan_novelty", "novelty_of_vectors",
                   "import_novelty_check", "scan_clusters", "cluster_vectors"],
    "queries": ["query_round_create", "label_quality_check"],
    "artifacts": ["embeddings_paths", "checkpoint_path", "images_for",
                  "model_artifacts_remove"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

# the domain exceptions, re-exported for callers that catch them here
from ml_backend.errors import (AlreadyActive, ModelUnavailable, RetrainSkipped,  # noqa: E402
                               RunBusy, TrainingError)

__all__ = sorted(_WHERE) + ["AlreadyActive", "ModelUnavailable", "RetrainSkipped", "RunBusy",
                            "TrainingError"]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
