"""The audit trail's "model kept, not activated" action: a run's version that passed its gate
while a person chose the active version by hand. Choices only: no change to the table."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('annotator', '0019_submission_id_per_reader_project'),
    ]

    operations = [
        migrations.AlterField(
            model_name='auditevent',
            name='action',
            field=models.CharField(choices=[('annotation.created', 'Annotation created'), ('annotation.updated', 'Annotation changed'), ('annotation.deleted', 'Annotation deleted'), ('annotation.adjudicated', 'Adjudication'), ('model.promoted', 'Model promoted'), ('model.rolled_back', 'Model rolled back'), ('model.not_activated', 'Model kept, not activated'), ('class.created', 'Class created'), ('class.changed', 'Class changed'), ('class.deleted', 'Class deleted'), ('scan.released', 'Scan released from quarantine')], db_index=True, max_length=32),
        ),
    ]
