"""Projects, datasets, scans, label classes and annotations (the system of record)."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils.deconstruct import deconstructible

from annotator.names import dataset_name_refusal, name_refusal

# the most scans one worklist round chooses (project setting, ``query --n``, the API)
MAX_ROUND_SCANS = 10_000
# a class colour: what the pages' CSS and the charts (matplotlib) both draw
COLOUR_VALIDATOR = RegexValidator(r"^#[0-9A-Fa-f]{6}$",
                                  "a colour is #RRGGBB: '#' and six hex digits, e.g. #4c78a8")



@deconstructible
class TypedName:
    """A name someone types (a project's, a label set's, a class's, a dataset's): refused
    with ``services.name_refusal`` / ``dataset_name_refusal``'s words wherever a form or
    serializer validates the model (the admin included), as the pages' own forms do
    (``annotator.names``)."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, value: str) -> None:
        refusal = (dataset_name_refusal(value) if self.what == "dataset"
                   else name_refusal(self.what, value))
        if refusal:
            raise ValidationError(refusal[0].upper() + refusal[1:] + ".")

    def __eq__(self, other) -> bool:
        return isinstance(other, TypedName) and other.what == self.what


class Project(models.Model):
    """A labeling project: its classes, datasets, active model and active-learning settings."""

    class Strategy(models.TextChoices):
        HYBRID = "hybrid", "Hybrid (uncertainty within diversity)"
        LEAST_CONFIDENT = "least_confident", "Least confident"
        MARGIN = "margin", "Margin"
        ENTROPY = "entropy", "Entropy"
        DIVERSITY = "diversity", "Diversity (clusters)"
        RANDOM = "random", "Random"

    name = models.CharField(max_length=200, unique=True, validators=[TypedName("project")])
    description = models.TextField(blank=True)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="Membership", related_name="projects", blank=True
    )
    active_model = models.ForeignKey(
        "ml_backend.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Classifier whose predictions clinicians are shown.",
    )
    active_encoder = models.ForeignKey(
        "ml_backend.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="SimCLRv2 encoder used for embeddings and the FAISS index.",
    )
    query_strategy = models.CharField(
        max_length=32, choices=Strategy.choices, default=Strategy.HYBRID
    )
    query_batch_size = models.PositiveIntegerField(
        default=20, validators=[MinValueValidator(1), MaxValueValidator(MAX_ROUND_SCANS)],
        help_text=f"Scans chosen in each worklist round (1–{MAX_ROUND_SCANS:,}).")
    refit_every = models.PositiveIntegerField(
        default=5, validators=[MinValueValidator(1), MaxValueValidator(MAX_ROUND_SCANS)],
        help_text="Refit the classifier head after this many new labels (1 refits after "
        "every answer).",
    )
    gate_tolerance = models.FloatField(
        default=0.02, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="A new model is held back only when it is confidently worse (95% paired "
        "bootstrap bound on the same eval scans) than the active one by more than this: "
        "macro-F1 for classes; for findings, the macro AUC and each finding's AUC (Bonferroni over findings). "
        "0–1: 0 holds back any confident drop, 1 never holds a version back.",
    )
    novelty_percentile = models.FloatField(
        default=99.0, validators=[MinValueValidator(50.0), MaxValueValidator(100.0)],
        help_text="A scan farther from its nearest project scans than this percentile of the "
        "project's own distances is flagged as unlike the project's data (50–100: below 50 "
        "most of the project's own scans would be flagged).",
    )
    clinicians_can_add_classes = models.BooleanField(
        default=True,
        help_text="Clinicians may add new anomaly types (reviewers and admins always may).",
    )
    label_studio_project_id = models.PositiveIntegerField(null=True, blank=True)
    dicom_grouping = models.CharField(
        max_length=8, default="image",
        choices=[("image", "Per image: each DICOM file (each slice) is a scan"),
                 ("series", "Per series: the slices of a CT/MR series are one scan")],
        help_text="How DICOM imports become scans. Per series: the slices are stacked in "
        "position order into one scan (its preview and the model use the middle slice; the "
        "label page scrolls through all of them).")
    readers_per_scan = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(3)],
        help_text="Double reading: the worklist serves each chosen scan to this many different "
        "readers (1–3) before it counts as read; agreement (kappa) needs 2.")
    blind_second_readers = models.BooleanField(
        default=True,
        help_text="Second readers and reviewers see neither the model's suggestion nor other "
        "readers' answers while they read (no anchoring).")
    label_studio_push_rounds = models.BooleanField(
        default=True,
        help_text="Push each new worklist round to the linked Label Studio project as it is "
        "chosen, so its annotators always have the current scans.")
    label_studio_prelabel = models.BooleanField(
        default=False,
        help_text="Let Label Studio preselect the model's answer in each task (pre-labelling). "
        "Off by default: a missed key would store the model's guess as the reader's.")
    disagreement_rule = models.CharField(
        max_length=12, default="majority",
        choices=[("majority", "Majority: the most common reading trains; a tie is held out"),
                 ("hold_out", "Hold out: any disagreement is left out of training")],
        help_text="What trains while readers disagree and no reviewer has adjudicated.")
    colour_mode = models.CharField(
        max_length=8, blank=True, default="",
        choices=[("", "Not decided yet (the first import decides)"),
                 ("grey", "Greyscale (models see one channel)"),
                 ("colour", "Colour (models see RGB)")],
        help_text="Greyscale (X-ray, CT, MR) or colour (H&E, blood smears, dermatology). The "
        "first imported scan decides; an admin may change it until the project has a model.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    @property
    def channels(self) -> int:
        """Input channels of this project's models: 3 for colour, 1 otherwise."""
        return 3 if self.colour_mode == "colour" else 1

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("annotator:project_detail", args=[self.pk])

    def role_of(self, user) -> str | None:
        """The user's role in this project, 'admin' for superusers, None for outsiders."""
        if not user.is_authenticated:
            return None
        if user.is_superuser:
            return Membership.Role.ADMIN
        known = self.__dict__.setdefault("_roles", {})   # asked several times a request
        if user.pk not in known:
            membership = self.memberships.filter(user=user).first()
            known[user.pk] = membership.role if membership else None
        return known[user.pk]


class Membership(models.Model):
    class Role(models.TextChoices):
        CLINICIAN = "clinician", "Clinician (labels)"
        REVIEWER = "reviewer", "Reviewer (adjudicates)"
        ADMIN = "admin", "Project admin"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.CLINICIAN)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "user"], name="membership_unique_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} — {self.role} in {self.project}"


class Dataset(models.Model):
    """Where scans came from: a site, scanner or collection. Drives per-site reports."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200, validators=[TypedName("dataset")])
    site = models.CharField(max_length=200, blank=True)
    scanner = models.CharField(max_length=200, blank=True)
    modality = models.CharField(max_length=16, blank=True, help_text="e.g. CR, DX, MR, CT")
    body_part = models.CharField(max_length=64, blank=True, help_text="e.g. CHEST, BRAIN")
    hflip_allowed = models.BooleanField(
        default=False,
        help_text="Horizontal flips are anatomy-preserving for this data (not for chest X-ray).",
    )
    colour_mode = models.CharField(
        max_length=8, blank=True, default="",
        choices=[("", "No scans yet"), ("grey", "Greyscale"), ("colour", "Colour"),
                 ("mixed", "Mixed")],
        help_text="What its imported scans are, decided per file at import.")
    colour_note = models.CharField(max_length=300, blank=True,
                                   help_text="Why: what the import saw in the files.")
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["project", "name"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="dataset_unique_name")
        ]

    def __str__(self) -> str:
        return self.name


class LabelSet(models.Model):
    """The classes that apply to one kind of scan (an anatomy / modality), e.g. chest X-ray:
    normal, pneumonia, COVID-19; brain MRI: glioma, meningioma, pituitary, no tumour.

    A scan belongs to the first set (by ``order``) whose datasets, modalities or body parts
    match it; a set with no rules takes every scan no other set claims. A project always has
    at least one set; a single-set project behaves as a project without sets.
    """

    class Kind(models.TextChoices):
        SINGLE = "single", "Single label (one class per scan)"
        MULTI = "multi", "Findings (any subset per scan, or no finding)"

    class UncertainPolicy(models.TextChoices):
        IGNORE = "ignore", "Ignore in training (default)"
        ZEROS = "zeros", "Treat as absent (U-Zeros)"
        ONES = "ones", "Treat as present (U-Ones)"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="label_sets")
    name = models.CharField(max_length=100, validators=[TypedName("label set")])
    description = models.TextField(blank=True)
    kind = models.CharField(
        max_length=8, choices=Kind.choices, default=Kind.SINGLE,
        help_text="Single label: each scan gets one class. Findings: the reader marks each "
        "finding present, absent or uncertain; 'no finding' is stated explicitly.")
    uncertain_policy = models.CharField(
        max_length=8, choices=UncertainPolicy.choices, default=UncertainPolicy.IGNORE,
        help_text="Findings sets: how uncertain answers enter training (recorded with each "
        "model version).")
    threshold_rule = models.CharField(
        max_length=12, choices=[("f1", "Best F1 per finding"),
                                ("sensitivity", "Target sensitivity per finding")],
        default="f1",
        help_text="Findings sets: how each finding's decision threshold is chosen on the eval "
        "split at every refit (saved with the version).")
    target_sensitivity = models.FloatField(
        default=0.9, validators=[MinValueValidator(0.01), MaxValueValidator(1.0)],
        help_text="Findings sets with the target-sensitivity rule: the share of "
        "eval positives each finding's threshold must catch (0.01–1).")
    datasets = models.ManyToManyField(Dataset, blank=True, related_name="label_sets",
                                      help_text="Scans of these datasets use this set.")
    modalities = models.CharField(max_length=200, blank=True,
                                  help_text="Comma-separated DICOM modalities, e.g. CR,DX")
    body_parts = models.CharField(max_length=200, blank=True,
                                  help_text="Comma-separated body parts, e.g. CHEST")
    order = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["project", "order", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="labelset_unique_name")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_multi(self) -> bool:
        return self.kind == self.Kind.MULTI

    @staticmethod
    def _codes(text: str) -> set[str]:
        return {part.strip().upper() for part in text.split(",") if part.strip()}

    @property
    def modality_codes(self) -> set[str]:
        return self._codes(self.modalities)

    @property
    def body_part_codes(self) -> set[str]:
        return self._codes(self.body_parts)


class Split(models.TextChoices):
    POOL = "pool", "Pool (queried for labels)"
    EVAL = "eval", "Evaluation (never queried)"


class Scan(models.Model):
    """One image, stored content-addressed by the sha256 of the imported file."""

    class Format(models.TextChoices):
        DICOM = "dicom", "DICOM"
        PNG = "png", "PNG"
        JPEG = "jpeg", "JPEG"
        TIFF = "tiff", "TIFF"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="scans")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="scans")
    sha256 = models.CharField(max_length=64, db_index=True)
    file = models.FileField(max_length=255, help_text="De-identified stored copy.")
    preview = models.FileField(max_length=255, help_text="Windowed 8-bit PNG for display.")
    file_format = models.CharField(max_length=8, choices=Format.choices)
    source_name = models.CharField(
        max_length=255,
        blank=True,
        help_text="Path inside the import source (raster files and archives only; "
        "never stored for DICOM, whose paths often carry patient names).",
    )
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    colour = models.BooleanField(
        default=False, help_text="The file carries colour (its preview is RGB).")
    display = models.JSONField(
        null=True, blank=True,
        help_text="Greyscale scans: the stored values' range and default window "
        "({'window': [centre, width], 'value_range': [min, max]}, in the file's units, e.g. HU), "
        "for window/level on the label page.")
    num_frames = models.PositiveIntegerField(default=1)
    bits_stored = models.PositiveSmallIntegerField(default=8)
    modality = models.CharField(max_length=16, blank=True)
    manufacturer = models.CharField(max_length=64, blank=True)
    manufacturer_model = models.CharField(max_length=64, blank=True)
    body_part = models.CharField(max_length=64, blank=True)
    photometric = models.CharField(max_length=32, blank=True)
    pixel_spacing = models.JSONField(null=True, blank=True, help_text="[row, column] in mm")
    transfer_syntax = models.CharField(max_length=80, blank=True)
    patient_key = models.CharField(
        max_length=32, blank=True, db_index=True, help_text="Salted pseudonym of the patient."
    )
    study_key = models.CharField(
        max_length=32, blank=True, db_index=True,
        help_text="Salted pseudonym of the DICOM study (its UID is never stored).")
    series_key = models.CharField(
        max_length=32, blank=True, db_index=True,
        help_text="Salted pseudonym of the DICOM series (its UID is never stored).")
    series_number = models.IntegerField(null=True, blank=True)
    instance_number = models.IntegerField(null=True, blank=True)
    slice_position = models.FloatField(
        null=True, blank=True,
        help_text="Position of the slice along its series (mm; comparable within a series).")
    slice_spacing = models.FloatField(
        null=True, blank=True, help_text="Spacing between slices, or slice thickness (mm).")
    slices = models.JSONField(
        null=True, blank=True,
        help_text="A series imported as one scan: each frame's position along the series "
        "(mm, in frame order; null where unknown). The preview and the models use the middle "
        "frame; the label page pages through all.")
    burned_in_annotation = models.BooleanField(default=False)
    quarantined = models.BooleanField(
        default=False, db_index=True,
        help_text="Held back (e.g. DICOM flags burned-in annotation: text in the pixels may "
        "identify the patient): never queried, exported or shown to non-admins until an admin "
        "releases it.")
    split = models.CharField(max_length=8, choices=Split.choices, default=Split.POOL)
    label_set = models.ForeignKey(
        LabelSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="scans",
        help_text="The classes that apply to this scan (set by the label sets' rules).")
    import_job = models.ForeignKey(
        "ImportJob", null=True, blank=True, on_delete=models.SET_NULL, related_name="scans",
        help_text="The import that created this scan.")
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["project", "sha256"], name="scan_unique_content")
        ]
        indexes = [models.Index(fields=["project", "split"], name="scan_project_split"),
                   # whole-patient splits look a patient (or study) up for every imported
                   # scan, and the reports intersect eval's patients with the pool's
                   models.Index(fields=["project", "patient_key"], name="scan_project_patient"),
                   models.Index(fields=["project", "study_key"], name="scan_project_study")]

    def __str__(self) -> str:
        return f"Scan {self.pk} ({self.file_format}, {self.width}x{self.height})"

    def get_absolute_url(self) -> str:
        return reverse("annotator:scan_detail", args=[self.pk])

    def save(self, *args, **kwargs):
        # A project with one label set: every scan uses it (the import resolves the rules of
        # projects with several; see annotator.services.label_sets_assign).
        if self._state.adding and self.label_set_id is None:
            sets = list(LabelSet.objects.filter(project_id=self.project_id)[:2])
            if len(sets) == 1:
                self.label_set = sets[0]
            elif not sets:
                self.label_set = LabelSet.objects.create(project_id=self.project_id,
                                                         name="default")
        super().save(*args, **kwargs)

    def is_labeled(self) -> bool:
        return self.annotations.filter(outcome=Annotation.Outcome.LABEL).exists()


# Keys the label page binds itself (annotator/static/annotator/label.js): it looks a class's
# key up before its own, so a class on one of these would save a label instead.
VIEWER_KEYS = {
    "s": "skip", "u": "unsure", "i": "invert", "g": "the Grad-CAM heat map",
    "r": "reset the view", "n": "1:1 zoom", "c": "compare with similar scans", "h": "help",
    "?": "help", "+": "zoom in", "=": "zoom in", "-": "zoom out", " ": "press a button",
}
# ... and in a findings set (several findings per scan), 0 answers "no finding".
FINDINGS_SET_KEYS = {"0": "no finding"}


def hotkey_error(key: str, *, findings: bool = False) -> str | None:
    """Why ``key`` cannot be a class's hotkey (None when it can): one ASCII letter or digit
    that the label page does not use itself. ``findings``: the class is a finding of a
    findings set, where 0 means "no finding"."""
    key = (key or "").lower()
    if not key:
        return None
    if key in VIEWER_KEYS:
        return (f"{key!r} is the label page's key for {VIEWER_KEYS[key]}: choose another "
                "letter or digit.")
    if findings and key in FINDINGS_SET_KEYS:
        return (f"{key!r} answers {FINDINGS_SET_KEYS[key]!r} on a findings set's label page: "
                "choose another letter or digit.")
    if len(key) != 1 or not (key.isascii() and key.isalnum()):
        return f"{key!r} is not a key to press: use one letter a-z or digit 0-9."
    return None


class LabelClass(models.Model):
    """A finding / anomaly type in a project; may be added at any time."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="label_classes")
    label_set = models.ForeignKey(LabelSet, on_delete=models.PROTECT, related_name="classes",
                                  help_text="The kind of scan this class applies to.")
    name = models.CharField(max_length=100, validators=[TypedName("class")])
    description = models.TextField(blank=True)
    hotkey = models.CharField(max_length=1, blank=True)
    color = models.CharField(max_length=7, default="#4c78a8", validators=[COLOUR_VALIDATOR],
                             help_text="#RRGGBB, e.g. #4c78a8")
    order = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["project", "order", "name"]
        verbose_name_plural = "label classes"
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="labelclass_unique_name")
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        """The hotkey is one the label page leaves free (the admin; the class form checks the
        same with ``hotkey_error``)."""
        self.hotkey = (self.hotkey or "").lower()
        problem = hotkey_error(self.hotkey, findings=self.label_set_id is not None
                               and self.label_set.is_multi)
        if problem:
            raise ValidationError({"hotkey": problem})

    def save(self, *args, **kwargs):
        if self.label_set_id is None:  # the project's first set (made if it has none)
            first = LabelSet.objects.filter(project_id=self.project_id).order_by(
                "order", "pk").first()
            self.label_set = first or LabelSet.objects.create(project_id=self.project_id,
                                                              name="default")
        super().save(*args, **kwargs)


class Annotation(models.Model):
    """One reader's answer for one scan, with what the reader was shown."""

    class Outcome(models.TextChoices):
        LABEL = "label", "Labeled"
        FINDINGS = "findings", "Findings"     # a findings set's answer: see FindingAnswer
        SKIP = "skip", "Skipped"
        UNSURE = "unsure", "Unsure"

    class Source(models.TextChoices):
        WEB = "web", "Web UI"
        LABEL_STUDIO = "label_studio", "Label Studio"
        IMPORT = "import", "Import"
        ADJUDICATION = "adjudication", "Adjudication"

    # The outcomes that label a scan (a class, or a findings answer); skip / unsure do not.
    LABELLING = ("label", "findings")

    scan = models.ForeignKey(Scan, on_delete=models.CASCADE, related_name="annotations")
    # the scan's project, kept on the row (set on save): counting or listing a project's
    # answers needs no join over its 100,000s of scans (issue 21)
    project = models.ForeignKey(Project, null=True, editable=False, on_delete=models.CASCADE,
                                related_name="+", db_index=False)
    label_class = models.ForeignKey(
        LabelClass, null=True, blank=True, on_delete=models.PROTECT, related_name="annotations"
    )
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.LABEL)
    reader = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="annotations",
    )
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.WEB)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    # What the reader was shown when answering.
    shown_model_version = models.ForeignKey(
        "ml_backend.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    shown_suggestion = models.ForeignKey(
        LabelClass, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    shown_confidence = models.FloatField(null=True, blank=True)
    shown_acquisition_score = models.FloatField(null=True, blank=True)
    shown_preselected = models.BooleanField(
        null=True, blank=True,
        help_text="Whether the model's answer was already selected when the reader answered "
        "(Label Studio pre-labelling, preselected findings); empty when not known.")
    shown_scores = models.JSONField(
        null=True, blank=True,
        help_text="Findings sets: {finding id: probability} the reader was shown.")
    query_round = models.ForeignKey(
        "ml_backend.QueryRound", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    external_id = models.CharField(
        max_length=64,
        blank=True,
        help_text="Label Studio annotation id, or the web UI's submission id: a replayed or "
        "double-submitted answer is stored once.",
    )
    import_job = models.ForeignKey(
        "ImportJob", null=True, blank=True, on_delete=models.SET_NULL, related_name="annotations"
    )
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(outcome="label", label_class__isnull=False) | ~Q(outcome="label"),
                name="annotation_label_has_class",
            ),
            # An import gives a scan a given label once, however often it is re-run.
            models.UniqueConstraint(
                fields=["scan", "label_class"],
                condition=Q(source="import"),
                name="annotation_unique_import_label",
            ),
            # A Label Studio annotation (or any other source's id) is stored once ...
            models.UniqueConstraint(
                fields=["source", "external_id"],
                condition=~Q(external_id="") & ~Q(source="web"),
                name="annotation_unique_external_id",
            ),
            # ... a web answer's submission id is the client's own key: one answer per id
            # for each reader in each project (two readers' scripts may pick the same ids)
            models.UniqueConstraint(
                fields=["reader", "project", "external_id"],
                condition=Q(source="web") & ~Q(external_id=""),
                name="annotation_unique_submission",
            ),
        ]
        indexes = [models.Index(fields=["scan", "outcome"], name="annotation_scan_outcome"),
                   models.Index(fields=["project", "outcome"], name="annotation_project_outcome")]

    def save(self, *args, **kwargs):
        if self.project_id is None and self.scan_id is not None:
            self.project_id = self.scan.project_id
        super().save(*args, **kwargs)

    def __str__(self) -> str:
        what = self.label_class.name if self.label_class_id else self.outcome
        return f"{what} on scan {self.scan_id} by {self.reader or self.source}"

    def findings_text(self) -> str:
        """A findings answer in a few words: its present findings, uncertain ones with "?",
        or "no finding"; "" for any other answer. Uses prefetched ``findings__finding``."""
        if self.outcome != Annotation.Outcome.FINDINGS:
            return ""
        shown = [f"{a.finding.name}{'?' if a.state == FindingAnswer.State.UNCERTAIN else ''}"
                 for a in self.findings.all() if a.state != FindingAnswer.State.ABSENT]
        return ", ".join(shown) or "no finding"


class FindingAnswer(models.Model):
    """One finding of a findings answer (``Annotation.outcome == "findings"``): present,
    absent or uncertain. A finding the reader left unanswered has no row; "no finding" is an
    answer whose every finding is absent (``Annotation`` then holds ``note`` as usual)."""

    class State(models.TextChoices):
        PRESENT = "present", "Present"
        ABSENT = "absent", "Absent"
        UNCERTAIN = "uncertain", "Uncertain"

    annotation = models.ForeignKey(Annotation, on_delete=models.CASCADE, related_name="findings")
    finding = models.ForeignKey(LabelClass, on_delete=models.PROTECT, related_name="answers")
    state = models.CharField(max_length=10, choices=State.choices)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["annotation", "finding"],
                                    name="findinganswer_unique_finding"),
        ]
        indexes = [models.Index(fields=["finding", "state"], name="findinganswer_state")]

    def __str__(self) -> str:
        return f"{self.finding.name}: {self.state}"


class ImportJob(models.Model):
    """One run of the import service (command or browser upload) and its summary."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="import_jobs")
    source = models.TextField(help_text="Source spec (folder, CSV, file.npz#split).")
    source_is_upload = models.BooleanField(
        default=False, help_text="Uploaded files; deleted once the job has run."
    )
    dataset_name = models.CharField(max_length=200, blank=True)
    split = models.CharField(max_length=8, choices=Split.choices, default=Split.POOL)
    eval_fraction = models.FloatField(
        null=True, blank=True,
        help_text="Automatic split (`--split auto:F`): about this share of the patients (of the "
        "studies where no patient is known, else of the files) go to eval, whole; a patient "
        "already in the project keeps its side. Empty: every scan goes to `split`.")
    layout = models.CharField(max_length=16, default="auto")
    labels_csv = models.TextField(blank=True)
    default_label = models.CharField(max_length=100, blank=True)
    label_set = models.CharField(
        max_length=100, blank=True,
        help_text="Name of the label set the imported dataset joins (created if new).")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    total = models.PositiveIntegerField(default=0)
    processed = models.PositiveIntegerField(default=0)
    imported = models.PositiveIntegerField(default=0)
    duplicates = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    labels_added = models.PositiveIntegerField(default=0)
    classes_created = models.JSONField(default=list, blank=True)
    errors = models.JSONField(default=list, blank=True, help_text="[{name, reason}] per failed file")
    warnings = models.JSONField(default=list, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    chunks_total = models.PositiveIntegerField(
        default=0, help_text="Chunks the files were split into for workers (0: one pass).")
    dataset_created = models.BooleanField(
        default=False, help_text="The job made its dataset (removed again if nothing lands).")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Import #{self.pk} into {self.project} ({self.status})"

    def get_absolute_url(self) -> str:
        return reverse("annotator:import_job_detail", args=[self.pk])

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED)

    @property
    def headline(self) -> str:
        """The job's outcome in words: a run that imported nothing does not say "Succeeded"."""
        if self.status != self.Status.SUCCEEDED:
            return self.get_status_display()
        if self.imported:
            return f"{self.imported} scan{'s' if self.imported != 1 else ''} imported"
        if self.duplicates and not self.failed:
            return "Nothing new: every file was already in the project"
        if self.failed:
            return "Nothing imported: no file could be read"
        return "Nothing imported: the source had no scans"


class ImportChunk(models.Model):
    """A slice of an import job's files (``start`` to ``stop`` in the source listing) that
    any worker may take: chunks of one job run in parallel on as many workers as there are,
    each claimed once (again only when its lease ran out: a lost worker), and the last one
    to finish writes the job's report."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"

    job = models.ForeignKey(ImportJob, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    start = models.PositiveIntegerField()
    stop = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    processed = models.PositiveIntegerField(default=0)
    imported = models.PositiveIntegerField(default=0)
    duplicates = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    labels_added = models.PositiveIntegerField(default=0)
    report = models.JSONField(
        default=dict, blank=True,
        help_text="errors, warnings, classes created and colour tallies of this chunk.")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"],
                                               name="importchunk_unique_index")]

    def __str__(self) -> str:
        return f"chunk {self.index} of import #{self.job_id} ({self.status})"


class ScanLease(models.Model):
    """A short hold on a scan while one reader looks at it, so two readers working through
    the same worklist at once are not served the same scan. Expired leases are free."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="leases")
    scan = models.OneToOneField(Scan, on_delete=models.CASCADE, related_name="lease")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    expires_at = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"scan {self.scan_id} held by {self.user} until {self.expires_at:%H:%M:%S}"


class LabelStudioTask(models.Model):
    """A scan exported to Label Studio as a task, and what the task was shown."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="ls_tasks")
    scan = models.ForeignKey(Scan, on_delete=models.CASCADE, related_name="ls_tasks")
    ls_task_id = models.PositiveIntegerField(unique=True, help_text="Label Studio task id")
    url_issued_at = models.DateTimeField(help_text="When the signed image URL was issued.")
    shown_model_version = models.ForeignKey(
        "ml_backend.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL,
        related_name="+", help_text="Model whose prediction the task carries.")
    shown_suggestion = models.ForeignKey(
        LabelClass, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    shown_confidence = models.FloatField(null=True, blank=True)
    shown_scores = models.JSONField(
        null=True, blank=True,
        help_text="Findings tasks: the probability shown per finding id (as annotations keep).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "scan"], name="lstask_unique_scan")
        ]

    def __str__(self) -> str:
        return f"LS task {self.ls_task_id} → scan {self.scan_id}"


class AuditEvent(models.Model):
    """Who did what, when, to which object, with what model shown. Append-only."""

    class Action(models.TextChoices):
        ANNOTATION_CREATED = "annotation.created", "Annotation created"
        ANNOTATION_UPDATED = "annotation.updated", "Annotation changed"
        ANNOTATION_DELETED = "annotation.deleted", "Annotation deleted"
        ADJUDICATED = "annotation.adjudicated", "Adjudication"
        MODEL_PROMOTED = "model.promoted", "Model promoted"
        MODEL_ROLLED_BACK = "model.rolled_back", "Model rolled back"
        MODEL_NOT_ACTIVATED = "model.not_activated", "Model kept, not activated"
        CLASS_CREATED = "class.created", "Class created"
        CLASS_CHANGED = "class.changed", "Class changed"
        CLASS_DELETED = "class.deleted", "Class deleted"
        SCAN_RELEASED = "scan.released", "Scan released from quarantine"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                              on_delete=models.SET_NULL, related_name="+")
    actor_name = models.CharField(max_length=150, blank=True,
                                  help_text="Username at the time, or 'system' / the source.")
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="audit_events")
    action = models.CharField(max_length=32, choices=Action.choices, db_index=True)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    model_version = models.CharField(max_length=64, blank=True,
                                     help_text="Model version shown / promoted.")
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action} " \
               f"{self.object_type} {self.object_id}"


class DicomLinkage(models.Model):
    """The honest-broker linkage of one DICOM scan: its original identifiers (patient, study,
    series and SOP instance UIDs, the patient module), encrypted with LINKAGE_KEY
    (annotator/linkage.py). Kept only when the key is set at import; read only to send a
    structured report back to the PACS. Never shown (not in the admin), exported, logged or
    backed up; without the key the ciphertext is useless."""

    scan = models.OneToOneField(Scan, on_delete=models.CASCADE, related_name="linkage")
    token = models.TextField(help_text="Fernet token (AES-128-CBC + HMAC-SHA256) of the "
                             "identifiers, as JSON.")
    key_id = models.CharField(max_length=16, help_text="Which key encrypted it (a hash of the "
                              "key, not the key).")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"linkage of scan {self.scan_id}"


class PacsReport(models.Model):
    """A structured report this site sent to the PACS for one scan: what it said and when, so
    a report is sent again only when the scan's result changes. ``sop_instance_uid`` is the
    report's own UID (made here, not a patient's)."""

    scan = models.ForeignKey(Scan, on_delete=models.CASCADE, related_name="pacs_reports")
    result = models.CharField(max_length=400, help_text="The label or findings reported.")
    model_version = models.CharField(max_length=64, blank=True)
    sop_instance_uid = models.CharField(max_length=64)
    series_instance_uid = models.CharField(
        max_length=64, blank=True,
        help_text="The report's series (made here): a later report for the scan names this one "
                  "as its predecessor. Empty for reports sent before it was kept.")
    sent_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-sent_at"]
