from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.models import MAX_ROUND_SCANS
from ml_backend import services
from ml_backend.active.strategies import STRATEGIES
from ml_backend.management.commands._runs import get_project, int_between
from ml_backend.services.queries import query_refusal, strategy_needs_words

MAX_N = MAX_ROUND_SCANS     # scans in one round


class Command(BaseCommand):
    help = "Choose the next scans to label (a QueryRound), each with its score and reason."

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--n", type=int_between(1, MAX_N), default=None,
                            help=f"batch size, 1 to {MAX_N} (default: the project's)")
        parser.add_argument("--strategy", default=None, choices=sorted(STRATEGIES),
                            help="default: the project's strategy (hybrid), which picks at "
                            "random while the scans have no embeddings; a strategy named here "
                            "is refused without what it needs")

    def handle(self, *args, **opts):
        project = get_project(opts["project"])
        refusal = query_refusal(project)     # nothing to choose from: no empty round stored
        if refusal:
            raise CommandError(f"No query round: {refusal}.")
        try:
            query_round = services.query_round_create(project=project, n=opts["n"],
                                                      strategy=opts["strategy"],
                                                      refuse_empty=True)
        except (ValueError, services.TrainingError) as exc:
            raise CommandError(f"No query round: {exc} (what each strategy needs: "
                               f"{strategy_needs_words()}).") from None
        self.stdout.write(f"Query round {query_round.pk}: {query_round.size} scans by "
                          f"{query_round.strategy}"
                          + (f" with {query_round.model_version}" if query_round.model_version else
                             " (no classifier yet)"))
        for item in query_round.items.select_related("scan"):
            reason = dict(item.reason)
            why = reason.pop("why", "")
            neighbours = reason.pop("neighbours", [])
            details = ", ".join(f"{k}={v}" for k, v in reason.items())
            near = "; ".join(f"#{n['scan']} {n['label']} ({n['similarity']:.2f})" for n in neighbours)
            self.stdout.write(f"{item.rank:3d}. scan {item.scan_id:6d}  score {item.score:.3f}  "
                              f"{why}  [{details}]" + (f"  nearest labeled: {near}" if near else ""))
