"""The labeling loop's reads and writes: the current worklist, short leases so two readers
are not served the same scan, and recording an answer (``answer_submit`` parses the label
page's request and calls ``annotation_create``). What the label page shows for a scan is
``annotator/label_page.py``.

Views call these; they never touch the ORM for the loop themselves.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.http import Http404
from django.utils import timezone

from annotator.models import Annotation, LabelClass, Membership, Project, Scan, ScanLease
from annotator.selectors import (
    eval_answer_refusal,
    reader_key,
    reads_blind,
    visible_label_names,
)
from annotator.services import AnnotationError, annotation_create, answer_outcome_conflicts
from medsite import jsonbody
from medsite.when import in_words
from ml_backend.models import ModelVersion, Prediction, QueryItem, QueryRound

logger = logging.getLogger(__name__)

REVIEW_STRATEGY = "label_review"
MAX_DURATION_MS = 6 * 60 * 60 * 1000
# The same answer again by the same reader on the same scan within this time, with no
# submission id (a double click, a script retrying), is stored once.
REPEAT_WINDOW = timedelta(minutes=10)
# The label page's script reports how long the scan's image was on screen before the answer
# (``duration_ms``). Below this no one has read the scan (a choice reaction alone takes
# longer): a double-pressed key. Such an answer is stored (it is what was pressed, and a
# script may answer that fast), but never in silence: the page and the log say so
# (``reading_too_quick``) and the reader can undo it.
MIN_READING_MS = 150


# --- rounds and leases -----------------------------------------------------------------


def current_round(project: Project):
    """The newest active-learning round (label-quality review rounds are the reviewer's)."""
    return (QueryRound.objects.filter(project=project).exclude(strategy=REVIEW_STRATEGY)
            .order_by("-created_at", "-pk").first())


class AnswerRefused(AnnotationError):
    """The reader may not answer this scan at all (not a mistake in the answer): 403."""

    status = 403


class SubmissionConflict(AnnotationError):
    """The submission id names an answer already stored on this scan that says something
    else: a replay must repeat the answer, a changed answer needs a new id (409). ``stored``
    is that answer."""

    status = 409
    code = "submission_conflict"

    def __init__(self, message: str, stored: Annotation):
        super().__init__(message)
        self.stored = stored


def lease_acquire(*, scan: Scan, user) -> bool:
    """Hold ``scan`` for ``user`` for LABEL_LEASE_SECONDS. False if another reader holds it.

    A conditional update takes over an expired lease or renews one's own; otherwise the
    unique row is created, and a concurrent creator loses on the constraint. Both are
    atomic on SQLite and PostgreSQL. A reader holds at most LABEL_LEASES_PER_READER scans
    of a project: taking one releases their oldest beyond that (``_leases_trim``).

    Only a member (or a superuser) takes a lease: their membership row is locked while the
    lease is written, so a removal at the same moment either comes first (Http404 here, as
    for any non-member) or waits, then releases this lease too
    (``auth.release_leases_of_removed_member``): a request that passed its membership check
    just before the removal holds nothing after it.
    """
    now = timezone.now()
    expires = now + timedelta(seconds=settings.LABEL_LEASE_SECONDS)
    with transaction.atomic():
        if not user.is_superuser and not list(
                Membership.objects.select_for_update()
                .filter(project_id=scan.project_id, user=user).values_list("pk", flat=True)):
            # as the views answer a non-member (``auth.login_required_json``: NOT_A_MEMBER)
            raise Http404("not a member of this project")
        taken = (ScanLease.objects.filter(scan_id=scan.pk)
                 .filter(Q(user=user) | Q(expires_at__lte=now))
                 .update(user=user, expires_at=expires))
        if not taken:
            try:
                with transaction.atomic():
                    # by id: a failed create must not leave this user's unsaved lease cached
                    # on ``scan`` (``scan.lease``) for the caller to read as the holder
                    ScanLease.objects.create(project_id=scan.project_id, scan_id=scan.pk,
                                             user=user, expires_at=expires)
            except IntegrityError:
                return False
        _leases_trim(project_id=scan.project_id, user=user, keep=scan.pk)
    return True


def _leases_trim(*, project_id: int, user, keep: int) -> None:
    """Release ``user``'s leases in the project beyond LABEL_LEASES_PER_READER, oldest taken
    first (a lease's expiry is when it was taken or renewed, plus the lease time), never
    ``keep`` (the scan just taken)."""
    others = (ScanLease.objects.filter(project_id=project_id, user=user).exclude(scan_id=keep)
              .order_by("-expires_at", "-pk").values_list("pk", flat=True))
    beyond = list(others[max(0, settings.LABEL_LEASES_PER_READER - 1):])
    if beyond:
        ScanLease.objects.filter(pk__in=beyond).delete()


def lease_holder(*, scan: Scan) -> str | None:
    """Who holds ``scan`` now (their username), read from the database; None when free."""
    return (ScanLease.objects.filter(scan_id=scan.pk, expires_at__gt=timezone.now())
            .values_list("user__username", flat=True).first())


def lease_release(*, scan: Scan, user) -> None:
    ScanLease.objects.filter(scan=scan, user=user).delete()


def leases_release_member(*, project_id: int, user_id: int) -> int:
    """Release every lease the user holds in the project (they were removed from it); how
    many there were."""
    released, _ = ScanLease.objects.filter(project_id=project_id, user_id=user_id).delete()
    return released


def nothing_left_words(project: Project, user) -> str:
    """Why ``lease_next`` found no scan for ``user``: the round's scans left for them are all
    held by other readers (for now), or there is nothing left to read."""
    query_round = current_round(project)
    held = 0
    if query_round is not None:
        scan_ids = list(query_round.items.filter(scan__split="pool", scan__quarantined=False)
                        .values_list("scan_id", flat=True))
        labeled, mine = _done_for(project, user, scan_ids)
        held = len(set(_held_by_others(project, user)) & (set(scan_ids) - labeled - mine))
    if held:
        minutes = max(1, round(settings.LABEL_LEASE_SECONDS / 60))
        return (f"No scan is free for you right now: the {held} scan{'s' if held != 1 else ''} "
                f"left for you in this round {'are' if held != 1 else 'is'} held by other "
                f"readers ({held} scan{'s' if held != 1 else ''} leased). A lease ends when "
                f"they answer or after {minutes} minute{'s' if minutes != 1 else ''}: try "
                "again shortly.")
    # pool scans nobody has labeled and this reader has not answered: then a round could not
    # be made (lease_next_or_new_round), and the reader is told why, not "nothing left"
    left = (Scan.objects.filter(project=project, split="pool", quarantined=False)
            .exclude(annotations__outcome__in=Annotation.LABELLING)
            .exclude(annotations__reader=user).count())
    if left:
        from ml_backend.services.queries import query_refusal

        why = query_refusal(project) or (
            f"{left} pool scan{'s' if left != 1 else ''} {'are' if left != 1 else 'is'} "
            "unlabeled, but choosing the next of them failed (the server log says why): "
            "an admin can try \"Choose the next scans\" on the worklist")
        return f"No round of scans to label could be made: {why}."
    return "No unlabeled scans left for you: every pool scan is labeled or answered by you."


def _held_by_others(project: Project, user) -> dict[int, str]:
    return dict(ScanLease.objects.filter(project=project, expires_at__gt=timezone.now())
                .exclude(user=user).values_list("scan_id", "user__username"))


def readings(project: Project, scan_ids=None) -> dict[int, set[str]]:
    """Who has read each scan (a label or findings answer; adjudications are not readings):
    ``{scan id: {reader key}}``."""
    rows = Annotation.objects.filter(outcome__in=Annotation.LABELLING).order_by()
    rows = (rows.filter(project=project) if scan_ids is None
            else rows.filter(scan_id__in=list(scan_ids), project=project))
    out: dict[int, set[str]] = {}
    for scan_id, reader_id, source, pk in rows.exclude(
            source=Annotation.Source.ADJUDICATION).values_list(
            "scan_id", "reader_id", "source", "pk"):
        out.setdefault(scan_id, set()).add(reader_key(reader_id, source, pk))
    return out


def _done_for(project: Project, user, scan_ids: list[int]) -> tuple[set[int], set[int]]:
    """Among ``scan_ids`` (a round's): (scans read by as many readers as the project asks
    for, scans this user answered in any way). Only those scans' answers are read: a
    project's whole history of answers grows without bound (issue 21)."""
    needed = max(1, project.readers_per_scan)
    done = {scan_id for scan_id, who in readings(project, scan_ids).items()
            if len(who) >= needed}
    mine = set(Annotation.objects.filter(scan_id__in=scan_ids, reader=user)
               .order_by().values_list("scan_id", flat=True))
    return done, mine


def second_reading(project: Project, scan: Scan, user) -> bool:
    """Whether ``user`` reads ``scan`` after someone else did, or as a reviewer: then, with
    ``blind_second_readers``, the model and the other readings are hidden from them."""
    if not project.blind_second_readers:
        return False
    if project.role_of(user) == "reviewer":
        return True
    return (Annotation.objects.filter(scan=scan, outcome__in=Annotation.LABELLING)
            .exclude(reader=user).exclude(source=Annotation.Source.IMPORT).exists())


def _round_items(query_round):
    """A round's items in rank order, eval scans left out: eval is never queried, so a scan
    moved to eval after the round was chosen is not served (nor shown) any more."""
    return list(query_round.items.filter(scan__split="pool").select_related("scan")
                .order_by("rank"))


def _open_items(project: Project, user):
    query_round = current_round(project)
    if query_round is None:
        return []
    items = _round_items(query_round)
    labeled, mine = _done_for(project, user, [i.scan_id for i in items])
    held = _held_by_others(project, user)
    return [i for i in items if i.scan_id not in labeled and i.scan_id not in mine
            and i.scan_id not in held]


def peek_after(*, project: Project, user, scan: Scan) -> int | None:
    """The scan ``user`` will most likely be served after ``scan`` (not leased), so the page
    can preload its image while the reader looks at this one. Right after ``lease_next`` on
    the same project object (an answer serving the next scan) its list is reused."""
    known = getattr(project, "_open_items_for", None)
    items = known[1] if known and known[0] == user.pk else _open_items(project, user)
    for item in items:
        if item.scan_id != scan.pk:
            return item.scan_id
    return None


def lease_next(*, project: Project, user):
    """The next chosen scan for ``user`` in rank order, leased to them: not labeled yet, not
    answered by them, not held by another reader. Returns ``(scan, item)`` or ``None``."""
    open_items = _open_items(project, user)
    project._open_items_for = (user.pk, open_items)     # for peek_after in this request
    # a scan already leased to this user (a reload, a second tab) comes first
    own = set(ScanLease.objects.filter(project=project, user=user, expires_at__gt=timezone.now())
              .values_list("scan_id", flat=True))
    open_items.sort(key=lambda i: (i.scan_id not in own, i.rank))
    for item in open_items:
        if lease_acquire(scan=item.scan, user=user):
            return item.scan, item
    return None


def lease_next_or_new_round(*, project: Project, user):
    """``lease_next``; when the round has nothing left for ``user`` and unlabeled pool scans
    remain, the model chooses the next batch at once (as "Choose the next scans" on the
    worklist would) and the first of it is leased, so a reader who outpaces the refits keeps
    labeling instead of landing on an exhausted worklist. Returns ``(scan, item, new_round)``
    or ``None``."""
    found = lease_next(project=project, user=user)
    if found is not None:
        return (*found, False)
    from ml_backend import services as ml
    from ml_backend.errors import TrainingError

    with transaction.atomic():
        # one reader makes the round; the others wait for it here, then lease from it
        Project.objects.select_for_update(no_key=True).get(pk=project.pk)
        found = lease_next(project=project, user=user)
        if found is not None:
            return (*found, False)
        unlabeled = (Scan.objects.filter(project=project, split="pool", quarantined=False)
                     .exclude(annotations__outcome__in=Annotation.LABELLING).exists())
        if not unlabeled:
            return None
        try:        # nothing to choose: refused, never stored as an empty round
            ml.query_round_create(project=project, created_by=user, refuse_empty=True)
        except (TrainingError, ValueError) as exc:   # nothing_left_words says why
            logger.warning("no next round for %s: %s", project, exc)
            return None
    found = lease_next(project=project, user=user)
    return None if found is None else (*found, True)


# --- worklist --------------------------------------------------------------------------


def worklist(project: Project, user) -> dict:
    """The current round's scans in rank order with their state, and the progress numbers."""
    query_round = current_round(project)
    if query_round is None:
        return {"round": None, "rows": [], "progress": None}
    items = _round_items(query_round)
    scan_ids = [i.scan_id for i in items]
    answers: dict[int, list[Annotation]] = {}
    for a in (Annotation.objects.filter(scan_id__in=scan_ids)
              .select_related("label_class", "reader").order_by("created_at")):
        answers.setdefault(a.scan_id, []).append(a)
    held = dict(ScanLease.objects.filter(scan_id__in=scan_ids, expires_at__gt=timezone.now())
                .values_list("scan_id", "user__username"))
    predictions = {}
    if project.active_model_id:
        predictions = {p.scan_id: p for p in Prediction.objects.filter(
            model_version_id=project.active_model_id, scan_id__in=scan_ids
        ).select_related("predicted_class")}
    rows, labeled_count, mine = [], 0, 0
    blind = reads_blind(project, user)
    needed = max(1, project.readers_per_scan)
    read_by = readings(project, scan_ids)
    progress = round_progress(project, user, query_round, scan_ids, read_by=read_by)
    for item in items:
        scan_answers = answers.get(item.scan_id, [])
        if len(read_by.get(item.scan_id, ())) >= needed:
            state = "labeled"
            labeled_count += 1
        elif any(a.reader_id == user.pk for a in scan_answers):
            state = "answered"
        elif item.scan_id in held and held[item.scan_id] != user.get_username():
            state = "held"
        elif read_by.get(item.scan_id):
            state = "second"           # read, but by fewer readers than the project asks for
        else:
            state = "open"
        answered = any(a.reader_id == user.pk for a in scan_answers)
        mine += answered
        prediction, reason = predictions.get(item.scan_id), describe_reason(item.reason, item.score)
        hidden = 0
        if blind and not answered and read_by.get(item.scan_id):
            # read by someone else, not yet by this reader: no model, no other answers
            prediction, reason = None, blind_reason(reason)
            shown = [a for a in scan_answers if a.source == Annotation.Source.IMPORT]
            hidden, scan_answers = len(scan_answers) - len(shown), shown
        rows.append({"item": item, "scan": item.scan, "state": state, "answers": scan_answers,
                     "readings": len(read_by.get(item.scan_id, ())), "needed": needed,
                     "held_by": held.get(item.scan_id), "prediction": prediction,
                     "reason": reason, "hidden": hidden})
    if blind:           # the nearest labeled scans' labels: only answers this reader may see
        for row, reason in zip(rows, reasons_for_reader(project, user,
                                                        [r["reason"] for r in rows])):
            row["reason"] = reason
    return {"round": query_round, "rows": rows, "progress": progress}


def round_progress(project: Project, user, query_round, scan_ids: list[int] | None = None, *,
                   read_by: dict | None = None) -> dict:
    """The progress numbers of a round for ``user`` (the worklist's and the label page's),
    from counts alone: the label page asks on every answer."""
    if scan_ids is None:
        scan_ids = list(QueryItem.objects.filter(query_round_id=query_round.pk,
                                                 scan__split="pool")
                        .order_by("rank").values_list("scan_id", flat=True))
    needed = max(1, project.readers_per_scan)
    read_by = readings(project, scan_ids) if read_by is None else read_by
    labeled = sum(len(read_by.get(i, ())) >= needed for i in scan_ids)
    mine = Annotation.objects.filter(scan_id__in=scan_ids, reader=user).order_by().values(
        "scan_id").distinct().count()
    # the reader's own count runs across rounds: a refit that chooses the next round does
    # not reset what they have done
    counts = Annotation.objects.filter(project=project, outcome__in=Annotation.LABELLING
                                       ).aggregate(total=Count("pk"),
                                                   yours=Count("pk", filter=Q(reader=user)))
    return {"total": len(scan_ids), "labeled": labeled, "remaining": len(scan_ids) - labeled,
            "yours": mine, "yours_total": counts["yours"], "round_number": query_round.pk,
            "labels_in_project": counts["total"]}


def reasons_for_reader(project: Project, user, reasons: list[dict]) -> list[dict]:
    """``describe_reason`` outputs as ``user`` may see them: for a blind reader each nearest
    labeled scan keeps only a label from an answer they may see (their own, an import, any on
    a scan they have answered: ``selectors.answers_visible``), else none. The label stored
    with the round is whoever's answer was latest then."""
    if not reads_blind(project, user):
        return reasons
    ids = {n["scan"] for r in reasons for n in r.get("neighbours", ())}
    names = visible_label_names(project, user, ids) if ids else {}
    return [{**r, "neighbours": [{**n, "label": (names.get(n["scan"]) or [None])[0]}
                                 for n in r.get("neighbours", ())]} for r in reasons]


def blind_reason(reason: dict) -> dict:
    """A worklist reason as a blind second reader sees it: without other readers' labels
    (the nearest labeled scans') and without the model's view."""
    return {**reason, "words": "Chosen for another reading; the model's view is hidden.",
            "details": [], "neighbours": [{**n, "label": None} for n in reason["neighbours"]]}


def describe_reason(reason: dict, score: float | None = None) -> dict:
    """A query item's reason as short display strings (the UI's *why this scan*)."""
    reason = reason or {}
    parts = []
    if "entropy" in reason:
        parts.append(f"uncertainty {reason['entropy']:.2f} (entropy)")
    if "margin" in reason:
        parts.append(f"margin {reason['margin']:.2f}")
    if "confidence" in reason and "predicted" in reason:
        parts.append(f"model says {reason['predicted']} at {reason['confidence']:.0%}")
    if "cluster" in reason:
        size = f" of {reason['cluster_size']} scans" if "cluster_size" in reason else ""
        parts.append(f"cluster {reason['cluster']}{size}")
    if "typicality" in reason:
        parts.append(f"typicality {reason['typicality']:.2f}")
    if "distance_to_labeled" in reason:
        parts.append(f"distance to labeled {reason['distance_to_labeled']:.2f}")
    if reason.get("unsure"):
        parts.append("unsure about " + ", ".join(
            f"{u['name']} ({u['probability']:.0%})" for u in reason["unsure"]))
    return {"why": reason.get("why", ""), "details": parts, "words": plain_reason(reason),
            "score": None if score is None else round(float(score), 4),
            "neighbours": reason.get("neighbours", [])}


def plain_reason(reason: dict) -> str:
    """Why this scan, in a clinician's words (the numbers stay in ``details``, on hover)."""
    sentences = []
    why = reason.get("why", "")
    predicted, confidence = reason.get("predicted"), reason.get("confidence")
    second, second_p = reason.get("runner_up"), reason.get("runner_up_p")
    if why == "likely label error":
        sentences.append(f"Its label ({reason.get('given', '?')}) may be wrong: the model and "
                         "the scans most like it disagree with it.")
    elif reason.get("unsure"):
        names = [u["name"] for u in reason["unsure"]]
        sentences.append("The model is unsure whether this scan shows "
                         + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1
                            else names[0]) + ".")
    elif predicted is not None and confidence is not None:
        if second is not None and second_p is not None and confidence - second_p < 0.2:
            sentences.append(f"The model can't decide between {predicted} "
                             f"({confidence:.0%}) and {second} ({second_p:.0%}).")
        elif confidence < 0.6:
            sentences.append(f"The model is unsure: it leans to {predicted}, at only "
                             f"{confidence:.0%}.")
        else:
            sentences.append(f"The model says {predicted} ({confidence:.0%}); among the scans "
                             "left, this answer teaches it the most.")
    if why == "typical of its cluster":
        size = reason.get("cluster_size")
        sentences.append("A typical scan of a group of " + (f"{size} " if size else "")
                         + "similar scans: one answer here tells the model about all of them"
                         + (" (one of them is labeled already)."
                            if reason.get("labeled_in_cluster") else "."))
    elif why == "no model for its label set yet: unlike the other picks":
        sentences.append("No model for this scan's classes yet (its labels so far are all one "
                         "class): a scan unlike the other picks, to find the others.")
    elif why == "far from labeled scans":
        sentences.append("Few scans like this one have been labeled yet.")
    elif why == "uncertain, and unlike the other picks":
        sentences.append("It is also unlike the other scans chosen in this round.")
    elif why == "random":
        sentences.append("Picked at random: a check on what the model does not know it "
                         "gets wrong.")
    if not sentences:
        sentences.append(why.capitalize() + "." if why else "Chosen by the project's strategy.")
    return " ".join(sentences)


# --- answers ---------------------------------------------------------------------------


def _optional_float(data: dict, key: str, *, low: float | None = None,
                    high: float | None = None) -> float | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AnnotationError(f"{key} must be a number") from None
    if not math.isfinite(number) or (low is not None and number < low) or (
            high is not None and number > high):
        raise AnnotationError(f"{key} is out of range")
    return number


def _optional_int(data: dict, key: str) -> int | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    number = jsonbody.db_id(value)
    if number is None:
        raise AnnotationError(f"{key} must be a positive whole number (an id)")
    return number


def _optional_duration(data: dict) -> int | None:
    """``duration_ms``: the reading time in whole milliseconds, 0 or more (a number, or its
    digits as form text); a reading longer than MAX_DURATION_MS (a tab left open) is stored as
    MAX_DURATION_MS, a value beyond any clock (over ``jsonbody.MAX_ABS_NUMBER``) refused."""
    value = data.get("duration_ms")
    if value in (None, ""):
        return None
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 16:
        value = int(value.strip())
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not float(value).is_integer()
            or not 0 <= value <= jsonbody.MAX_ABS_NUMBER):
        raise AnnotationError("duration_ms must be the reading time in whole milliseconds "
                              f"(from 0 to {jsonbody.MAX_ABS_NUMBER:.0e}), not "
                              f"{str(value)[:40]!r}")
    return min(int(value), MAX_DURATION_MS)


def _shown_suggestion(project: Project, scan: Scan, data: dict):
    """The class the reader was shown as the model's suggestion (``shown_suggestion``), checked
    against what a suggestion can be: a class of the scan's own label set, made by a
    classifier of this project named in ``shown_model_version`` (the label page sends both).
    None when none was shown; AnnotationError otherwise — the audit trail must not record a
    suggestion no model could have made (a brain class on a chest film, no model at all)."""
    suggestion_id = _optional_int(data, "shown_suggestion")
    if suggestion_id is None:
        return None
    suggestion = (LabelClass.objects.filter(project=project, pk=suggestion_id)
                  .select_related("label_set").first())
    if suggestion is None:
        raise AnnotationError("the suggested class shown is not one of this project's")
    if scan.label_set_id is None or suggestion.label_set_id != scan.label_set_id:
        raise AnnotationError(
            f"the suggested class shown ({suggestion.name!r}) is not a class of this scan's "
            f"label set ({scan.label_set.name if scan.label_set_id else 'none'}): no model "
            "suggests it here")
    if not data.get("shown_model_version"):
        raise AnnotationError("a shown suggestion needs the model version that made it "
                              "(shown_model_version)")
    if not ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.CLASSIFIER,
                                       version=str(data["shown_model_version"])[:64]).exists():
        raise AnnotationError("the model version shown is not one of this project's "
                              "classifiers: only a classifier makes a suggestion")
    return suggestion


def answer_submit(*, project: Project, scan: Scan, user, data: dict) -> tuple[Annotation, bool]:
    """Record a reader's answer from the label page. Returns ``(annotation, created)``.

    ``data``: ``outcome`` (label / skip / unsure), ``class_id`` for a label, and what the
    reader was shown: ``shown_model_version`` (version name), ``shown_suggestion`` (class
    id), ``shown_confidence``, ``shown_acquisition_score``, ``query_round``, ``duration_ms``;
    ``submission_id`` makes a double submit or a retried request a no-op, and so does the
    same answer again within REPEAT_WINDOW without one (``_record_once``); the same id with
    another answer on the scan is refused (SubmissionConflict, 409, naming the stored one).
    Raises AnnotationError with a message for the reader (AnswerRefused, status 403, when
    they may not answer the scan at all: an eval scan and not a reviewer or admin).
    """
    if scan.project_id != project.pk:
        raise AnnotationError("this scan belongs to another project")
    refusal = eval_answer_refusal(project, scan, user)
    if refusal is not None:
        raise AnswerRefused(refusal)
    outcome = str(data.get("outcome") or Annotation.Outcome.LABEL)
    if outcome not in Annotation.Outcome.values:
        raise AnnotationError(f"unknown outcome {outcome!r}: use label, findings, skip or unsure")
    # a contradicting answer ({"outcome": "unsure", "class_id": 2}) is refused, never stored
    # with the field dropped (the API's rule: services.answer_outcome_conflicts)
    conflicts = answer_outcome_conflicts(
        outcome=outcome, class_id=data.get("class_id"), findings=data.get("findings"),
        no_finding=data.get("no_finding"))
    if conflicts:
        raise AnnotationError(" ".join(conflicts.values()))
    if outcome == Annotation.Outcome.FINDINGS:
        return _findings_submit(project=project, scan=scan, user=user, data=data)
    label_class = None
    class_id = _optional_int(data, "class_id")
    if outcome == Annotation.Outcome.LABEL:
        if class_id is None:
            raise AnnotationError("choose a class (or skip / unsure)")
        label_class = LabelClass.objects.filter(project=project, pk=class_id).first()
        if label_class is None:
            raise AnnotationError(f"unknown class {class_id} for this project; reload the page")
        if label_class.label_set_id != scan.label_set_id:
            raise AnnotationError(f"{label_class.name!r} does not apply to this scan "
                                  f"(its label set is "
                                  f"{scan.label_set.name if scan.label_set_id else 'none'})")
    shown_suggestion = _shown_suggestion(project, scan, data)
    return _record_once(project=project, scan=scan, user=user, data=data,
                        create=lambda **shown: annotation_create(
                            scan=scan, reader=user, label_class=label_class, outcome=outcome,
                            shown_suggestion=shown_suggestion,
                            shown_confidence=_optional_float(data, "shown_confidence",
                                                             low=0, high=1),
                            # the label page shows a suggestion but never preselects a class
                            shown_preselected=False, **shown))


def _findings_submit(*, project: Project, scan: Scan, user, data: dict
                     ) -> tuple[Annotation, bool]:
    """A findings answer from the label page: ``findings`` ({finding id: present / absent /
    uncertain}), or ``no_finding``; ``shown_scores`` ({finding id: probability}) with the
    rest of what the reader was shown, as for a class."""
    from annotator.findings import findings_answer_create

    raw = data.get("findings") or {}
    if not isinstance(raw, dict):
        raise AnnotationError("findings must map finding ids to present, absent or uncertain")
    no_finding = data.get("no_finding", False)
    if no_finding is None:
        no_finding = False
    if not isinstance(no_finding, bool):     # "false" is a true string: only JSON true/false
        raise AnnotationError(f"no_finding must be true or false (JSON), not "
                              f"{str(no_finding)[:40]!r}")
    try:
        states = _by_finding_id(raw, "findings", str)
        shown = data.get("shown_scores") or {}
        shown = _by_finding_id(shown, "shown_scores", float) if isinstance(shown, dict) else {}
    except (TypeError, ValueError):
        raise AnnotationError("finding ids are numbers and scores are probabilities") from None
    return _record_once(project=project, scan=scan, user=user, data=data,
                        create=lambda **common: findings_answer_create(
                            scan=scan, reader=user, states=states,
                            no_finding=no_finding,
                            shown_scores=shown or None,
                            # findings at or above their thresholds start ticked
                            shown_preselected=bool(shown), **common))


def _by_finding_id(raw: dict, field: str, value) -> dict[int, object]:
    """``{finding id: value}`` from a JSON object's keys; two keys naming one finding
    (``"13"`` and ``"013"``) are refused, never one silently kept."""
    out: dict[int, object] = {}
    for key, item in raw.items():
        finding = int(key)
        if finding in out:
            raise AnnotationError(f"{field} names finding {finding} twice ({key!r} and an "
                                  "earlier key): give each finding once")
        out[finding] = value(item)
    return out


class _Repeat(Exception):
    """The answer just made repeats ``previous``: roll it back and return that one."""

    def __init__(self, previous: Annotation):
        super().__init__(previous.pk)
        self.previous = previous


def _findings_of(annotation: Annotation) -> dict[int, str]:
    return dict(annotation.findings.values_list("finding_id", "state"))


def _same_answer(a: Annotation, b: Annotation) -> bool:
    """Whether ``b`` says what ``a`` said: outcome, class, findings and note."""
    return ((a.outcome, a.label_class_id, a.note) == (b.outcome, b.label_class_id, b.note)
            and (a.outcome != Annotation.Outcome.FINDINGS or _findings_of(a) == _findings_of(b)))


def describe_answer(annotation: Annotation) -> str:
    """An answer in a reader's words: the class, skip, unsure, or the findings marked."""
    if annotation.outcome == Annotation.Outcome.LABEL:
        return annotation.label_class.name if annotation.label_class_id else "a label"
    if annotation.outcome == Annotation.Outcome.FINDINGS:
        marked = [f"{name} {state}" for name, state in annotation.findings
                  .exclude(state="absent").order_by("finding__name")
                  .values_list("finding__name", "state")]
        return "findings: " + ", ".join(marked) if marked else "no finding"
    return annotation.outcome


class _Compared(Exception):
    """Rolls back the answer made only to compare it with a stored one."""

    def __init__(self, same: bool, made: str):
        super().__init__(same)
        self.same, self.made = same, made


def _replay_of(stored: Annotation, *, scan: Scan, submission: str, create,
               fields: dict) -> Annotation:
    """``stored`` when the request repeats it (a retried or double-submitted request: the
    same outcome, class, findings and note; the reading time and what was shown may differ,
    a retry measures them again). Another answer under the same submission id is refused
    (SubmissionConflict), naming the stored one: returning it as if saved would drop the
    reader's correction without a word. The request's answer is made and compared as
    stored (a findings answer's states), then rolled back."""
    if stored.scan_id != scan.pk:
        raise AnnotationError(f"you used the submission id {submission!r} for your answer "
                              f"on scan {stored.scan_id}: send a new id for a new answer")
    try:
        with transaction.atomic():
            made = create(**{**fields, "external_id": ""})
            raise _Compared(_same_answer(stored, made), describe_answer(made))
    except _Compared as compared:
        if compared.same:
            return stored
        made = compared.made
    when = in_words(stored.created_at, seconds=True)
    raise SubmissionConflict(
        f"this answer was already saved as {describe_answer(stored)} (answer {stored.pk}, "
        f"{when}) under the submission id {submission!r}; this request says {made}. "
        "Nothing was changed: to change your answer, send it with a new submission id",
        stored)


def _record_once(*, project: Project, scan: Scan, user, data: dict, create
                 ) -> tuple[Annotation, bool]:
    """What every answer from the label page shares: the model version, round, reading time
    and acquisition score the reader was shown, checked; ``submission_id`` making a replayed
    or double-submitted request a no-op, and without one, the same answer as the reader's
    latest on the scan given within REPEAT_WINDOW (a double click, a retried request) stored
    once, that earlier answer returned; the lease released once saved.
    ``create(**fields)`` records the answer itself (a class, or findings)."""
    shown_model = None
    if data.get("shown_model_version"):
        shown_model = ModelVersion.objects.filter(
            project=project, version=str(data["shown_model_version"])[:64]).first()
        if shown_model is None:
            raise AnnotationError("the model version shown is not one of this project's")
    round_id = _optional_int(data, "query_round")
    query_round = (QueryRound.objects.filter(project=project, pk=round_id).first()
                   if round_id is not None else None)
    duration = _optional_duration(data)
    submission = str(data.get("submission_id") or "")[:64]

    def replayed() -> Annotation | None:
        # a submission id is the reader's own key, in this project: another reader (or this
        # one in another project) may use the same id for their own answers
        return Annotation.objects.filter(
            source=Annotation.Source.WEB, reader=user, project=project,
            external_id=submission).first() if submission else None

    fields = dict(source=Annotation.Source.WEB, duration_ms=duration,
                  shown_model_version=shown_model,
                  shown_acquisition_score=_optional_float(data, "shown_acquisition_score"),
                  query_round=query_round, external_id=submission,
                  note=str(data.get("note") or "")[:2000])
    existing = replayed()
    if existing is not None:
        return _replay_of(existing, scan=scan, submission=submission, create=create,
                          fields=fields), False
    try:
        with transaction.atomic():
            # one answer on a scan at a time (PostgreSQL): two copies of a double submit
            # cannot both find no earlier answer and both be stored
            Scan.objects.select_for_update().filter(pk=scan.pk).values_list("pk").first()
            previous = None if submission else (
                Annotation.objects.filter(scan=scan, reader=user, source=Annotation.Source.WEB,
                                          created_at__gte=timezone.now() - REPEAT_WINDOW)
                .order_by("-created_at", "-pk").first())
            annotation = create(**fields)
            if previous is not None and _same_answer(previous, annotation):
                # made and compared as stored (a findings answer's states), then undone:
                # its refit trigger and audit row go with the rolled-back transaction
                raise _Repeat(previous)
    except _Repeat as repeat:
        lease_release(scan=scan, user=user)
        return repeat.previous, False
    except IntegrityError:       # the same submission saved by a concurrent request
        existing = replayed()
        if existing is None:
            # what the answer refers to went while it was saved: the class (or a finding)
            # deleted in the admin, the round or the model version removed
            raise AnnotationError("the answer could not be stored: its class, a finding or "
                                  "what you were shown was removed meanwhile; reload the "
                                  "page") from None
        return _replay_of(existing, scan=scan, submission=submission, create=create,
                          fields=fields), False
    lease_release(scan=scan, user=user)
    return annotation, True


def reading_too_quick(annotation: Annotation) -> str | None:
    """Why a new answer from the label page looks like no reading (its reported time on
    screen is below MIN_READING_MS), in words for the reader; None when it does not. Logged:
    the answer is kept, and whoever checks answers can find it."""
    if annotation.duration_ms is None or annotation.duration_ms >= MIN_READING_MS:
        return None
    logger.warning("answer %s by %s on scan %s came %s ms after the scan was shown",
                   annotation.pk, annotation.reader_id, annotation.scan_id,
                   annotation.duration_ms)
    return (f"Your answer {describe_answer(annotation)} on scan #{annotation.scan_id} came "
            f"{annotation.duration_ms} ms after the scan appeared, too soon to have read it. "
            "If that was a double press, undo it (Backspace) and read the scan again.")


def can_add_classes(project: Project, user) -> bool:
    role = project.role_of(user)
    if role is None:
        return False
    return role != "clinician" or project.clinicians_can_add_classes


UNDO_WINDOW = timedelta(minutes=30)


def answer_undo(*, project: Project, annotation_id: int, user) -> Scan:
    """Take back the reader's last answer in this project (a slip of the key): only their
    own, only from the label page, only their latest one, within UNDO_WINDOW. The row is
    deleted (the audit log keeps what it was) and its scan is returned to be read again."""
    latest = (Annotation.objects.filter(project=project, reader=user)
              .order_by("-created_at", "-pk").select_related("scan").first())
    if latest is None or latest.pk != annotation_id:
        raise AnnotationError("only your last answer in this project can be undone")
    if latest.source != Annotation.Source.WEB:
        raise AnnotationError("only answers given on the label page can be undone here")
    if timezone.now() - latest.created_at > UNDO_WINDOW:
        raise AnnotationError(f"answers older than {int(UNDO_WINDOW.total_seconds() // 60)} "
                              "minutes are kept: answer the scan again instead")
    scan = latest.scan
    latest.delete()
    return scan
