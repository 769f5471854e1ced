"""Answers from a model version, one scan or image at a time, through ONE bounded cache.

Suggestions on the label page, similar scans, class candidates, novelty, Grad-CAM,
classifying an uploaded image and Label Studio's ``/ml/predict`` all load a version's
checkpoint, heads, embeddings and FAISS index through ``cache``: keyed by model version and
artifact, bounded (``ML_CACHE_SIZE`` entries, least recently used first out), re-read when
the file changes. A linear-head version answers from stored embeddings with numpy alone;
torch is imported only when a network has to run (a fine-tuned classifier, Grad-CAM, an
image that was never embedded).
"""

from __future__ import annotations

import io
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from django.conf import settings

from annotator.models import Annotation, LabelClass, LabelSet, Project, Scan
from annotator.selectors import class_label_sets
from annotator.storage import media_path
from ml_backend.data.arrays import load_images
from ml_backend.errors import ModelUnavailable, TrainingError
from ml_backend.index.unit_rows import UnitRows
from ml_backend.models import ModelVersion
from ml_backend.services.artifacts import checkpoint_path, embeddings_paths, images_for

Predictor = Callable[[list[Scan]], np.ndarray]


def _ssl():
    """The SimCLRv2 core (imports torch): only where a network runs."""
    from ml_backend.ssl import train

    return train


class ModelCache:
    """Loaded artifacts of model versions, keyed by (version, artifact name), least recently
    used first out. An entry is re-read when its file changes (an encoder's embeddings and
    index grow as scans are embedded). Thread-safe; loading happens outside the lock."""

    def __init__(self, size: int):
        self.size = max(int(size), 1)
        self._entries: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.counts: Counter = Counter()

    def get(self, model: ModelVersion, name: str, load: Callable[[Path], Any], *,
            stamp: Any = None) -> Any:
        """The artifact ``name`` of ``model`` (a file under its folder, loaded by ``load``).
        A derived entry passes its own ``stamp``: it is rebuilt when the stamp changes."""
        path = checkpoint_path(model, name)
        if stamp is None:
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                raise ModelUnavailable(f"{model.version} has no {name} (its files are missing: "
                                       "restore them or train a new version)") from None
        key = (model.pk, model.version, str(model.artifact_dir), name)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == stamp:
                self._entries.move_to_end(key)
                self.counts["hits"] += 1
                return hit[1]
        try:
            value = load(path)
        except ModelUnavailable:
            raise
        except Exception as exc:   # a damaged or foreign file: the caller says so in words
            raise ModelUnavailable(f"{model.version}: {name} could not be read "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from exc
        with self._lock:
            self.counts["loads"] += 1
            self.counts[f"loads:{name.split(':')[0]}"] += 1
            self._entries[key] = (stamp, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.counts.clear()

    def __len__(self) -> int:
        return len(self._entries)


cache = ModelCache(getattr(settings, "ML_CACHE_SIZE", 12))


# --- the artifacts, loaded once -------------------------------------------------------------


def embed_scales(encoder: ModelVersion) -> tuple[int, ...]:
    """The sizes ``encoder`` embeds scans at, as multiples of its training size (its
    config's ``embed_scales``; an encoder made before them embeds at its training size)."""
    return tuple((encoder.config or {}).get("embed_scales") or (1,))


def embed_layers(encoder: ModelVersion) -> tuple[int, ...]:
    """The residual stages ``encoder`` pools into its embeddings (its config's
    ``embed_layers``; an encoder made before them pools its output alone: ``(4,)``)."""
    return tuple((encoder.config or {}).get("embed_layers") or (4,))


def encoder_network(encoder: ModelVersion):
    """(SimCLR model, its PretrainConfig) of an encoder version, as it embeds scans: read at
    each of its ``embed_scales`` (the config's image size is then the largest: what
    ``images_for`` loads), pooled from each of its ``embed_layers``."""
    scales, layers = embed_scales(encoder), embed_layers(encoder)
    return cache.get(encoder, "encoder.pt",
                     lambda path: _ssl().load_pretrained(path, scales=scales, layers=layers))


def classifier_network(model: ModelVersion):
    """(network, PretrainConfig) of a fine-tuned or distilled classifier version."""
    return cache.get(model, "classifier.pt", lambda path: _ssl().load_classifier(path))


def vector_index(encoder: ModelVersion):
    """The FAISS index of an encoder's embeddings."""
    from ml_backend.index.faiss_index import VectorIndex

    if not embeddings_paths(encoder)["index"].exists():
        raise TrainingError("no embeddings yet: run `manage.py embed`")
    return cache.get(encoder, "index.faiss", VectorIndex.load)


@dataclass(frozen=True)
class EmbeddingTable:
    ids: np.ndarray                 # scan ids, one per row
    vectors: np.ndarray             # (N, D) float32, memory-mapped
    row: dict[int, int]             # scan id -> row
    thumbs: np.ndarray | None = None    # (N, P) float32, memory-mapped; None before them
    # unit-length copies of the rows searches score again and again (the labeled scans)
    unit: UnitRows | None = None

    def of(self, scan_ids: list[int]) -> np.ndarray:
        return np.asarray(self.vectors[[self.row[i] for i in scan_ids]], dtype=np.float32)

    def thumbs_of(self, scan_ids: list[int]) -> np.ndarray:
        return np.asarray(self.thumbs[[self.row[i] for i in scan_ids]], dtype=np.float32)


def embedding_table(encoder: ModelVersion) -> EmbeddingTable:
    """The encoder's stored embeddings (re-read when ``scan_ids.npy``, written last, changes)."""
    paths = embeddings_paths(encoder)
    if not paths["ids"].exists():
        raise TrainingError(f"{encoder.version} has no embeddings: run `manage.py embed`")

    def load(ids_path: Path) -> EmbeddingTable:
        ids = np.load(ids_path)
        vectors = np.load(paths["vectors"], mmap_mode="r")
        if len(vectors) < len(ids):
            raise ModelUnavailable(f"{encoder.version}: embeddings and scan ids disagree "
                                   "(re-run `manage.py embed --full`)")
        thumbs = None
        if paths["thumbs"].exists():
            thumbs = np.load(paths["thumbs"], mmap_mode="r")
            if len(thumbs) < len(ids):          # from before the last embed: not trusted
                thumbs = None
        return EmbeddingTable(ids=ids, vectors=vectors, thumbs=thumbs,
                              row={int(scan_id): i for i, scan_id in enumerate(ids)},
                              unit=UnitRows(vectors, max_bytes=settings.ML_SIMILAR_CACHE_MB
                                            * 2 ** 20))
    return cache.get(encoder, "scan_ids.npy", load)


def vectors_for(encoder: ModelVersion, scans: list[Scan]) -> np.ndarray:
    table = embedding_table(encoder)
    missing = [s.pk for s in scans if s.pk not in table.row]
    if missing:
        raise TrainingError(f"scans {missing[:10]} are not embedded yet: run `manage.py embed`")
    return table.of([s.pk for s in scans])


def is_calibrated(model: ModelVersion, label_set_id: int | None) -> bool:
    """Whether the probabilities ``model`` gives a scan of this label set were calibrated: a
    refit head only once its set had enough labels for the out-of-fold temperature (below
    that it keeps T = 1, and its 0.99 means little); a network once temperature-scaled."""
    config = model.config or {}
    if config.get("kind") == "head":
        entry = next((e for e in config.get("label_sets", []) if e.get("id") == label_set_id),
                     None)
        return bool(entry and entry.get("calibrated_on"))
    return bool(config.get("temperature") or config.get("calibrated_on"))


def head_inputs_for(encoder: ModelVersion, scans: list[Scan], pixels: dict | None
                    ) -> np.ndarray:
    """What a refit head of a version reads for ``scans``: the stored embeddings, and their
    thumbnails beside them when the version's heads were fit with a pixel block
    (``pixels``: the version config's ``{"side", "weight"}``, or None)."""
    from ml_backend.active.features import head_inputs

    vectors = vectors_for(encoder, scans)
    if not pixels:
        return vectors
    table = embedding_table(encoder)
    if table.thumbs is None:
        raise TrainingError(f"{encoder.version} has no scan thumbnails yet: run "
                            "`manage.py embed`")
    return head_inputs(vectors, table.thumbs_of([s.pk for s in scans]))


def embedding_rows(network, images: np.ndarray, config, **kwargs) -> np.ndarray:
    """``float32 (N, D + P)``: each image's embedding, then its thumbnail
    (``features.thumbnails``) — one array, so a chunk computed on any worker carries both
    (``spread``); ``split_rows`` takes them apart."""
    from ml_backend.active.features import PIXEL_SIDE, thumbnails

    vectors = np.asarray(_ssl().embed(network.encoder, images, config, **kwargs), np.float32)
    return np.hstack([vectors, thumbnails(images, PIXEL_SIDE)])


def split_rows(rows: np.ndarray, feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``embedding_rows`` → (vectors, thumbnails), both float32."""
    rows = np.asarray(rows, np.float32)
    return rows[:, :feature_dim], rows[:, feature_dim:]


def embed_images(encoder: ModelVersion, images_png_or_paths: list) -> np.ndarray:
    """Embed images that have no stored vector (an upload, a scan imported since the last
    embed) with the encoder's network."""
    simclr, config = encoder_network(encoder)
    return _ssl().embed(simclr.encoder, load_images(images_png_or_paths, config.image_size, config.channels),
                        config)


# --- predictors ---------------------------------------------------------------------------


class _PreviewFile:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class ScanRef(NamedTuple):
    """A scan as a whole-pool pass reads it: id, label set, patient and preview file (what
    heads, networks and strategies need), not a model instance: a pool can hold 100,000s,
    and instantiating them costs more than the model's work (issue 21)."""

    pk: int
    label_set_id: int | None
    patient_key: str
    preview_name: str

    @property
    def preview(self) -> _PreviewFile:       # as ``Scan.preview.name`` reads
        return _PreviewFile(self.preview_name)


def scan_refs(queryset) -> list[ScanRef]:
    """``queryset``'s scans (in its order) as ``ScanRef``."""
    make = ScanRef._make
    return [make(row) for row in queryset.values_list("pk", "label_set_id", "patient_key",
                                                      "preview")]


def allowed_classes(scans: list[Scan], classes: list[int]) -> list[set[int]]:
    """For each scan, the model's classes that apply to it (its label set's)."""
    class_set = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "label_set_id"))
    return [{c for c in classes if class_set.get(c) == s.label_set_id} for s in scans]


def cnn_predictor(classifier, pconfig, classes: list[int], temperature: float = 1.0, *,
                  model: ModelVersion | None = None) -> Predictor:
    """A network with one softmax over every class, restricted to each scan's label set.
    With the ``model`` version whose saved network it is, a long list (the whole pool) is
    scored in chunks every train worker helps with (ml_backend/services/spread.py)."""
    from ml_backend.active.refit import restrict_to_sets

    def predict(scans: list[Scan], *, calibrated: bool = True) -> np.ndarray:
        t = temperature if calibrated else 1.0
        if model is not None and settings.SPREAD_CHUNK_SIZE and \
                len(scans) > settings.SPREAD_CHUNK_SIZE:
            from ml_backend.services.spread import spread

            from ml_backend.metrics.reports import retemper

            proba = retemper(spread(model, "predict", scans), t)  # softmax(z / T) from softmax(z)
        else:
            proba = _ssl().predict_proba(classifier, images_for(scans, pconfig.image_size,
                                                                pconfig.channels), pconfig,
                                         temperature=t)
        return restrict_to_sets(proba, classes, allowed_classes(scans, classes))
    return predict


def classifier_classes(model: ModelVersion) -> list[dict]:
    """The classes a classifier version scores, in its output order (its config's
    ``classes``: ``{"id", "name", ...}``; empty for a findings-only version). Raises
    ModelUnavailable in words when the version is not a usable classifier: an encoder made
    the active model, a config without its classes."""
    config = model.config if isinstance(model.config, dict) else {}
    classes = config.get("classes")
    if model.kind != ModelVersion.Kind.CLASSIFIER:
        raise ModelUnavailable(f"{model.version} is an encoder, not a classifier: it cannot "
                               "suggest classes (an admin makes one of the project's "
                               "classifier versions active)")
    if not isinstance(classes, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) for c in classes) or (
            not classes and not config.get("findings_sets")):
        raise ModelUnavailable(f"{model.version}'s config does not list its classes: it "
                               "cannot be used (an admin makes another classifier version "
                               "active, or refit)")
    return classes


def version_heads(model: ModelVersion):
    """The per-label-set heads of a 'head' version (a version from before label sets has
    one head for all its classes, in ``head.npz``)."""
    from ml_backend.active.refit import LinearHead, SetHeads

    classes = [c["id"] for c in classifier_classes(model)]
    configs = model.config.get("label_sets")
    if configs is None:  # one head, saved before label sets existed
        head = cache.get(model, "head.npz", LinearHead.load)
        set_ids = set(LabelClass.objects.filter(pk__in=classes)
                      .values_list("label_set_id", flat=True))
        return SetHeads(heads={set_id: head for set_id in set_ids}, class_ids=classes)
    return SetHeads(heads={c["id"]: cache.get(model, c["head"], LinearHead.load)
                           for c in configs}, class_ids=classes)


def predictor_for(model: ModelVersion) -> Predictor:
    """A classifier version's predict function, from its cached artifacts."""
    classes = [c["id"] for c in classifier_classes(model)]
    if model.config.get("kind") == "head":
        heads, encoder = version_heads(model), model.parent
        pixels = model.config.get("pixels")
        return lambda scans, calibrated=True: heads.predict_proba(
            head_inputs_for(encoder, scans, pixels), [s.label_set_id for s in scans],
            calibrated=calibrated)
    classifier, pconfig = classifier_network(model)
    return cnn_predictor(classifier, pconfig, classes, model.config.get("temperature") or 1.0,
                         model=model)


# --- one scan at a time: Grad-CAM and classifying an uploaded image (the clinician UI) ------


class _Explainer:
    """What one classifier version needs to score and explain single images."""

    def __init__(self, model: ModelVersion):
        self.class_ids = [c["id"] for c in classifier_classes(model)]
        self.model = model
        self.finding_ids: list[int] = []
        if model.config.get("kind") in ("finetuned-findings", "distilled-findings"):
            from ml_backend.ssl.train import load_classifier

            entry = model.config["findings_sets"][0]
            self.heads = None
            self.classifier, self.config = cache.get(model, entry["net"], load_classifier)
            self.encoder = self.classifier.encoder
            self.finding_ids = [f["id"] for f in entry["findings"]]
            self.temperature = 1.0
        elif model.config.get("kind") == "head":
            self.heads = version_heads(model)
            simclr, self.config = encoder_network(model.parent)
            self.encoder = simclr.encoder
            self.pixels = model.config.get("pixels")
        else:
            self.heads = None
            classifier, self.config = classifier_network(model)
            self.classifier = classifier
            self.encoder = classifier.encoder
            self.temperature = model.config.get("temperature") or 1.0

    def classes_of(self, label_set_id: int) -> list[int]:
        class_set = class_label_sets(self.model.project_id)
        return [c for c in self.class_ids if class_set.get(c) == label_set_id]

    def proba(self, images: np.ndarray, label_set_id: int) -> np.ndarray:
        """Calibrated probabilities over the model's classes, restricted to one label set,
        exactly as the stored predictions are computed."""
        from ml_backend.active.refit import restrict_to_sets

        if self.heads is not None:
            from ml_backend.active.features import head_inputs, thumbnails

            x = _ssl().embed(self.encoder, images, self.config)
            if self.pixels:
                x = head_inputs(x, thumbnails(images, self.pixels["side"]))
            return self.heads.predict_proba(x, [label_set_id] * len(images))
        proba = _ssl().predict_proba(self.classifier, images, self.config,
                                  temperature=self.temperature)
        allowed = set(self.classes_of(label_set_id))
        return restrict_to_sets(proba, self.class_ids, [allowed] * len(images))

    def cam(self, image: np.ndarray, class_id: int, method: str = "layercam") -> np.ndarray:
        from ml_backend.explain import gradcam, head_score

        network = self._finding_network(class_id) if class_id not in self.class_ids else None
        if network is not None:            # a finding scored by a network beside class heads
            classifier, config, index = network
            score = lambda pooled: classifier.fc(  # noqa: E731
                classifier.head(pooled, upto=classifier.from_head_layer))
            return gradcam(classifier.encoder, image, config.augment_config(), score, index,
                           method=method)
        finding = self._finding_head(class_id) if class_id not in self.class_ids else None
        encoder = self.encoder
        if class_id in self.finding_ids:   # a finding of a fine-tuned findings network
            classifier = self.classifier
            score = lambda pooled: classifier.fc(  # noqa: E731
                classifier.head(pooled, upto=classifier.from_head_layer))
            index = self.finding_ids.index(class_id)
        elif finding is not None:          # a finding: its own binary head's logit
            head, index = finding
            encoder, block = self._cam_encoder()
            score = head_score(head.mean[block], head.scale[block], head.coef[:, block],
                               head.intercept)
        elif class_id not in self.class_ids:
            raise TrainingError(f"class {class_id} is not one this model predicts")
        elif self.heads is not None:
            head = next((h for h in self.heads.heads.values()
                         if class_id in [int(c) for c in h.class_ids]), None)
            if head is None:
                raise TrainingError(f"class {class_id} has no head in {self.model.version}")
            # the embedding's part of the logit (of its largest view, when it reads several
            # sizes): a pixel block adds a constant per image, which no map can show
            encoder, block = self._cam_encoder()
            score = head_score(head.mean[block], head.scale[block], head.coef[:, block],
                               head.intercept)
            index = [int(c) for c in head.class_ids].index(class_id)
        else:
            classifier = self.classifier
            score = lambda pooled: classifier.fc(  # noqa: E731
                classifier.head(pooled, upto=classifier.from_head_layer))
            index = self.class_ids.index(class_id)
        return gradcam(encoder, image, self.config.augment_config(), score, index,
                       method=method)

    def _cam_encoder(self):
        """(the encoder a map of a linear head is drawn through, the head's columns it
        feeds): a multi-scale encoder's largest view — the scan at the size it is loaded
        at — and that view's block of the encoder's output (stage 4; the columns of other
        stages pooled beside it do not enter the map)."""
        from ml_backend.ssl.encoder import MultiScaleEncoder

        if isinstance(self.encoder, MultiScaleEncoder):
            return self.encoder.inner, self.encoder.block(self.encoder.scales[-1], 4)
        return self.encoder, slice(0, self.encoder.feature_dim)

    def _finding_network(self, finding_id: int):
        """``(network, its config, column)`` of a finding scored by a findings network in a
        version that also holds class heads (a mixed project), else None."""
        if self.finding_ids:               # a findings-network version: handled by cam()
            return None
        from ml_backend.ssl.train import load_classifier

        for entry in self.model.config.get("findings_sets", []):
            ids = [f["id"] for f in entry["findings"]]
            if "net" in entry and finding_id in ids:
                classifier, config = cache.get(self.model, entry["net"], load_classifier)
                return classifier, config, ids.index(finding_id)
        return None

    def _finding_head(self, finding_id: int):
        """``(findings head, column)`` of a finding the version learned, else None."""
        from ml_backend.services.findings import findings_head

        for entry in self.model.config.get("findings_sets", []):
            if any(f["id"] == finding_id for f in entry["findings"]):
                head = findings_head(self.model, entry["id"])
                ids = [int(i) for i in head.finding_ids] if head is not None else []
                return (head, ids.index(finding_id)) if finding_id in ids else None
        return None


def scan_gradcam(*, scan: Scan, class_id: int, model: ModelVersion | None = None) -> bytes:
    """An RGBA overlay PNG (the preview's size) of where ``model`` sees ``class_id`` in
    ``scan`` (LayerCAM, see ml_backend/explain.py). Cached per scan, class and model version
    in the version's artifact folder: a version never changes, so neither does its map.
    Raises TrainingError when there is no model, the class does not apply to the scan (a
    class of another label set: refused as an answer with it is) or is not one of the model's."""
    from PIL import Image

    from ml_backend.explain import overlay_png

    label_class = (LabelClass.objects.select_related("label_set")
                   .filter(pk=class_id, project_id=scan.project_id).first())
    if label_class is None:
        raise TrainingError(f"class {class_id} is not a class of this project")
    if label_class.label_set_id != scan.label_set_id:
        if scan.label_set_id is None:
            raise TrainingError("no label set applies to this scan: an admin must assign its "
                                "dataset, modality or body part to a label set")
        raise TrainingError(f"class {label_class.name!r} does not apply to this scan: it "
                            f"belongs to the label set {label_class.label_set.name!r}, the "
                            f"scan to {scan.label_set.name!r}")
    model = model or scan.project.active_model
    if model is None:
        raise TrainingError("no classifier yet: label some scans first")
    cached = Path(model.artifact_dir) / "cam" / f"{scan.pk}-{int(class_id)}.png"
    if cached.exists():
        return cached.read_bytes()
    explainer = _Explainer(model)
    image = images_for([scan], explainer.config.image_size, explainer.config.channels)[0]
    with Image.open(media_path(scan.preview.name)) as preview:
        width, height = preview.size
    png = overlay_png(explainer.cam(image, class_id), width, height)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # one temporary name per thread: two requests for the same map at once each write their own
    tmp = cached.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{cached.name}")
    tmp.write_bytes(png)
    tmp.replace(cached)
    return png


def classify_image(*, project: Project, preview_png: bytes, label_set=None, k: int = 6) -> dict:
    """Score one decoded image (its display PNG) with the project's active classifier on the
    classes of ``label_set`` (the project's first set by default): probability for every
    class of the set (0 for one the model has not learned yet), how unlike the project's
    scans of that set it is (novelty), the Grad-CAM overlay of the predicted class, and the
    ``k`` most similar labeled scans of the set. Nothing is stored."""
    from PIL import Image

    from ml_backend.explain import overlay_png

    project = Project.objects.select_related("active_model", "active_encoder").get(pk=project.pk)
    label_set = label_set or project.label_sets.order_by("order", "pk").first()
    model = project.active_model
    if model is None:
        raise TrainingError("this project has no classifier yet: label some scans first")
    if not isinstance(label_set, LabelSet) or label_set.project_id != project.pk:
        raise TrainingError("choose one of this project's label sets")
    explainer = _Explainer(model)
    set_classes = list(label_set.classes.order_by("order", "name"))
    known = set(explainer.classes_of(label_set.pk))
    if not known:
        raise TrainingError(f"the model has not learned the label set {label_set.name!r} yet: "
                            "label scans of at least two of its classes")
    image = load_images([preview_png], explainer.config.image_size, explainer.config.channels)
    proba = explainer.proba(image, label_set.pk)[0]
    p_of = {cid: float(p) for cid, p in zip(explainer.class_ids, proba.tolist())}
    ranked = sorted(((c.pk, c.name, p_of.get(c.pk, 0.0), c.pk in known) for c in set_classes),
                    key=lambda row: -row[2])
    best_id, best_name, best_p, _ = ranked[0]
    with Image.open(io.BytesIO(preview_png)) as preview:
        width, height = preview.size
    overlay = overlay_png(explainer.cam(image[0], best_id), width, height)
    similar, novelty = [], None
    encoder = project.active_encoder
    if encoder is not None and embeddings_paths(encoder)["index"].exists():
        simclr, config = encoder_network(encoder)
        vector = _ssl().embed(simclr.encoder, load_images([preview_png], config.image_size, config.channels), config)
        from ml_backend.services.embeddings import novelty_of_vectors

        novelty = novelty_of_vectors(encoder, vector, label_set=label_set, project=project)[0]
        labeled = list(Annotation.objects.filter(
            scan__project=project, scan__label_set=label_set, outcome=Annotation.Outcome.LABEL)
            .values_list("scan_id", flat=True).distinct())
        if labeled:
            hits = vector_index(encoder).search(
                vector, k, allowed_ids=labeled)[0]
            by_id = Scan.objects.in_bulk([scan_id for scan_id, _ in hits])
            label_names: dict[int, str] = {}
            for scan_id, name in (Annotation.objects.filter(
                    scan_id__in=list(by_id), outcome=Annotation.Outcome.LABEL)
                    .order_by("-created_at").values_list("scan_id", "label_class__name")):
                label_names.setdefault(scan_id, name)
            similar = [{"scan": by_id[i], "similarity": float(s), "label": label_names.get(i)}
                       for i, s in hits if i in by_id and not by_id[i].quarantined]
    return {"model": model, "label_set": label_set,
            "predicted": {"class_id": best_id, "name": best_name, "confidence": best_p},
            "probabilities": [{"class_id": cid, "name": name, "p": p, "learned": learned}
                              for cid, name, p, learned in ranked],
            "overlay_png": overlay, "similar": similar, "novelty": novelty,
            "calibrated": is_calibrated(model, label_set.pk)}
