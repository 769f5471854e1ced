"""The small domain exceptions the web app catches.

A leaf module: it imports nothing (no Django, no torch), so the pure core raises these and a
view can catch them without loading a model library.
"""


class TrainingError(Exception):
    """Training or inference cannot go on: no model yet, scans not embedded, a non-finite
    loss, bad data, an incompatible checkpoint. The message says what to do."""


class ModelUnavailable(TrainingError):
    """The project's model could not answer for a scan (missing or unreadable artifacts);
    the message is shown to the user in words, the cause is logged."""


class AlreadyActive(TrainingError):
    """A version asked to be made active already is (a double click, a resubmitted form):
    nothing was changed; the message says so."""


class RetrainSkipped(Exception):
    """A retrain or refit was not started (one is running, or too few new labels); the
    message says why."""


class RunBusy(Exception):
    """A command's run was not started: one of its kind is queued or running for the project
    (the message names it)."""
