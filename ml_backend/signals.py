"""What the ML adapter tells the rest of the site, without importing it.

``ml_backend`` never imports the web app's behaviour (audit, Label Studio, tasks); the app
that owns a reaction connects a receiver in its ``AppConfig.ready``:

- ``model_activated`` — a version became the project's active encoder or classifier, sent
  inside the transaction that activated it (a receiver that writes, e.g. the audit row,
  commits or rolls back with it). Arguments: ``model``, ``project``, ``previous`` (version
  name or None), ``actor`` (None: the gate or the system), ``rolled_back`` (bool).
- ``model_not_activated`` — a version a run made passed its gate but was kept, not
  activated, because a person chose the active one while that run ran (sent inside the
  transaction). Arguments: ``model`` (its ``status_reason`` says why), ``project``,
  ``chosen`` (the version the person chose), ``chosen_by`` (their username), ``active``
  (the version active now, or None).
- ``classifier_published`` — the active classifier's pool predictions were refreshed (or
  could not be): consumers of predictions follow (Label Studio). Arguments: ``model``,
  ``project_id``.
- ``round_created`` — a new query round (the worklist's next scans) exists, sent once its
  transaction committed: Label Studio gets its tasks. Arguments: ``query_round``,
  ``project_id``.
"""

from django.dispatch import Signal

model_activated = Signal()
model_not_activated = Signal()
classifier_published = Signal()
round_created = Signal()
