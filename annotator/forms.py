from __future__ import annotations

from django import forms
from django.conf import settings

from annotator.models import Split


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
    split = forms.ChoiceField(choices=Split.choices, initial=Split.POOL)
    label = forms.ChoiceField(
        required=False,
        help_text="Optional: a class every uploaded scan is known to show.",
    )

    def __init__(self, *args, label_classes=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["label"].choices = [("", "— no label —")] + [
            (c.name, c.name) for c in label_classes
        ]

    def clean_files(self):
        files = self.cleaned_data["files"]
        if not files:
            raise forms.ValidationError("Choose at least one file.")
        if len(files) > settings.UPLOAD_MAX_FILES:
            raise forms.ValidationError(
                f"{len(files)} files chosen; at most {settings.UPLOAD_MAX_FILES} per upload."
            )
        return files
