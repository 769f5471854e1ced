"""Create the demo users and project and import fixtures/ (safe to run again)."""

from __future__ import annotations

import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from annotator import labeling, services
from annotator.models import Membership, Project
from ml_backend.management.commands._runs import MAX_EPOCHS, int_between

DEMO_PROJECT = "Demo: chest X-ray + brain MRI"
DATASETS = [
    # (name, fixture folder, modality, body part, horizontal flips preserve anatomy?,
    #  label set: the classes that apply to these scans)
    ("PneumoniaMNIST (Guangzhou)", "chest_xray", "CR", "CHEST", False, "Chest X-ray"),
    ("Brain MRI (Bhuvaji et al.)", "brain_mri", "MR", "BRAIN", True, "Brain MRI"),
]
# A colour project beside it: blood-smear microscopy, where colour tells the cells apart.
COLOUR_PROJECT = "Demo: blood smear (colour)"
COLOUR_DATASETS = [
    ("PBC blood cells (Barcelona)", "blood_smear", "XC", "BLOOD", True, "Blood cells"),
]
# The colour project's encoder without a colour starter shipped: the greyscale starter spread
# over RGB, then this many epochs on its 64 smears so it sees colour (seconds on a CPU).
COLOUR_PRETRAIN_EPOCHS = 3


def _colour_starter_shipped() -> bool:
    """Whether a colour starter encoder (3 channels) is shipped: the colour demo then uses
    it as is, like the greyscale demo uses its own."""
    from ml_backend.services.training import starter_encoder

    found = starter_encoder(3)
    return bool(found) and found[1].get("config", {}).get("channels") == 3


class Command(BaseCommand):
    help = ("Set up the demo: users admin, clinician and reviewer, a project, the fixture scans, "
            "a first encoder and a first worklist.")

    def add_arguments(self, parser):
        parser.add_argument("--fixtures", default=str(Path(settings.BASE_DIR) / "fixtures"))
        parser.add_argument("--keep-passwords", action="store_true",
                            help="do not reset the demo users' passwords")
        parser.add_argument("--pretrain-epochs", type=int_between(-1, MAX_EPOCHS), default=None,
                            help="epochs of SimCLRv2 pretraining on the fixtures, continuing from "
                            "the shipped starter encoder (default 0: the starter as shipped, "
                            "only embedding; 4 from scratch when no starter is shipped); "
                            "-1: no encoder; skipped when the project already has one")
        parser.add_argument("--image-size", type=int_between(8, 1024), default=64)
        parser.add_argument("--url", default="http://127.0.0.1:8000/",
                            help="where the demo will be served, for the last line (make demo "
                                 "passes its HOST and PORT)")

    def handle(self, *args, **opts):
        users = self._users(keep=opts["keep_passwords"])
        epochs = opts["pretrain_epochs"]
        if epochs is None:
            from ml_backend.services.training import starter_encoder

            epochs = 0 if starter_encoder() else 4
        self._project(
            DEMO_PROJECT, DATASETS, users, opts, epochs=epochs,
            description="Paediatric chest X-ray (PneumoniaMNIST) and brain MRI tumour scans "
            "from fixtures/. Eval scans are labeled; the pool waits for clinicians.")
        self._project(
            COLOUR_PROJECT, COLOUR_DATASETS, users, opts, colour="colour",
            epochs=epochs if epochs < 0 else (
                0 if epochs == 0 and _colour_starter_shipped() else COLOUR_PRETRAIN_EPOCHS),
            description="Peripheral blood-cell microscopy (PBC, CellaVision) from fixtures/, "
            "in colour: eosinophil granules are orange-red, basophil granules dark purple. "
            "Eval scans are labeled; the pool waits for clinicians.")
        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS(f"Demo ready at {opts['url']}"))
        for role, (user, password) in users.items():
            shown = password or "(unchanged)"
            self.stdout.write(f"  {role:10s} username: {user.username:10s} password: {shown}")

    def _project(self, name: str, datasets: list, users: dict, opts: dict, *, epochs: int,
                 description: str, colour: str = "") -> Project:
        project = Project.objects.filter(name=name).first() or services.project_create(
            name=name, description=description, created_by=users["admin"][0])
        if colour and not project.colour_mode:
            services.project_colour_mode_set(project, colour)
        services.membership_set(project=project, user=users["clinician"][0],
                                role=Membership.Role.CLINICIAN)
        services.membership_set(project=project, user=users["reviewer"][0],
                                role=Membership.Role.REVIEWER)
        services.membership_set(project=project, user=users["admin"][0],
                                role=Membership.Role.ADMIN)
        fixtures = Path(opts["fixtures"])
        for dataset_name, folder, modality, body_part, hflip, label_set in datasets:
            dataset = services.dataset_get_or_create(project=project, name=dataset_name,
                                                     modality=modality, body_part=body_part,
                                                     hflip_allowed=hflip)
            # Each anatomy has its own label set: a chest film is never offered a brain class.
            services.label_set_create(project=project, name=label_set, datasets=[dataset],
                                      body_parts=body_part)
            # Eval scans carry their labels (ground truth for reports); pool scans are
            # imported unlabeled so the active-learning loop has work to do.
            for split, layout in (("eval", "class-folders"), ("pool", "flat")):
                call_command("import_scans", str(fixtures / folder / split), project=project.name,
                             dataset=dataset_name, split=split, layout=layout, no_progress=True,
                             stdout=self.stdout, stderr=self.stderr)
        project.refresh_from_db()
        if epochs >= 0 and project.active_encoder is None:
            if epochs == 0:
                self.stdout.write(f"{name}: embedding the {project.scans.count()} fixture scans "
                                  "with the shipped starter encoder (pretrained on public chest "
                                  "X-ray and brain MRI scans; see ml_backend/starter/) ...")
            else:
                self.stdout.write(f"{name}: pretraining a SimCLRv2 encoder on the "
                                  f"{project.scans.count()} fixture scans ({epochs} epochs, "
                                  "from the starter encoder when one is shipped) ...")
            call_command("pretrain", project=project.name, epochs=epochs,
                         image_size=opts["image_size"], batch_size=64,
                         stdout=self.stdout, stderr=self.stderr)
        elif project.active_encoder is not None:
            self.stdout.write(f"{name}: encoder {project.active_encoder.version} is active; "
                              "new scans are embedded incrementally.")
            call_command("embed", project=project.name, no_progress=True,
                         stdout=self.stdout, stderr=self.stderr)
        project.refresh_from_db()
        if labeling.current_round(project) is None:
            from ml_backend import services as ml

            first = ml.query_round_create(project=project, created_by=users["admin"][0])
            self.stdout.write(f"{name}: first worklist of {first.size} scans ({first.strategy}; "
                              "with no labels yet, typical scans of every cluster).")
        return project

    def _users(self, *, keep: bool):
        User = get_user_model()
        result = {}
        for role, username, superuser in (("admin", "admin", True), ("clinician", "clinician", False),
                                          ("reviewer", "reviewer", False)):
            user, created = User.objects.get_or_create(
                username=username, defaults={"email": f"{username}@example.org"}
            )
            password = None
            if created or not keep:
                password = secrets.token_urlsafe(9)
                user.set_password(password)
            user.is_staff = superuser
            user.is_superuser = superuser
            user.save()
            result[role] = (user, password)
        return result
