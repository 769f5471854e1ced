"""A web answer's submission id is unique per (reader, project), no longer across the site:
two readers' scripts (or one reader's in two projects) may use the same ids. Label Studio
annotation ids (and any other source's) stay unique per source.

Safe on existing data: every row already satisfies both new constraints (they are looser
than the one they replace, which held every (source, id) once), so no row is refused. An
answer whose project was not filled in yet gets its scan's project, so the new constraint
covers it (as 0017 did for the rows it found); no two such rows can clash, since the
constraint replaced held each id once. Going back (migrate annotator 0018) fails, with
the database's own error, once two readers have used the same id: clear one of them first.
"""

from django.conf import settings
from django.db import migrations, models

FILL_PROJECT = (
    "UPDATE annotator_annotation SET project_id = (SELECT project_id FROM annotator_scan "
    "WHERE annotator_scan.id = annotator_annotation.scan_id) WHERE project_id IS NULL")


class Migration(migrations.Migration):

    dependencies = [
        ('annotator', '0018_scan_patient_study_indexes'),
        ('ml_backend', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddConstraint(
            model_name='annotation',
            constraint=models.UniqueConstraint(
                condition=models.Q(('source', 'web'), models.Q(('external_id', ''), _negated=True)),
                fields=('reader', 'project', 'external_id'), name='annotation_unique_submission'),
        ),
        migrations.RemoveConstraint(
            model_name='annotation',
            name='annotation_unique_external_id',
        ),
        migrations.AddConstraint(
            model_name='annotation',
            constraint=models.UniqueConstraint(
                condition=models.Q(models.Q(('external_id', ''), _negated=True),
                                   models.Q(('source', 'web'), _negated=True)),
                fields=('source', 'external_id'), name='annotation_unique_external_id'),
        ),
        # last: on PostgreSQL an UPDATE of a foreign key leaves deferred trigger events that
        # an index built after it in the same transaction refuses ("pending trigger events")
        migrations.RunSQL(FILL_PROJECT, reverse_sql=migrations.RunSQL.noop),
    ]
