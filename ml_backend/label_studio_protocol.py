"""The shape of a prediction in Label Studio's JSON, shared by the ML-backend endpoints
(``ml_backend/views.py``) and the sync that pushes predictions with tasks
(``annotator/label_studio.py``, which builds the labeling config with these names)."""

FROM_NAME, TO_NAME = "diagnosis", "image"


def prediction_json(model_version: str, class_name: str, confidence: float) -> dict:
    """One single-choice prediction; ``score`` is the confidence (Label Studio orders tasks
    by it, least confident first)."""
    return {"model_version": model_version, "score": round(float(confidence), 6),
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": [class_name]}}]}
