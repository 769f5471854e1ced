from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from ml_backend.management.commands._runs import get_project
from ml_backend.models import Evaluation, ModelVersion

# The confusion matrix's column for eval scans given no prediction (as ml_backend.charts
# labels it; not imported, so that this command does not load matplotlib).
NO_PREDICTION = "no prediction (not learned)"


class Command(BaseCommand):
    help = ("Per-class precision / recall / F1 / support, AUC, AP, kappa, calibration and the "
            "per-dataset breakdown of a model on the eval split, plus the learning curve.")

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True)
        parser.add_argument("--model", default=None, help="model version (default: the active one)")
        parser.add_argument("--format", default="md", choices=["md", "json"])

    def handle(self, *args, **opts):
        project = get_project(opts["project"])
        model = (ModelVersion.objects.filter(project=project, version=opts["model"]).first()
                 if opts["model"] else project.active_model)
        if model is None and opts["model"]:
            known = list(ModelVersion.objects.filter(
                project=project, kind=ModelVersion.Kind.CLASSIFIER).order_by(
                "-created_at", "-pk").values_list("version", flat=True)[:20])
            raise CommandError(
                f"no model version {opts['model']!r} in {project.name!r}: "
                + (f"its classifier versions (newest first) are {', '.join(known)}"
                   if known else "it has no classifier versions yet"))
        if model is None:
            raise CommandError("no classifier to report on yet: label some scans and run "
                               "`manage.py refit` (or `finetune`)")
        if model.kind != ModelVersion.Kind.CLASSIFIER:
            raise CommandError(f"{model.version} is an encoder: a report is on a classifier "
                               "version (leave out --model for the active one)")
        evaluation = model.evaluations.order_by("-created_at").first()
        findings = _findings_reports(model)
        if evaluation is None and findings:       # a findings-only version
            if opts["format"] == "json":
                self.stdout.write(json.dumps({"model_version": model.version,
                                              "status": model.status, "findings": findings,
                                              "findings_curve": _findings_curve(project)},
                                             indent=2))
            else:
                self.stdout.write("\n".join(
                    [f"# {model.project.name}: {model.version} ({model.status})", "",
                     model.status_reason, ""] + _findings_markdown(findings, project)))
            return
        if evaluation is None:
            raise CommandError(f"{model.version} has no evaluation: label eval-split scans")
        curve = [{"version": e.model_version.version, "labels": e.num_labels,
                  "accuracy": e.accuracy, "macro_f1": e.macro_f1, "macro_auc": e.macro_auc,
                  "status": e.model_version.status}
                 for e in Evaluation.objects.filter(model_version__project=project)
                 .select_related("model_version").order_by("num_labels", "created_at")]
        if opts["format"] == "json":
            self.stdout.write(json.dumps({"model_version": model.version, "status": model.status,
                                          "report": evaluation.report, "learning_curve": curve,
                                          **({"findings": findings,
                                              "findings_curve": _findings_curve(project)}
                                             if findings else {})},
                                         indent=2))
            return
        self.stdout.write(self._markdown(model, evaluation, curve))
        if findings:
            self.stdout.write("\n".join([""] + _findings_markdown(findings, project)))

    def _markdown(self, model, evaluation, curve) -> str:
        r = evaluation.report
        f = lambda v: "—" if v is None else f"{v:.3f}"
        lines = [f"# {model.project.name}: {model.version} ({model.status})", "",
                 f"{model.status_reason}", "",
                 f"Eval scans: {evaluation.num_eval} · training labels: {evaluation.num_labels} · "
                 f"accuracy {f(r.get('accuracy'))} · macro-F1 {f(r.get('macro_f1'))} · "
                 f"macro-AUC {f(r.get('macro_auc'))} · kappa {f(r.get('cohen_kappa'))} · "
                 f"ECE {f(r.get('ece'))}"
                 + (f" (before temperature scaling {f(r['ece_before_scaling'])}, "
                    f"{_temperature(r.get('temperature'))})" if "ece_before_scaling" in r
                    else ""), "",
                 "| class | precision | recall | F1 | support | AUC | AP |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        # the matrix's order is class_names: a stored report's per_class mapping comes back
        # from PostgreSQL's jsonb with its keys reordered (by length), so never read the
        # order from it
        per_class = r.get("per_class", {})
        names = [n for n in (r.get("class_names") or list(per_class)) if n in per_class] \
            or list(per_class)
        for name in names:
            c = per_class[name]
            lines.append(f"| {name} | {f(c.get('precision'))} | {f(c.get('recall'))} | "
                         f"{f(c.get('f1'))} | {c.get('support')} | {f(c.get('auc'))} | "
                         f"{f(c.get('ap'))} |")
        matrix = r.get("confusion_matrix") or []
        missing = r.get("no_prediction") or [0] * len(matrix)
        unknown = r.get("unknown_classes") or []
        if unknown or any(missing):
            lines += ["", (f"Not learned yet by {model.version}: {', '.join(unknown)}. " if unknown
                           else "") + "These eval scans are counted as missed (wrong for "
                      "accuracy and kappa, recall 0 for their class) in every table below."
                      + (f" {sum(missing)} of them are of a label set {model.version} has no "
                         "head for: no prediction at all (the confusion matrix's last column, "
                         "never a class of another label set), and left out of ECE and NLL."
                         if any(missing) else "")]
        if matrix:
            columns = names + ([NO_PREDICTION] if any(missing) else [])
            lines += ["", "Confusion matrix (rows: truth, columns: prediction)", "",
                      "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
            lines += [f"| {n} | " + " | ".join(str(v) for v in row
                                                + ([missing[i]] if any(missing) else [])) + " |"
                      for i, (n, row) in enumerate(zip(names, matrix))]
        per_set = r.get("per_set") or {}
        if len(per_set) > 1:
            lines += ["", "| label set | n | accuracy | macro-F1 | macro-AUC | no prediction |",
                      "|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {s} | {v.get('num_eval')} | {f(v.get('accuracy'))} | "
                      f"{f(v.get('macro_f1'))} | {f(v.get('macro_auc'))} | "
                      f"{v.get('num_no_prediction', 0)} |" for s, v in per_set.items()]
        groups = r.get("per_group") or {}
        if groups:
            lines += ["", "| dataset | n | accuracy | macro-F1 | macro-AUC | no prediction |",
                      "|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {g} | {v.get('n')} | {f(v.get('accuracy'))} | {f(v.get('macro_f1'))} | "
                      f"{f(v.get('macro_auc'))} | {v.get('no_prediction', 0)} |"
                      for g, v in groups.items()]
        lines += ["", "Learning curve", "", "| labels | version | accuracy | macro-F1 | status |",
                  "|---:|---|---:|---:|---|"]
        lines += [f"| {p['labels']} | {p['version']} | {f(p['accuracy'])} | {f(p['macro_f1'])} | "
                  f"{p['status']} |" for p in curve]
        return "\n".join(lines)


def _temperature(value) -> str:
    """The report's temperature: one number (one network), or one per label set
    ({"Chest X-ray": 11.2, "Brain MRI": 8.29}: refit heads, one per set)."""
    def one(t) -> str:
        return f"{t:.2f}" if isinstance(t, (int, float)) and not isinstance(t, bool) else "—"

    if isinstance(value, dict):
        return "T per label set: " + ", ".join(f"{name} {one(t)}" for name, t in value.items())
    return f"T={one(1 if value is None else value)}"


def _findings_reports(model: ModelVersion) -> dict:
    """{findings set name: per-finding eval report} saved with the version (None: no eval)."""
    return {name: report for name, report in
            ((model.metrics or {}).get("training", {}).get("findings") or {}).items()}


def _findings_curve(project) -> list[dict]:
    rows = []
    for version in ModelVersion.objects.filter(project=project,
                                               kind=ModelVersion.Kind.CLASSIFIER
                                               ).order_by("created_at"):
        for name, report in _findings_reports(version).items():
            entry = next((e for e in (version.config or {}).get("findings_sets", [])
                          if e["name"] == name), {})
            rows.append({"version": version.version, "set": name,
                         "scans": entry.get("num_scans"), "status": version.status,
                         "macro_auc": report.get("macro_auc") if report else None,
                         "per_finding_auc": {n: r.get("auc") for n, r in
                                             (report or {}).get("per_finding", {}).items()}})
    return rows


def _findings_markdown(findings: dict, project) -> list[str]:
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for name, report in findings.items():
        lines += [f"## Findings: {name}", ""]
        if not report:
            lines += ["No labeled eval scans of this set: no per-finding evaluation.", ""]
            continue
        lines += [f"Eval scans: {report['num_scans']} · macro AUC {f(report['macro_auc'])} · "
                  f"micro AUC {f(report['micro_auc'])} · any-finding AUC "
                  f"{f(report['any_finding_auc'])} · macro AP {f(report['macro_ap'])} · "
                  f"macro F1 {f(report['macro_f1'])} · micro F1 {f(report['micro_f1'])} · "
                  f"macro ECE {f(report['macro_ece'])}", "",
                  "| finding | prevalence | AUC | AP | threshold | sensitivity | specificity "
                  "| PPV | F1 | ECE |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for finding, row in report["per_finding"].items():
            lines.append(f"| {finding} | {f(row['prevalence'])} ({row['positives']}) | "
                         f"{f(row['auc'])} | {f(row['ap'])} | {f(row['threshold'])} | "
                         f"{f(row['sensitivity'])} | {f(row['specificity'])} | "
                         f"{f(row['ppv'])} | {f(row['f1'])} | {f(row['ece'])} |")
        lines.append("")
    curve = _findings_curve(project)
    if curve:
        lines += ["Findings learning curve (macro AUC per version)", "",
                  "| set | scans | version | macro AUC | status |", "|---|---:|---|---:|---|"]
        lines += [f"| {c['set']} | {c['scans']} | {c['version']} | {f(c['macro_auc'])} | "
                  f"{c['status']} |" for c in curve]
    return lines
