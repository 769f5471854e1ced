from __future__ import annotations

from django import forms
from django.conf import settings

from annotator.models import Split, hotkey_error
from annotator.services import name_refusal


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files; per-file checks (empty, size, type) happen in annotator.uploads."""

    widget = MultipleFileInput

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_empty_file", True)
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single = super().clean
        if isinstance(data, (list, tuple)):
            return [single(item, initial) for item in data]
        return [single(data, initial)] if data else []


class UploadForm(forms.Form):
    files = MultipleFileField(
        help_text="DICOM (.dcm or no extension), PNG, JPEG or TIFF. Several files at once are fine."
    )
    dataset = forms.CharField(
        max_length=200,
        initial="uploads",
        help_text="Site, scanner or collection these scans come from.",
    )
    split = forms.ChoiceField(
        choices=[*Split.choices, ("auto:0.2", "Automatic: about 20% of the patients to eval, "
                                              "each patient wholly on one side")],
        initial=Split.POOL)
    modality = forms.ChoiceField(
        required=False, choices=(),
        help_text="For PNG, JPEG and TIFF files, which do not say (DICOM files do).")
    body_part = forms.CharField(
        required=False, max_length=64,
        help_text="Likewise, e.g. CHEST, BRAIN, BLOOD: it picks the label set that applies.")
    label = forms.ChoiceField(
        required=False,
        help_text="Optional: a class every uploaded scan is known to show.",
    )

    def __init__(self, *args, label_classes=(), **kwargs):
        from annotator.services import MODALITY_CHOICES

        super().__init__(*args, **kwargs)
        self.fields["modality"].choices = MODALITY_CHOICES
        self.fields["label"].choices = [("", "— no label —")] + [
            (c.name, c.name) for c in label_classes
        ]

    def clean_dataset(self):
        from annotator.services import dataset_name_refusal

        name = self.cleaned_data["dataset"]
        refusal = dataset_name_refusal(name)
        if refusal is not None:
            raise forms.ValidationError(refusal[0].upper() + refusal[1:] + ".")
        return name

    def clean_files(self):
        files = self.cleaned_data["files"]
        if not files:
            raise forms.ValidationError("Choose at least one file.")
        if len(files) > settings.UPLOAD_MAX_FILES:
            raise forms.ValidationError(
                f"{len(files)} files chosen; at most {settings.UPLOAD_MAX_FILES} per upload."
            )
        return files


class _LabelSetChoice(forms.Form):
    """A choice of the project's label sets; hidden when there is only one, and the first
    set when none is chosen."""

    label_set = forms.ModelChoiceField(queryset=None, empty_label=None, required=False)

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, **kwargs)
        sets = project.label_sets.order_by("order", "pk")
        self.fields["label_set"].queryset = sets
        self.fields["label_set"].initial = sets.first()
        if sets.count() <= 1:
            self.fields["label_set"].widget = forms.HiddenInput()

    def clean_label_set(self):
        return self.cleaned_data.get("label_set") or self.fields["label_set"].queryset.first()


class LabelClassForm(_LabelSetChoice):
    """A new anomaly type, added mid-project."""

    name = forms.CharField(max_length=100)
    description = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What a reader should look for (shown on the label page).",
    )
    hotkey = forms.CharField(
        required=False, max_length=1,
        help_text="One key that labels a scan with this class; blank picks a free digit.",
    )

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, project=project, **kwargs)
        self.project = project
        self.fields["label_set"].help_text = ("The kind of scan the class applies to: it is "
                                              "offered only for those scans.")
        self.order_fields(["name", "label_set", "description", "hotkey"])

    def clean_name(self):
        name = " ".join(self.cleaned_data["name"].split())
        if not name:
            raise forms.ValidationError("A class needs a name.")
        refusal = name_refusal("class", name)
        if refusal:
            raise forms.ValidationError(refusal[0].upper() + refusal[1:] + ".")
        if self.project.label_classes.filter(name__iexact=name).exists():
            raise forms.ValidationError(f"This project already has a class called {name!r}.")
        return name

    def clean_hotkey(self):
        key = (self.cleaned_data.get("hotkey") or "").strip().lower()
        problem = hotkey_error(key)
        if problem:
            raise forms.ValidationError(problem)
        return key

    def clean(self):
        from annotator.label_page import effective_hotkeys

        cleaned = super().clean()
        key, label_set = cleaned.get("hotkey"), cleaned.get("label_set")
        if key and label_set is not None and label_set.is_multi \
                and hotkey_error(key, findings=True):
            self.add_error("hotkey", hotkey_error(key, findings=True))
        elif key and label_set is not None:
            used = effective_hotkeys(list(label_set.classes.all()))
            if key in used.values():
                self.add_error("hotkey", f"{key!r} already labels another class of "
                                         f"{label_set.name}.")
        return cleaned


class ClassifyForm(_LabelSetChoice):
    file = forms.FileField(
        help_text="One DICOM, PNG, JPEG or TIFF scan. Nothing is stored unless you add it.",
    )

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, project=project, **kwargs)
        field = self.fields["label_set"]
        field.label = "Kind of scan"
        field.help_text = ("The label set to classify it with (the classes that apply to this "
                           "anatomy); by default the one the file's modality and body part "
                           "pick, as an import would.")
        if not isinstance(field.widget, forms.HiddenInput):
            field.empty_label = "— by the file (its modality and body part) —"
            field.initial = None
        self.order_fields(["file", "label_set"])

    def clean_label_set(self):
        """The chosen set, or None: the view picks the set the file's own modality and body
        part resolve to (``services.label_set_resolve``), as its import would."""
        if isinstance(self.fields["label_set"].widget, forms.HiddenInput):
            return super().clean_label_set()
        return self.cleaned_data.get("label_set")
