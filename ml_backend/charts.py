"""Report charts as PNG bytes, and a 2-D projection of embeddings. Pure: numpy + matplotlib.

Every chart is drawn on its own ``matplotlib.figure.Figure`` with an Agg canvas, never through
``pyplot``: no global figure state, so concurrent requests in threads do not interfere.
Inputs are the plain lists and dicts of ``ml_backend.metrics.reports.classification_report``
(``None`` for undefined values) so the Django side only fetches and passes them on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "class_color",
    "confusion_matrix_png",
    "embedding_map_png",
    "learning_curve_png",
    "literal",
    "pca_2d",
    "per_site_png",
    "reliability_png",
]

FIGSIZE = (5.0, 4.0)
DPI = 100
UNLABELED = -1
# The confusion matrix's column for eval scans the model gave no prediction (not learned).
NO_PREDICTION = "no prediction (not learned)"
GREY = "#b8bec8"
# Colour-blind friendly (Okabe-Ito), then tab10 for the rest.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf"]


def class_color(index: int) -> str:
    """The colour of class ``index`` (stable across charts)."""
    return PALETTE[index % len(PALETTE)]


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" stamp: the same input gives the same bytes across matplotlib builds.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def literal(text: object) -> str:
    """``text`` escaped so matplotlib draws it as typed: every ``$`` becomes ``\\$``.

    Matplotlib reads a string with an even number of unescaped ``$`` as mathtext, so a class,
    data set or finding name such as ``T$_{1$ weighted`` would be set as maths or fail to
    parse (the chart could not be drawn). With every ``$`` escaped no string is mathtext:
    matplotlib unescapes the ``\\$`` and draws ``_``, ``^``, ``{`` and ``\\`` as they are.
    Every user-supplied text on a chart (titles, tick labels, legend entries) goes through
    here.
    """
    return str(text).replace("$", r"\$")


LABEL_CHARS = 28     # a tick label or legend entry longer than this is cut, with "…"


def cut(text: object, limit: int = LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with "…": a 200-character class name must not
    squeeze the plot into a corner (the page's tables carry the full names)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def short(text: object, limit: int = LABEL_CHARS) -> str:
    """A tick label: ``literal(cut(text))``."""
    return literal(cut(text, limit))


def _legend(ax, handles: list, labels: list[str], **kwargs) -> None:
    """A legend from explicit handles and labels: matplotlib drops automatic entries whose
    label starts with ``_``, which a class name may. Cut each name before adding a count."""
    if handles:
        ax.legend(handles, [literal(label) for label in labels], **kwargs)


# Drawn charts, kept per process by what they were drawn from: a page reload, or every
# reader of the project opening the reports page, draws each chart once (matplotlib takes
# 0.5-2 s a chart). Bounded in entries and bytes; the key is the inputs themselves, so a new
# model, label or scan is a new chart and nothing has to be invalidated.
_DRAWN: OrderedDict[bytes, bytes] = OrderedDict()
_DRAWN_LOCK = threading.Lock()
DRAWN_MAX_ENTRIES = 64
DRAWN_MAX_BYTES = 32 * 1024 * 1024


def _remembered(draw):
    @functools.wraps(draw)
    def cached(*args, **kwargs):
        try:
            key = hashlib.sha256(draw.__name__.encode() + pickle.dumps(
                (args, sorted(kwargs.items())), protocol=5)).digest()
        except (pickle.PicklingError, TypeError, AttributeError):
            return draw(*args, **kwargs)           # an input that cannot be keyed: draw
        with _DRAWN_LOCK:
            if key in _DRAWN:
                _DRAWN.move_to_end(key)
                return _DRAWN[key]
        value = draw(*args, **kwargs)
        for part in value if isinstance(value, tuple) else (value,):
            if isinstance(part, np.ndarray):
                part.flags.writeable = False       # shared by every caller from now on
        with _DRAWN_LOCK:
            _DRAWN[key] = value
            while len(_DRAWN) > DRAWN_MAX_ENTRIES or (
                    len(_DRAWN) > 1 and sum(map(_nbytes, _DRAWN.values())) > DRAWN_MAX_BYTES):
                _DRAWN.popitem(last=False)
        return value

    cached.uncached = draw
    return cached


def _nbytes(value) -> int:
    if isinstance(value, tuple):
        return sum(map(_nbytes, value))
    return int(getattr(value, "nbytes", None) or len(value))


def _finite(value) -> float:
    return float("nan") if value is None else float(value)


# --- confusion matrix -------------------------------------------------------------------


@_remembered
def confusion_matrix_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str], *,
                         no_prediction: Sequence[int] | None = None) -> bytes:
    """Counts with rows = truth and columns = prediction; cells shaded by the row fraction
    (recall) so small classes stay readable, each cell annotated with its count.

    ``no_prediction``: per true class, the scans the model gave no prediction (no head for
    their label set yet: the report's ``no_prediction``). When any, they get a last column
    of their own, "no prediction", never a class's column."""
    counts = np.asarray(matrix, dtype=np.int64)
    names = [short(n) for n in class_names]
    k = len(names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for {k} class names, "
                         f"got {counts.shape}")
    columns = list(names)
    if no_prediction is not None and any(no_prediction):
        extra = np.asarray(no_prediction, dtype=np.int64).reshape(-1)
        if extra.shape != (k,):
            raise ValueError(f"no_prediction must hold {k} counts, got {extra.shape}")
        counts = np.concatenate([counts, extra[:, None]], axis=1)
        columns.append(NO_PREDICTION)
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape, float), where=totals > 0)
    size = min(9.0, max(4.0, 2.5 + 0.6 * len(columns)))
    figure = _figure((size + 0.8, size))
    ax = figure.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} eval scans)")
    fontsize = 10 if k <= 6 else 8
    for i in range(k):
        for j in range(len(columns)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=fontsize,
                    color="white" if fraction[i, j] > 0.55 else "#1d2430")
    return _png(figure)


# --- learning curve ---------------------------------------------------------------------


@_remembered
def learning_curve_png(points: Sequence[Mapping], *, highlight: str | None = None) -> bytes:
    """Macro-F1, accuracy and macro-AUC against the number of training labels.

    ``points``: one dict per evaluated model version with ``labels``, ``macro_f1``,
    ``accuracy``, ``macro_auc`` (None allowed), ``promoted`` (bool) and ``version``.
    Promoted versions are filled markers, versions the gate held back are hollow;
    ``highlight`` rings the selected version.
    """
    figure = _figure()
    ax = figure.add_subplot()
    rows = sorted(points, key=lambda p: p["labels"])
    x = np.array([p["labels"] for p in rows], dtype=float)
    promoted = np.array([bool(p.get("promoted")) for p in rows], dtype=bool)
    series = [("macro_f1", "macro-F1", "#0072B2", "o"), ("accuracy", "accuracy", "#009E73", "s"),
              ("macro_auc", "macro-AUC", "#D55E00", "^")]
    for key, label, color, marker in series:
        y = np.array([_finite(p.get(key)) for p in rows], dtype=float)
        defined = np.isfinite(y)
        if not defined.any():
            continue
        ax.plot(x[defined], y[defined], color=color, linewidth=1.4, label=label, zorder=2)
        ax.scatter(x[promoted], y[promoted], color=color, marker=marker, s=36, zorder=3)
        ax.scatter(x[~promoted], y[~promoted], facecolors="white", edgecolors=color,
                   marker=marker, s=36, linewidths=1.4, zorder=3)
        if highlight is not None:
            chosen = np.array([p.get("version") == highlight for p in rows], dtype=bool)
            ax.scatter(x[chosen], y[chosen], facecolors="none", edgecolors="#1d2430",
                       s=150, linewidths=1.2, zorder=4)
    # Legend entries for the marker meaning, drawn off-axes.
    ax.scatter([], [], color="#6b7280", marker="o", s=36, label="promoted")
    ax.scatter([], [], facecolors="white", edgecolors="#6b7280", marker="o", s=36,
               linewidths=1.4, label="not promoted")
    if highlight is not None:
        ax.scatter([], [], facecolors="none", edgecolors="#1d2430", s=150, linewidths=1.2,
                   label=literal(f"selected ({highlight})"))
    ax.set_ylim(0.0, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(x):
        span = max(1.0, x.max() - x.min())
        ax.set_xlim(x.min() - 0.08 * span, x.max() + 0.08 * span)
    ax.set_xlabel("training labels")
    ax.set_ylabel("score on the eval split")
    ax.set_title(f"Learning curve ({len(rows)} model versions)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, ncols=2)
    return _png(figure)


# --- calibration ------------------------------------------------------------------------


@_remembered
def reliability_png(bins: Sequence[Mapping], ece: float | None,
                    ece_before: float | None = None, *, temperature: float | None = None,
                    title: str = "Reliability diagram", y_label: str = "accuracy",
                    x_label: str = "confidence (max class probability)") -> bytes:
    """Reliability diagram (Guo et al., 2017): per confidence bin, the accuracy (bar) against
    the mean confidence (the diagonal is perfect calibration); the gap to the diagonal is
    shaded; below, how many eval scans fall in each bin.

    ``bins``: ``reliability_bins`` output (``lower``, ``upper``, ``confidence``, ``accuracy``,
    ``count``).
    """
    figure = _figure((5.0, 4.6))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    lower = np.array([b["lower"] for b in bins], dtype=float)
    upper = np.array([b["upper"] for b in bins], dtype=float)
    width = upper - lower
    centers = (lower + upper) / 2
    counts = np.array([b["count"] for b in bins], dtype=int)
    accuracy = np.array([_finite(b.get("accuracy")) for b in bins], dtype=float)
    confidence = np.array([_finite(b.get("confidence")) for b in bins], dtype=float)
    filled = counts > 0

    top.plot([0, 1], [0, 1], linestyle="--", color="#6b7280", linewidth=1,
             label="perfect calibration")
    top.bar(centers[filled], accuracy[filled], width=width[filled] * 0.95, color="#0072B2",
            edgecolor="white", label="accuracy")
    gap_bottom = np.minimum(accuracy, confidence)[filled]
    gap_height = np.abs(confidence - accuracy)[filled]
    top.bar(centers[filled], gap_height, bottom=gap_bottom, width=width[filled] * 0.95,
            facecolor="none", edgecolor="#D55E00", hatch="///", linewidth=0.8,
            label="gap to mean confidence")
    top.scatter(centers[filled], confidence[filled], marker="_", s=180, color="#D55E00",
                linewidths=2, zorder=3, label="mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel(literal(y_label))
    parts = [f"ECE {ece:.3f}" if ece is not None else "ECE —"]
    if ece_before is not None:
        parts.append(f"before scaling {ece_before:.3f}")
    if temperature is not None:
        parts.append(f"T = {temperature:.2f}")
    top.set_title(literal(f"{title}: " + ", ".join(parts)), fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    top.grid(True, alpha=0.3)

    bottom.bar(centers, counts, width=width * 0.95, color="#6b7280")
    for c, n in zip(centers, counts):
        if n:
            bottom.text(c, n, str(n), ha="center", va="bottom", fontsize=7)
    bottom.set_ylim(0, max(1, counts.max(initial=0)) * 1.35)
    bottom.set_ylabel("scans")
    bottom.set_xlabel(literal(x_label))
    return _png(figure)


# --- per site ---------------------------------------------------------------------------


@_remembered
def per_site_png(groups: Mapping[str, Mapping]) -> bytes:
    """Accuracy, macro-F1 and macro-AUC per data set / site (``per_group`` of the report),
    horizontal bars labelled with the number of eval scans."""
    names = list(groups)
    if not names:
        raise ValueError("no groups to draw")
    height = min(10.0, max(2.8, 1.4 + 0.55 * len(names)))
    figure = _figure((5.0, height))
    ax = figure.add_subplot()
    y = np.arange(len(names), dtype=float)
    series = [("accuracy", "accuracy", "#009E73"), ("macro_f1", "macro-F1", "#0072B2"),
              ("macro_auc", "macro-AUC", "#D55E00")]
    bar = 0.8 / len(series)
    for i, (key, label, color) in enumerate(series):
        values = np.array([_finite(groups[n].get(key)) for n in names], dtype=float)
        offset = y + (i - 1) * bar
        ax.barh(offset, np.nan_to_num(values, nan=0.0), height=bar, color=color, label=label)
        for position, value in zip(offset, values):
            ax.text(0.01 if np.isnan(value) else min(value, 0.99) - 0.01, position,
                    "n/a" if np.isnan(value) else f"{value:.2f}", va="center",
                    ha="left" if np.isnan(value) else "right", fontsize=7,
                    color="#1d2430" if np.isnan(value) else "white")
    ax.set_yticks(y, [f"{short(n)}\n(n={groups[n].get('n', 0)})" for n in names],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score on the eval split")
    ax.set_title("Per data set / site")
    ax.grid(True, axis="x", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=3, fontsize=8)
    return _png(figure)


# --- embeddings -------------------------------------------------------------------------


@_remembered
def pca_2d(vectors: np.ndarray, *, max_points: int = 5000, seed: int = 0,
           normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Project ``(N, D)`` vectors onto their first two principal components (PCA by an
    eigendecomposition of the scatter matrix, or an SVD when D > N).

    Keeps at most ``max_points`` rows, drawn without replacement with ``seed`` (sorted, so
    the output order follows the input). Returns ``(xy, rows)``: ``xy`` is ``(M, 2)``
    float32 and ``rows`` the ``(M,)`` indices into ``vectors``. Deterministic: the sign of
    each component is fixed so its largest loading is positive (as sklearn's ``svd_flip``).
    ``normalize`` L2-normalises the rows first: the geometry of cosine similarity, which is
    what the FAISS index searches. Fewer than two dimensions or rows are padded with zeros.
    """
    data = np.asarray(vectors, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"vectors must have shape (N, D), got {data.shape}")
    if max_points < 1:
        raise ValueError("max_points must be >= 1")
    n = len(data)
    rows = np.arange(n)
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        data = data[rows]
    if normalize:
        norms = np.linalg.norm(data, axis=1, keepdims=True)
        data = np.divide(data, norms, out=np.zeros_like(data), where=norms > 0)
    xy = np.zeros((len(rows), 2), dtype=np.float32)
    if len(rows) < 2:
        return xy, rows
    centred = data - data.mean(axis=0)
    if centred.shape[1] <= centred.shape[0]:
        # The D x D scatter matrix's eigenvectors are the right singular vectors of the
        # centred data: much faster than a thin SVD for N = 5000, D = 512.
        values, vectors_ = np.linalg.eigh(centred.T @ centred)
        components = vectors_[:, np.argsort(values)[::-1][:2]].T
    else:
        components = np.linalg.svd(centred, full_matrices=False)[2][:2]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1.0
    components = components * signs[:, None]
    projected = centred @ components.T
    xy[:, :projected.shape[1]] = projected
    return xy, rows


# each class or cluster has its own shape as well as its colour: a reader who does not tell
# the colours apart (or prints the map in grey) still tells the groups apart
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


@_remembered
def embedding_map_png(xy: np.ndarray, labels: Sequence[int], names: Sequence[str],
                      title: str, *, colors: Sequence[str] | None = None,
                      unlabeled_name: str = "unlabeled") -> bytes:
    """Scatter of 2-D points coloured and shaped by class index (``labels[i]`` indexes ``names``, -1 is
    unlabeled and drawn grey underneath). ``colors`` (one per name) default to
    ``class_color`` so the same class has the same colour in every map."""
    if colors is not None and len(colors) != len(names):
        raise ValueError(f"{len(colors)} colours for {len(names)} class names")
    points = np.asarray(xy, dtype=float).reshape(-1, 2)
    classes = np.asarray(labels, dtype=int).reshape(-1)
    if len(classes) != len(points):
        raise ValueError(f"{len(classes)} labels for {len(points)} points")
    if len(classes) and classes.max(initial=UNLABELED) >= len(names):
        raise ValueError("a label indexes past the class names")
    figure = _figure()
    ax = figure.add_subplot()
    size = 14 if len(points) <= 1000 else 6
    grey = classes == UNLABELED
    handles, entries = [], []
    if grey.any():
        handles.append(ax.scatter(points[grey, 0], points[grey, 1], s=size, color=GREY,
                                  alpha=0.5, linewidths=0, rasterized=True))
        entries.append(f"{unlabeled_name} ({int(grey.sum())})")
    for index, name in enumerate(names):
        members = classes == index
        if not members.any():
            continue
        handles.append(ax.scatter(points[members, 0], points[members, 1], s=size * 1.6,
                                  color=colors[index] if colors else class_color(index),
                                  marker=MARKERS[index % len(MARKERS)],
                                  alpha=0.85, linewidths=0.3, edgecolors="white"))
        entries.append(f"{cut(name)} ({int(members.sum())})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(literal(title), fontsize=10)
    ax.grid(True, alpha=0.2)
    _legend(ax, handles, entries, loc="best", fontsize=7, markerscale=1.5, framealpha=0.85)
    return _png(figure)

