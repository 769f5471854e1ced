from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from annotator.models import LabelClass
from ml_backend import services
from ml_backend.errors import TrainingError
from ml_backend.management.commands._runs import get_project, int_between


class Command(BaseCommand):
    help = ("Candidates for a (new) class: unlabeled scans most like its first examples, and "
            "novel scans far from every labeled one.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--class", dest="label_class", required=True)
        parser.add_argument("-k", type=int_between(1, 1000), default=10,
                            help="how many candidates of each kind (1 to 1000; default 10)")

    def handle(self, *args, **opts):
        project = get_project(opts["project"])
        label_class = LabelClass.objects.filter(project=project,
                                                name__iexact=opts["label_class"]).first()
        if label_class is None:
            raise CommandError(f"No class {opts['label_class']!r} in {project.name!r}.")
        try:
            found = services.class_candidates(label_class=label_class, k=opts["k"])
        except TrainingError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Like the {label_class.name} examples:")
        for c in found["neighbours"]:
            self.stdout.write(f"  scan {c['scan']}  similarity {c['similarity']:.3f} (like #{c['like']})")
        self.stdout.write("Unlike anything labeled (novelty):")
        for c in found["novel"]:
            self.stdout.write(f"  scan {c['scan']}  nearest labeled {c['nearest_labeled_similarity']:.3f}")
