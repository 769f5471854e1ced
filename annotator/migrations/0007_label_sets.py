"""Label sets per anatomy: every project gets a 'default' set holding its classes and scans."""

import django.db.models.deletion
from django.db import migrations, models


def default_sets(apps, schema_editor):
    Project = apps.get_model("annotator", "Project")
    LabelSet = apps.get_model("annotator", "LabelSet")
    LabelClass = apps.get_model("annotator", "LabelClass")
    Scan = apps.get_model("annotator", "Scan")
    for project in Project.objects.all():
        label_set, _ = LabelSet.objects.get_or_create(project=project, name="default")
        LabelClass.objects.filter(project=project).update(label_set=label_set)
        Scan.objects.filter(project=project).update(label_set=label_set)


class Migration(migrations.Migration):

    dependencies = [
        ("annotator", "0006_scan_quarantine"),
    ]

    operations = [
        migrations.CreateModel(
            name="LabelSet",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("name", models.CharField(max_length=100)),
                ("description", models.TextField(blank=True)),
                ("modalities", models.CharField(blank=True, max_length=200,
                                                help_text="Comma-separated DICOM modalities, e.g. CR,DX")),
                ("body_parts", models.CharField(blank=True, max_length=200,
                                                help_text="Comma-separated body parts, e.g. CHEST")),
                ("order", models.PositiveIntegerField(default=0)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("datasets", models.ManyToManyField(blank=True, related_name="label_sets",
                                                    to="annotator.dataset",
                                                    help_text="Scans of these datasets use this set.")),
                ("project", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                              related_name="label_sets", to="annotator.project")),
            ],
            options={"ordering": ["project", "order", "pk"]},
        ),
        migrations.AddConstraint(
            model_name="labelset",
            constraint=models.UniqueConstraint(fields=("project", "name"), name="labelset_unique_name"),
        ),
        migrations.AddField(
            model_name="labelclass",
            name="label_set",
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT,
                                    related_name="classes", to="annotator.labelset"),
        ),
        migrations.AddField(
            model_name="scan",
            name="label_set",
            field=models.ForeignKey(blank=True, null=True,
                                    on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="scans", to="annotator.labelset",
                                    help_text="The classes that apply to this scan (set by the label sets' rules)."),
        ),
        migrations.AddField(
            model_name="scan",
            name="import_job",
            field=models.ForeignKey(blank=True, null=True,
                                    on_delete=django.db.models.deletion.SET_NULL,
                                    related_name="scans", to="annotator.importjob",
                                    help_text="The import that created this scan."),
        ),
        migrations.AddField(
            model_name="project",
            name="novelty_percentile",
            field=models.FloatField(default=99.0, help_text="A scan farther from its nearest project scans than this percentile of the project's own distances is flagged as unlike the project's data."),
        ),
        migrations.AddField(
            model_name="importjob",
            name="label_set",
            field=models.CharField(blank=True, max_length=100, help_text="Name of the label set the imported dataset joins (created if new)."),
        ),
        migrations.AlterField(
            model_name="project",
            name="gate_tolerance",
            field=models.FloatField(default=0.02, help_text="A new model is held back only when it is confidently worse (95% paired bootstrap bound on the same eval scans) than the active one by more than this F1."),
        ),
        migrations.RunPython(default_sets, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="labelclass",
            name="label_set",
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT,
                                    related_name="classes", to="annotator.labelset",
                                    help_text="The kind of scan this class applies to."),
        ),
    ]
