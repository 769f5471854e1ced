"""SimCLRv2 label-efficiency benchmark: does the self-supervised encoder beat raw pixels?

    python -m bench.ssl_eval --train ../shared/data/brain_mri/Training --eval split:0.2 \\
        --labels-fraction 0.01,0.1,1.0 --seeds 3 --image-size 64 --epochs 20 \\
        --out bench/results/brain_mri.json

``--train`` / ``--eval`` take anything ``read_source`` accepts (a class-folder path,
``file.npz#split``, a ``filename,label`` CSV). ``--eval split:F`` holds out a stratified
fraction ``F`` of the train spec instead, grouped so that near-duplicate scans (average
hashes within Hamming distance 4) never straddle the split.

Steps: decode every scan once (cached as .npz in ``--cache-dir``), pretrain SimCLRv2 once on
all train images (labels unused; the checkpoint is cached by data digest + config), then for
each label fraction and seed compare, on the same stratified labeled subset:

- ``pixels_logreg``   raw-pixel logistic regression (the floor to beat);
- ``supervised``      the same network trained from random weights on the labels only;
- ``linear_probe``    logistic regression on the frozen SimCLRv2 encoder features;
- ``hybrid_probe``    the refit's head (``fit_head`` with ``features.block_weights``, no
                      calibration) on those features and a 16 x 16 thumbnail of the pixels
                      side by side (``--hybrid-pixels SIDE:WEIGHT``);
- ``refit_head``      the refit's head exactly as the product fits it: balanced, calibrated,
                      and keeping the thumbnail only where it predicts the labels better out
                      of fold (``fit_head_choosing_block``);
- ``simclr_finetune`` SimCLRv2 step 2, LP-FT by default (see --finetune-* options);
- ``simclr_distill``  self-distillation of that model on all train images + the labels.

Label-free numbers (kNN accuracy and k-means purity of the raw embeddings) show what the
representation holds before any labels. Results: a table on stdout and a JSON file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ml_backend.active.features import (PIXEL_SIDE, PIXEL_WEIGHT, block_weights, head_inputs,
                                        thumbnails)
from ml_backend.active.threads import one_blas_thread
from ml_backend.active.refit import (
    PRODUCT_BALANCE,
    PRODUCT_PROTOTYPE_N0,
    fit_head,
    fit_head_choosing_block,
)
from ml_backend.data.arrays import as_channels, to_square
from ml_backend.data.datasets import read_source
from ml_backend.data.decode import ScanDecodeError, decode_scan
from ml_backend.index.faiss_index import kmeans
from ml_backend.metrics.reports import classification_report
from ml_backend.data.findings import is_findings_source
from ml_backend.ssl.config import (BATCHNORM_MODES, SSL_METHODS, check_layers, check_scales,
                                    network_config)
from ml_backend.ssl.encoder import at_scales
from ml_backend.ssl.train import (
    DistillConfig,
    FinetuneConfig,
    PretrainConfig,
    SimCLRModel,
    distill,
    embed,
    finetune,
    config_from_dict,
    load_checkpoint,
    load_pretrained,
    pick_device,
    predict_proba,
    pretrain,
)

METHODS = ["pixels_logreg", "supervised", "linear_probe", "hybrid_probe", "refit_head",
           "simclr_finetune", "simclr_distill"]
CACHE_VERSION = "1"
HASH_DISTANCE = 4
MIN_CORRELATION = 0.95


def log(message: str) -> None:
    print(message, flush=True)


# --- arguments -------------------------------------------------------------------------


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError("label fractions must be in (0, 1]")
    return values


def parse_augment_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of ``--augment``: a number, a pair ``a,b`` or yes/no, checked against
    AugmentConfig's fields."""
    from ml_backend.ssl.transforms import AugmentConfig

    name, sep, value = text.partition("=")
    if not sep or name not in AugmentConfig.__dataclass_fields__ or name in ("size", "channels",
                                                                              "colour"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE with FIELD an "
                                         "augmentation setting, e.g. brightness=0")
    try:
        if value.lower() in ("yes", "no"):
            return name, value.lower() == "yes"
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be a number, a pair a,b "
                                         "or yes/no") from None
    return name, parts[0] if len(parts) == 1 else tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ssl_eval",
        description="SimCLRv2 vs. raw pixels and supervised training at several label fractions.")
    parser.add_argument("--train", required=True, help="train source spec (folder, npz#split, CSV)")
    parser.add_argument("--eval", required=True,
                        help="eval source spec, or split:F to hold out a grouped stratified "
                             "fraction F of --train")
    parser.add_argument("--labels-fraction", type=parse_fractions, default=[0.01, 0.1, 1.0],
                        help="comma-separated fractions of train labels (default 0.01,0.1,1.0)")
    parser.add_argument("--seeds", type=int, default=3, help="labeled subsets per fraction")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", choices=["auto", "1", "3"], default="auto",
                        help="model input: 3 = colour (RGB), 1 = greyscale (colour sources "
                        "become luma; run both to measure what colour is worth); auto = the "
                        "train source's own")
    parser.add_argument("--colour-augment", choices=["stain", "jitter", "none"], default="stain",
                        help="colour input only: H&E stain (HED) jitter plus bounded "
                        "hue/saturation, the bounded jitter alone, or none")
    parser.add_argument("--augment", action="append", default=[], metavar="FIELD=VALUE",
                        type=parse_augment_override,
                        help="pretraining augmentation override, repeatable, e.g. "
                             "brightness=0 contrast=1,1 gamma=1,1 (fields of AugmentConfig)")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--small-input", choices=["auto", "yes", "no"], default="auto",
                        help="CIFAR-style 3x3 stem without max-pool (auto: size <= 64)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="pretraining epochs (0 with --init-checkpoint: that encoder as is)")
    parser.add_argument("--init-checkpoint", default=None,
                        help="start pretraining from this encoder (e.g. the shipped starter, "
                             "ml_backend/starter/simclr-resnet18-64px.pt); with --epochs 0 it "
                             "is evaluated as is, at its own image size and stem")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="pretraining on a CPU: bf16 autocast where the CPU has native bf16 "
                             "(the product's default), or float32")
    parser.add_argument("--methods", default="simclr",
                        help=f"self-supervised methods to compare, comma-separated, of "
                             f"{','.join(SSL_METHODS)} (same data, epochs, batch and seeds; "
                             "with several, one JSON per method: OUT-METHOD.json)")
    parser.add_argument("--queue-size", type=int, default=PretrainConfig.queue_size,
                        help="moco: 0 (default) = MoCo v3's symmetric in-batch loss; N = "
                             "MoCo v2's queue of N negatives")
    parser.add_argument("--evaluations", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (the pixel floor "
                             "and supervised rows run with the first method only)")
    parser.add_argument("--hybrid-pixels", default=None, metavar="SIDE:WEIGHT",
                        help="hybrid_probe's pixel block: thumbnail side and weight against the "
                             "embedding (default: the refit's, ml_backend.active.features)")
    parser.add_argument("--batch-size", type=int, default=256, help="pretraining batch size")
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--finetune-batch-size", type=int, default=64)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr,
                        help="fine-tuning learning rate of the last layer")
    parser.add_argument("--finetune-head-init", choices=["probe", "random"],
                        default=FinetuneConfig.head_init,
                        help="probe: LP-FT (fit the last layer on frozen features first); "
                             "random: plain SimCLRv2 step 2")
    parser.add_argument("--finetune-backbone-lr-scale", type=float,
                        default=FinetuneConfig.backbone_lr_scale,
                        help="encoder learning rate = lr * this (fine-tuning and distillation)")
    parser.add_argument("--finetune-batchnorm", choices=list(BATCHNORM_MODES),
                        default=FinetuneConfig.batchnorm,
                        help="BatchNorm statistics while fine-tuning and distilling: the "
                             "encoder's, kept (default); set on the labeled scans, then kept; "
                             "or updated by every batch")
    parser.add_argument("--finetune-from-head-layer", type=int,
                        default=FinetuneConfig.from_head_layer,
                        help="0: the encoder's output; 1: SimCLRv2's first projection layer")
    parser.add_argument("--finetune-augment", choices=["yes", "no"],
                        default="yes" if FinetuneConfig.augment else "no",
                        help="light crops/affine/intensity while fine-tuning")
    parser.add_argument("--finetune-input-scale", type=int, choices=[1, 2, 3, 4],
                        default=FinetuneConfig.input_scale,
                        help="the fine-tuned network (and its student) reads each scan at this "
                             "multiple of the encoder's training size (the product's "
                             "`finetune --input-scale`)")
    parser.add_argument("--finetune-class-balance", choices=["weighted_loss", "sampler", "none"],
                        default=FinetuneConfig.class_balance,
                        help="a rare class while fine-tuning: inverse-frequency loss weights "
                             "(default), a sampler that draws classes evenly, or neither")
    parser.add_argument("--distill-augment", choices=["yes", "no"],
                        default="yes" if DistillConfig.augment else "no",
                        help="the same augmentation on the student's inputs while distilling "
                             "(the teacher's soft labels come from clean scans)")
    parser.add_argument("--distill-epochs", type=int, default=10)
    parser.add_argument("--distill-pool", choices=["train", "train+eval"], default="train",
                        help="the scans whose teacher soft labels the student learns: the "
                             "train scans, or the train and eval scans (never the eval "
                             "labels) -- transductive, as the product distils on the "
                             "project's whole pool, the scans it will predict included")
    parser.add_argument("--teacher-views", type=int, default=DistillConfig.teacher_views,
                        help="the teacher's soft labels averaged over the clean scan and N-1 "
                             "lightly augmented views")
    parser.add_argument("--distill-temperature", type=float, default=DistillConfig.temperature)
    parser.add_argument("--teacher-temperature", type=float, default=None,
                        help="the teacher's temperature for its soft labels (default: "
                             "--distill-temperature); lower sharpens them")
    parser.add_argument("--labeled-weight", type=float, default=DistillConfig.labeled_weight)
    parser.add_argument("--student-init", choices=["teacher", "pretrained"],
                        default=DistillConfig.student_init,
                        help="the distilled student starts as its teacher, or from the "
                             "pretrained encoder with a random last layer")
    parser.add_argument("--embed-scales", default="1",
                        help="the embedding reads each scan at these multiples of the "
                             "encoder's size, side by side (the product's "
                             "MEDLABEL_EMBED_SCALES, default there 1,2): linear_probe, "
                             "hybrid_probe, refit_head and the label-free rows")
    parser.add_argument("--embed-layers", default="4",
                        help="the encoder's residual stages pooled into the embedding at "
                             "each size, side by side (the product's MEDLABEL_EMBED_LAYERS, "
                             "default there 3,4; 4: the encoder's output alone)")
    parser.add_argument("--cache-dir", default="bench/cache")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default="bench/results/ssl_eval.json")
    parser.add_argument("--dup-hash-distance", type=int, default=HASH_DISTANCE,
                        help="split:F only: average-hash Hamming distance that links two "
                             "scans as near-duplicates (default 4)")
    parser.add_argument("--dup-min-correlation", type=float, default=MIN_CORRELATION,
                        help="split:F only: minimum 32x32 thumbnail correlation that confirms "
                             "a hash match (default 0.95; -1 trusts the hash alone)")
    parser.add_argument("--uncertain", choices=["ignore", "zeros", "ones"], default="ignore",
                        help="findings sources: uncertain train answers are left out of the "
                             "fit (default), read as absent (U-Zeros) or present (U-Ones)")
    parser.add_argument("--min-positives", type=int, default=5,
                        help="findings sources: a second macro AUC over the findings with at "
                             "least this many eval positives (default 5)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="stratified subsample of the train set")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="stratified subsample of the eval set")
    return parser


# --- loading ---------------------------------------------------------------------------


def _spec_key(spec: str) -> str:
    """The spec with its path made absolute, so the cache key does not depend on the cwd."""
    path, sep, rest = spec.partition("#")
    return str(Path(path).resolve()) + sep + rest


def to_uint8_square(pixels: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """A decoded ``[0, 1]`` image (grey or RGB) as ``uint8 (S, S)`` (``channels=1``: colour
    becomes luma) or ``(S, S, 3)`` (``channels=3``: grey is replicated)."""
    image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return np.asarray(to_square(image, size, channels), dtype=np.uint8)


def source_channels(spec: str) -> int:
    """3 when the source's first decodable labelled item is colour, else 1 (``--channels
    auto``)."""
    for item in read_source(spec).items[:20]:
        try:
            decoded = decode_scan(item.load(), name=item.name, salt="bench")
        except (ScanDecodeError, OSError):
            continue
        return 3 if decoded.meta.get("colour") == "colour" else 1
    return 1


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_spec(spec: str, image_size: int, cache_dir: Path, channels: int = 1) -> dict:
    """Decode a source spec to ``uint8 (N, S, S)`` (``channels=1``) or ``(N, S, S, 3)``
    (``channels=3``) + string labels, cached in ``cache_dir``.

    Items without a label, or that fail to decode, are skipped and counted.
    """
    listing = read_source(spec)
    colour_key = "" if channels == 1 else f"|c{channels}"
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{_spec_key(spec)}|{len(listing.items)}|{image_size}{colour_key}".encode()
    ).hexdigest()[:20]
    path = cache_dir / f"data-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            result = {name: data[name] for name in data.files}
        log(f"{spec}: {len(result['images'])} scans from cache {path.name}")
        return {"images": result["images"], "labels": result["labels"], "names": result["names"],
                "unlabeled": int(result["unlabeled"]), "failed": int(result["failed"]),
                "cached": True}
    started = time.perf_counter()
    images, labels, names, unlabeled, failed = [], [], [], 0, 0
    for item in listing.items:
        if item.label is None:
            unlabeled += 1
            continue
        try:
            decoded = decode_scan(item.load(), name=item.name, salt="bench")
        except (ScanDecodeError, OSError) as exc:
            failed += 1
            log(f"  skip {item.name}: {exc}")
            continue
        images.append(to_uint8_square(decoded.pixels, image_size, channels))
        labels.append(item.label)
        names.append(item.name)
    if unlabeled:
        log(f"warning: {spec}: skipped {unlabeled} item(s) without a label")
    if failed:
        log(f"warning: {spec}: skipped {failed} item(s) that could not be decoded")
    if not images:
        raise SystemExit(f"{spec}: no labelled scans could be read")
    result = {"images": np.stack(images), "labels": np.array(labels, dtype=str),
              "names": np.array(names, dtype=str), "unlabeled": unlabeled, "failed": failed}
    _atomic_savez(path, **{k: np.asarray(v) for k, v in result.items()})
    log(f"{spec}: decoded {len(images)} scans in {time.perf_counter() - started:.1f}s "
        f"(cached as {path.name})")
    return {**result, "cached": False}


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified sample of ``count`` (at least one per class).

    Per-class quotas are proportional (largest remainder), never below 1 nor above the
    class size.
    """
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse)
    count = int(min(max(count, len(classes)), len(labels)))
    exact = sizes / sizes.sum() * count
    quota = np.clip(np.floor(exact).astype(int), 1, sizes)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while quota.sum() < count:
        for c in order:
            if quota.sum() >= count:
                break
            if quota[c] < sizes[c]:
                quota[c] += 1
    while quota.sum() > count:  # minimum-1 rule overshot: take from the largest quotas
        c = int(np.argmax(np.where(quota > 1, quota, -1)))
        quota[c] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=quota[c], replace=False)
              for c in range(len(classes))]
    return np.sort(np.concatenate(chosen))


# --- near-duplicate grouping -------------------------------------------------------------


def average_hash(images: np.ndarray) -> np.ndarray:
    """64-bit average hash per image: 8x8 area downscale, thresholded at its mean.

    ``images``: ``uint8 (N, H, W)`` (or ``(N, H, W, 3)``, hashed on its luma) → ``uint64 (N,)``.
    """
    images = as_channels(images, 1) if images.ndim == 4 else images
    small = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.Resampling.BOX),
                                 dtype=np.float32) for im in images]) if len(images) else \
        np.zeros((0, 8, 8), np.float32)
    bits = (small > small.mean(axis=(1, 2), keepdims=True)).reshape(len(images), 64)
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def _unit_thumbnails(images: np.ndarray, side: int = 32) -> np.ndarray:
    """Zero-mean, unit-norm ``float32 (N, side*side)`` thumbnails: their dot products are
    Pearson correlations."""
    images = as_channels(images, 1) if images.ndim == 4 else images
    side = min(side, images.shape[1]) if len(images) else side
    thumbs = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BOX),
                                  dtype=np.float32) for im in images]).reshape(len(images), -1)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-6)
    return thumbs


def near_duplicate_groups(images: np.ndarray, max_distance: int = HASH_DISTANCE,
                          min_correlation: float | None = MIN_CORRELATION) -> np.ndarray:
    """Group ids ``int64 (N,)``: near-duplicate scans share a group (union-find, so the
    relation is transitive).

    Two scans are linked when their 64-bit average hashes differ in at most ``max_distance``
    bits and, unless ``min_correlation`` is None, the Pearson correlation of their 32x32
    thumbnails is at least ``min_correlation``. The check is needed on brain MRI: an 8x8
    average hash mostly encodes "bright oval on black", so on the 2,870 Training scans the
    hash alone links 390k pairs (two thirds across classes) and transitivity merges 92% of
    the set into one group; with the check, groups stay small and hold the
    real duplicates and neighbouring slices (largest 11 scans at 64 px, 73 at 32 px).
    """
    n = len(images)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    hashes = average_hash(images)
    thumbs = _unit_thumbnails(images) if min_correlation is not None else None
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for start in range(0, n, 512):  # (512, N) blocks keep memory small
        block = slice(start, start + 512)
        linked = np.bitwise_count(hashes[block, None] ^ hashes[None, :]) <= max_distance
        if thumbs is not None:
            linked &= thumbs[block] @ thumbs.T >= min_correlation
        rows, cols = np.nonzero(linked)
        rows = rows + start
        upper = rows < cols
        for i, j in zip(rows[upper].tolist(), cols[upper].tolist()):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def grouped_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, eval_idx)``: about ``fraction`` held out, stratified by label, no group
    on both sides (one fold of ``StratifiedGroupKFold`` with ``round(1/fraction)`` folds)."""
    if not 0 < fraction < 1:
        raise SystemExit(f"split fraction must be in (0, 1), got {fraction}")
    folds = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, eval_idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(train_idx), np.sort(eval_idx)


def load_data(args) -> dict:
    """Train and eval arrays, class names and a description of how they were made."""
    cache_dir = Path(args.cache_dir)
    channels = resolve_channels(args)
    train = load_spec(args.train, args.image_size, cache_dir, channels)
    big = args.image_size * embed_scales(args)[-1]
    # the sizes besides the encoder's that something reads: the largest embedding size and
    # the fine-tuned network's (--finetune-input-scale)
    other = sorted({big, args.image_size * getattr(args, "finetune_input_scale", 1)}
                   - {args.image_size})
    keys = ("images", "labels", "names") + tuple(f"images_{size}" for size in other)
    for size in other:
        # the same scans at the larger size, decoded from the source (not the small images
        # enlarged: the finer view is the point), selected with the same indices
        train[f"images_{size}"] = _same_scans(train, load_spec(args.train, size, cache_dir,
                                                               channels))
    info = {"train_spec": args.train, "eval_spec": args.eval,
            "train_unlabeled_skipped": train["unlabeled"], "train_failed": train["failed"]}
    if args.eval.startswith("split:"):
        try:
            fraction = float(args.eval.split(":", 1)[1])
        except ValueError:
            raise SystemExit(f"--eval {args.eval!r}: expected split:FRACTION") from None
        groups = near_duplicate_groups(
            train["images"], getattr(args, "dup_hash_distance", HASH_DISTANCE),
            getattr(args, "dup_min_correlation", MIN_CORRELATION))
        train_idx, eval_idx = grouped_holdout(train["labels"], groups, fraction)
        sizes = np.bincount(groups)
        info.update({"split": fraction, "near_duplicate_groups": int(len(sizes)),
                     "scans_in_duplicate_groups": int(sizes[sizes > 1].sum()),
                     "held_out_fraction": len(eval_idx) / len(groups)})
        log(f"split {fraction:g}: {len(sizes)} groups over {len(groups)} scans "
            f"({info['scans_in_duplicate_groups']} in near-duplicate groups); "
            f"{len(train_idx)} train / {len(eval_idx)} eval")
        evaluation = {k: train[k][eval_idx] for k in keys}
        train = {k: train[k][train_idx] for k in keys}
    else:
        evaluation = load_spec(args.eval, args.image_size, cache_dir, channels)
        for size in other:
            evaluation[f"images_{size}"] = _same_scans(
                evaluation, load_spec(args.eval, size, cache_dir, channels))
        info.update({"eval_unlabeled_skipped": evaluation["unlabeled"],
                     "eval_failed": evaluation["failed"]})
    class_names = sorted(set(train["labels"].tolist()))
    if len(class_names) < 2:
        raise SystemExit("the train set needs at least 2 classes")
    known = np.isin(evaluation["labels"], class_names)
    if not known.any():
        # before any training: a withheld split saved under another name once lost all its
        # scans here and crashed after a 25-minute pretraining
        raise SystemExit(
            f"--eval {args.eval}: none of its {len(known)} scans has a class of --train "
            f"(train: {', '.join(class_names)}; eval: "
            f"{', '.join(sorted(set(evaluation['labels'].tolist()))[:10])}). For a MedMNIST "
            "archive named otherwise, name the set: FILE.npz#test?set=pneumoniamnist")
    if not known.all():
        log(f"warning: dropped {int((~known).sum())} eval scan(s) whose class is not in train")
        evaluation = {k: evaluation[k][known] for k in keys}
        info["eval_unknown_class_dropped"] = int((~known).sum())
    if args.max_train and args.max_train < len(train["labels"]):
        keep = stratified_subset(train["labels"], args.max_train, seed=0)
        train = {k: train[k][keep] for k in keys}
    if args.max_eval and args.max_eval < len(evaluation["labels"]):
        keep = stratified_subset(evaluation["labels"], args.max_eval, seed=0)
        evaluation = {k: evaluation[k][keep] for k in keys}
    index = {name: i for i, name in enumerate(class_names)}
    y_train = np.array([index[v] for v in train["labels"]], dtype=np.int64)
    y_eval = np.array([index[v] for v in evaluation["labels"]], dtype=np.int64)
    info.update({"num_train": len(y_train), "num_eval": len(y_eval), "class_names": class_names,
                 "channels": channels,
                 "train_counts": np.bincount(y_train, minlength=len(class_names)).tolist(),
                 "eval_counts": np.bincount(y_eval, minlength=len(class_names)).tolist()})
    at = {args.image_size: (train["images"], evaluation["images"]),
          **{size: (train[f"images_{size}"], evaluation[f"images_{size}"]) for size in other}}
    return {"x_train": train["images"], "y_train": y_train, "x_eval": evaluation["images"],
            "y_eval": y_eval, "class_names": class_names, "info": info,
            "x_train_big": at[big][0], "x_eval_big": at[big][1], "at_size": at}


def network_arrays(data: dict, config: PretrainConfig, ft_config: FinetuneConfig
                   ) -> tuple[PretrainConfig, np.ndarray, np.ndarray]:
    """The fine-tuned network's config and the train / eval scans at its size
    (``--finetune-input-scale`` times the encoder's)."""
    net = network_config(config, ft_config.input_scale)
    if net.image_size not in data["at_size"]:
        raise SystemExit(f"no scans loaded at {net.image_size} px: pass the same "
                         "--finetune-input-scale to load_data's args")
    return (net, *data["at_size"][net.image_size])


def embed_scales(args) -> tuple[int, ...]:
    """``--embed-scales``: the sizes the encoder's embeddings read each scan at, as
    multiples of its training size (the product's MEDLABEL_EMBED_SCALES)."""
    try:
        return check_scales(str(getattr(args, "embed_scales", "1")).split(","))
    except ValueError as exc:
        raise SystemExit(f"--embed-scales: {exc}") from None


def embed_layers(args) -> tuple[int, ...]:
    """``--embed-layers``: the encoder's residual stages each embedding pools (the
    product's MEDLABEL_EMBED_LAYERS)."""
    try:
        return check_layers(str(getattr(args, "embed_layers", "4")).split(","))
    except ValueError as exc:
        raise SystemExit(f"--embed-layers: {exc}") from None


def _same_scans(small: dict, big: dict) -> np.ndarray:
    """``big``'s images in ``small``'s order (both decoded from one source)."""
    if len(big["names"]) != len(small["names"]) or (big["names"] != small["names"]).any():
        raise SystemExit("the source decoded to different scans at two sizes")
    return big["images"]


# --- pretraining (cached) --------------------------------------------------------------


def resolve_channels(args) -> int:
    """``--channels``: 1, 3, or auto (the train source's own: colour keeps colour)."""
    choice = getattr(args, "channels", "1")
    if choice == "auto":
        choice = args.channels = str(source_channels(args.train))
        log(f"--channels auto: {choice} ({'colour' if choice == '3' else 'grey'} train source)")
    return int(choice)


def pretrain_config(args) -> PretrainConfig:
    if args.epochs == 0:
        if not args.init_checkpoint:
            raise SystemExit("--epochs 0 needs --init-checkpoint (the encoder to evaluate)")
        return config_from_dict(PretrainConfig, load_checkpoint(args.init_checkpoint)["config"])
    small = {"auto": None, "yes": True, "no": False}[args.small_input]
    return PretrainConfig(arch=args.arch, image_size=args.image_size, small_input=small,
                          epochs=args.epochs, batch_size=args.batch_size, seed=0,
                          method=getattr(args, "method", "simclr"),
                          queue_size=getattr(args, "queue_size", PretrainConfig.queue_size),
                          cpu_bf16=getattr(args, "precision", "bf16") == "bf16",
                          channels=resolve_channels(args),
                          colour_augment=getattr(args, "colour_augment", "stain"),
                          augment=dict(getattr(args, "augment", None) or []))


def encoder_checkpoint_path(cache_dir: Path, images: np.ndarray, config: PretrainConfig) -> Path:
    digest = hashlib.sha256()
    digest.update(f"{images.dtype.str}{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    return cache_dir / f"encoder-{digest.hexdigest()[:20]}.pt"


def _print_pretrain_progress(event: dict) -> None:
    if event.get("stage") == "pretrain" and event["step"] == event["steps"]:
        log(f"  pretrain epoch {event['epoch']}/{event['epochs']}  loss {event['loss']:.4f}  "
            f"{event['images_per_s']:.0f} images/s")


def get_encoder(images: np.ndarray, config: PretrainConfig, cache_dir: Path,
                device: str | None, init: str | None = None,
                epochs: int | None = None) -> tuple[SimCLRModel, dict]:
    """Pretrain (from ``init`` when given), or reuse a finished checkpoint made from the same
    images, config and initial encoder; ``epochs == 0``: ``init`` as is."""
    if epochs == 0:
        model, _ = load_pretrained(init)
        log(f"pretrain: none; evaluating {init} as is")
        return model, {"encoder_cached": False, "checkpoint": str(init), "seconds": 0.0,
                       "images_per_s": None, "history": [], "init_checkpoint": str(init)}
    path = encoder_checkpoint_path(cache_dir, images, config)
    if init:
        digest = hashlib.sha256(Path(init).read_bytes()).hexdigest()[:12]
        path = path.with_name(path.stem + f"-from-{digest}.pt")
    if path.exists():
        state = load_checkpoint(path)
        if state.get("epoch") == config.epochs and state.get("config") == asdict(config):
            model, _ = load_pretrained(path)
            log(f"pretrain: reusing cached encoder {path.name}")
            return model, {"encoder_cached": True, "checkpoint": str(path), "seconds": 0.0,
                           "images_per_s": None, "history": state.get("history", [])}
    log(f"pretrain: {len(images)} scans, {config.epochs} epoch(s), batch {config.batch_size}, "
        f"{config.arch} at {config.image_size}px")
    started = time.perf_counter()
    metrics = pretrain(images, config, checkpoint_path=path, model_version="bench-ssl-eval",
                       device=device, progress=_print_pretrain_progress, init_checkpoint=init)
    seconds = time.perf_counter() - started
    model, _ = load_pretrained(path)
    history = metrics["history"]
    trained = sum(h["images_per_s"] * h["seconds"] for h in history)
    return model, {"encoder_cached": False, "checkpoint": str(path), "seconds": seconds,
                   "images_per_s": trained / max(sum(h["seconds"] for h in history), 1e-9),
                   "history": history, "note": metrics.get("note", "")}


# --- methods ---------------------------------------------------------------------------


@one_blas_thread
def logreg_proba(x_train, y_train, x_eval, num_classes: int, seed: int) -> np.ndarray:
    """Standardised features + class-balanced logistic regression → ``(N, C)`` proba."""
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(class_weight="balanced", max_iter=2000,
                                             random_state=seed))
    model.fit(x_train, y_train)
    proba = np.zeros((len(x_eval), num_classes))
    proba[:, model.classes_] = model.predict_proba(x_eval)
    return proba


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def hybrid_pixels(args) -> tuple[int, float]:
    """``--hybrid-pixels SIDE:WEIGHT`` → (side, weight)."""
    text = getattr(args, "hybrid_pixels", None) or f"{PIXEL_SIDE}:{PIXEL_WEIGHT:g}"
    try:
        side, weight = text.split(":")
        side, weight = int(side), float(weight)
    except ValueError:
        raise SystemExit(f"--hybrid-pixels {text!r}: expected SIDE:WEIGHT, e.g. 16:1") from None
    if side < 1 or weight <= 0:
        raise SystemExit("--hybrid-pixels: SIDE >= 1 and WEIGHT > 0")
    return side, weight


def finetune_config(args, seed: int = 0) -> FinetuneConfig:
    return FinetuneConfig(epochs=args.finetune_epochs, batch_size=args.finetune_batch_size,
                          seed=seed, from_head_layer=args.finetune_from_head_layer,
                          lr=args.finetune_lr, augment=args.finetune_augment == "yes",
                          head_init=args.finetune_head_init,
                          backbone_lr_scale=args.finetune_backbone_lr_scale,
                          batchnorm=args.finetune_batchnorm,
                          class_balance=args.finetune_class_balance,
                          input_scale=args.finetune_input_scale)


def distill_config(args, seed: int = 0) -> DistillConfig:
    return DistillConfig(epochs=args.distill_epochs, batch_size=args.batch_size, seed=seed,
                         lr=args.finetune_lr, student_init=args.student_init,
                         teacher_views=args.teacher_views,
                         temperature=args.distill_temperature,
                         teacher_temperature=getattr(args, "teacher_temperature", None),
                         labeled_weight=args.labeled_weight,
                         augment=args.distill_augment == "yes",
                         backbone_lr_scale=args.finetune_backbone_lr_scale,
                         batchnorm=args.finetune_batchnorm)


def run_methods(data: dict, subset: np.ndarray, seed: int, encoder: SimCLRModel,
                config: PretrainConfig, embeddings: dict, args) -> dict:
    """Every method on one labeled subset: ``{method: (proba, seconds)}``."""
    x, y = data["x_train"][subset], data["y_train"][subset]
    num_classes = len(data["class_names"])
    ft_config = finetune_config(args, seed)
    out = {}

    wanted = (set(args.evaluations.split(",")) if getattr(args, "evaluations", None)
              else set(METHODS))
    if "simclr_distill" in wanted:
        wanted.add("simclr_finetune")          # the student needs its teacher

    def timed(name, fn):
        if name not in wanted:
            return
        started = time.perf_counter()
        out[name] = (fn(), time.perf_counter() - started)

    timed("pixels_logreg", lambda: logreg_proba(pixels(x), y, pixels(data["x_eval"]),
                                                num_classes, seed))

    def supervised():
        torch.manual_seed(seed)
        scratch = SimCLRModel(config)  # random weights: no pretraining, plain training
        plain = replace(ft_config, head_init="random", backbone_lr_scale=1.0,
                        batchnorm="train", input_scale=1)
        model, _ = finetune(scratch, config, x, y, num_classes, plain, device=args.device)
        return predict_proba(model, data["x_eval"], config, device=args.device)

    timed("supervised", supervised)
    timed("linear_probe", lambda: logreg_proba(embeddings["train"][subset], y,
                                               embeddings["eval"], num_classes, seed))
    teacher = {}

    net, net_train, net_eval = network_arrays(data, config, ft_config)

    def simclr_finetune():
        teacher["model"], _ = finetune(encoder, config, net_train[subset], y, num_classes,
                                       ft_config, device=args.device)
        return predict_proba(teacher["model"], net_eval, net, device=args.device)

    def hybrid_head(product: bool):
        side, weight = hybrid_pixels(args)
        train_x = head_inputs(embeddings["train"][subset], thumbnails(x, side))
        dim = embeddings["train"].shape[1]
        weights = block_weights(dim, train_x.shape[1] - dim, weight)
        if product:
            head, _ = fit_head_choosing_block(train_x, y, seed=seed, embedding_dim=dim,
                                              feature_weights=weights,
                                              prototype_n0=PRODUCT_PROTOTYPE_N0,
                                              balance=PRODUCT_BALANCE)
        else:
            head, _ = fit_head(train_x, y, seed=seed, folds=0, feature_weights=weights)
        proba = np.zeros((len(data["x_eval"]), num_classes))
        proba[:, head.class_ids] = head.predict_proba(
            head_inputs(embeddings["eval"], thumbnails(data["x_eval"], side)),
            calibrated=product)
        return proba

    timed("hybrid_probe", lambda: hybrid_head(False))
    timed("refit_head", lambda: hybrid_head(True))
    timed("simclr_finetune", simclr_finetune)

    def simclr_distill():
        d_config = distill_config(args, seed)
        pool = net_train     # the student reads at its teacher's size
        if getattr(args, "distill_pool", "train") == "train+eval":
            pool = np.concatenate([pool, net_eval])
        student, _ = distill(teacher["model"], encoder, net, pool, d_config,
                             labeled=net_train[subset], labels=y, device=args.device)
        return predict_proba(student, net_eval, net, device=args.device)

    timed("simclr_distill", simclr_distill)
    return out


def summarise(report: dict) -> dict:
    keep = ("accuracy", "macro_f1", "weighted_f1", "cohen_kappa", "macro_auc", "macro_ap",
            "ece", "nll", "num_samples", "confusion_matrix")
    return {**{k: report[k] for k in keep},
            "per_class": {name: {k: row[k] for k in ("precision", "recall", "f1", "support",
                                                      "auc")}
                          for name, row in report["per_class"].items()}}


# --- label-free ------------------------------------------------------------------------


def knn_accuracy(train_x, train_y, eval_x, eval_y, k: int = 20) -> float:
    """Majority vote of the ``k`` nearest train vectors by cosine similarity (ties: the class
    with the larger summed similarity)."""
    def unit(v):
        v = np.asarray(v, dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    k = min(k, len(train_x))
    sims = unit(eval_x) @ unit(train_x).T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    num_classes = int(max(train_y.max(), eval_y.max())) + 1
    votes = np.zeros((len(eval_x), num_classes))
    weight = np.zeros_like(votes)
    rows = np.repeat(np.arange(len(eval_x)), k)
    np.add.at(votes, (rows, train_y[top].ravel()), 1.0)
    np.add.at(weight, (rows, train_y[top].ravel()), np.take_along_axis(sims, top, 1).ravel())
    predicted = np.argmax(votes + 1e-6 * weight / (np.abs(weight).max() + 1e-12), axis=1)
    return float((predicted == eval_y).mean())


def cluster_purity(vectors: np.ndarray, labels: np.ndarray, k: int, seed: int = 0) -> dict:
    _, assignments, _ = kmeans(np.ascontiguousarray(vectors, dtype=np.float32), k, seed=seed,
                               nredo=3)
    table = np.zeros((k, int(labels.max()) + 1))
    np.add.at(table, (assignments, labels), 1)
    return {"purity": float(table.max(axis=1).sum() / len(labels)),
            "nmi": float(normalized_mutual_info_score(labels, assignments)), "k": k}


# k-means settles in a different local minimum per seed (purity moved by up to 0.06 between
# seeds on brain MRI with k = 4), so every label-free figure is a mean over these seeds.
CLUSTER_SEEDS = 5
# The product's cluster view (annotator "Clusters" page, services.embeddings.scan_clusters)
# opens with k = 8: the label-free figures are given there too, beside k = the classes.
VIEW_K = 8


def cluster_purity_seeds(vectors: np.ndarray, labels: np.ndarray, k: int,
                         seeds: int = CLUSTER_SEEDS) -> dict:
    """``cluster_purity`` over ``seeds`` k-means seeds: mean purity and NMI, with their sd."""
    runs = [cluster_purity(vectors, labels, k, seed=s) for s in range(seeds)]
    purity, nmi = [r["purity"] for r in runs], [r["nmi"] for r in runs]
    return {"purity": float(np.mean(purity)), "purity_std": float(np.std(purity)),
            "nmi": float(np.mean(nmi)), "nmi_std": float(np.std(nmi)), "k": k, "seeds": seeds}


def label_free(train_x, train_y, eval_x, eval_y, num_classes: int, view_k: int = VIEW_K
               ) -> dict:
    """kNN@20 accuracy (train embeddings vote for each eval scan), and k-means purity / NMI
    of the eval embeddings with k = the number of classes and k = ``view_k``."""
    row = {"knn_k": 20, "knn_accuracy": knn_accuracy(train_x, train_y, eval_x, eval_y, 20),
           "kmeans": cluster_purity_seeds(eval_x, eval_y, min(num_classes, len(eval_x)))}
    if view_k and view_k != num_classes:
        row["kmeans_view"] = cluster_purity_seeds(eval_x, eval_y, min(view_k, len(eval_x)))
    return row


def label_free_with_thumbnails(embeddings: dict, data: dict, num_classes: int) -> dict:
    """The product's cluster view clusters the embedding and each scan's 16 px thumbnail side
    by side, standardised over the project's scans (``features.cluster_inputs``): that row,
    standardised over the train and eval scans together (one project), and beside it the
    standardised thumbnail alone, the floor that input has to beat besides the raw pixels."""
    from ml_backend.active.features import PIXEL_SIDE, cluster_inputs, thumbnails

    count = len(data["x_train"])
    thumbs = np.concatenate([thumbnails(data["x_train"], PIXEL_SIDE),
                             thumbnails(data["x_eval"], PIXEL_SIDE)]).astype(np.float64)
    both = cluster_inputs(np.concatenate([embeddings["train"], embeddings["eval"]]), thumbs)
    spread = thumbs.std(axis=0)
    spread[spread < 1e-8] = 1.0
    alone = ((thumbs - thumbs.mean(axis=0)) / spread).astype(np.float32)
    return {name: label_free(x[:count], data["y_train"], x[count:], data["y_eval"], num_classes)
            for name, x in (("embedding+thumbnail (cluster view)", both),
                            ("thumbnail, standardised", alone))}


# --- aggregation and output -----------------------------------------------------------------


def aggregate(runs: list[dict], fractions: list[float]) -> dict:
    result = {}
    for fraction in fractions:
        per_method = {}
        for method in METHODS:
            rows = [r for r in runs if r["fraction"] == fraction and r["method"] == method]
            if not rows:
                continue                        # not asked for (--evaluations)
            stats = {"runs": len(rows)}
            # ece / nll: the calibration of the probabilities a reader would be shown
            for metric in ("accuracy", "macro_f1", "macro_auc", "ece", "nll"):
                values = [r["metrics"].get(metric) for r in rows
                          if r["metrics"].get(metric) is not None]
                stats[metric] = {
                    "mean": float(np.mean(values)) if values else None,
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else
                    (0.0 if values else None)}
            per_method[method] = stats
        result[f"{fraction:g}"] = per_method
    return result


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "    n/a      "
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def format_table(aggregates: dict, labeled_counts: dict, label_free_rows: dict) -> str:
    lines = [f"{'fraction':>8}  {'labels':>6}  {'method':<16}  {'accuracy':<13}  "
             f"{'macro-F1':<13}  {'AUC':<13}"]
    lines.append("-" * len(lines[0]))
    for fraction, methods in aggregates.items():
        for method, stats in methods.items():
            lines.append(f"{fraction:>8}  {labeled_counts[fraction]:>6}  {method:<16}  "
                         f"{_cell(stats['accuracy'])}  {_cell(stats['macro_f1'])}  "
                         f"{_cell(stats['macro_auc'])}")
    for name, row in label_free_rows.items():
        clusters = ", ".join(
            f"k-means (k={c['k']}) purity {c['purity']:.3f} ± {c.get('purity_std', 0):.3f}, "
            f"NMI {c['nmi']:.3f}" for c in (row["kmeans"], row.get("kmeans_view")) if c)
        lines.append(f"label-free ({name}): kNN@{row['knn_k']} accuracy "
                     f"{row['knn_accuracy']:.3f}, {clusters}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def machine_info(device: torch.device) -> dict:
    info = {"torch_device": device.type, "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    started = time.perf_counter()
    device = pick_device(args.device)
    args.device = device.type
    cache_dir = Path(args.cache_dir)
    log(f"device {device.type}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")

    bad = set(args.evaluations.split(",")) - set(METHODS)
    if bad:
        raise SystemExit(f"--evaluations: unknown {sorted(bad)}; choose from "
                         f"{', '.join(METHODS)}")
    hybrid_pixels(args)                       # a bad --hybrid-pixels: refused before any work
    embed_scales(args)                        # and a bad --embed-scales
    embed_layers(args)                        # or --embed-layers
    methods = args.methods.split(",")
    bad = set(methods) - set(SSL_METHODS)
    if bad:
        raise SystemExit(f"--methods: unknown {sorted(bad)}; choose from {', '.join(SSL_METHODS)}")
    args.method = methods[0]
    if is_findings_source(args.train):      # several findings per scan: bench.findings_eval
        from bench.findings_eval import run_findings

        return run_findings(args, cache_dir, device, started)
    config = pretrain_config(args)
    args.image_size = config.image_size          # --epochs 0: the checkpoint's own size
    data = load_data(args)
    log(f"classes {data['class_names']}: {data['info']['num_train']} train / "
        f"{data['info']['num_eval']} eval scans")
    out = Path(args.out)
    evaluations = args.evaluations
    for index, method in enumerate(methods):
        args.method = method
        if index == 1:      # the pixel floor and supervised training do not depend on the method
            args.evaluations = ",".join(m for m in evaluations.split(",")
                                        if m not in ("pixels_logreg", "supervised"))
        path = out if len(methods) == 1 else out.with_name(f"{out.stem}-{method}{out.suffix}")
        run_method(args, data, pretrain_config(args), cache_dir, device, path, started)
    args.evaluations = evaluations
    return 0


def embed_sets(encoder: SimCLRModel, data: dict, config: PretrainConfig, args) -> dict:
    """``{"train", "eval"}`` embeddings, read at ``--embed-scales`` from ``--embed-layers``
    as the product does."""
    scales, layers = embed_scales(args), embed_layers(args)
    if scales == (1,) and layers == (4,):
        return {"train": embed(encoder.encoder, data["x_train"], config, device=args.device),
                "eval": embed(encoder.encoder, data["x_eval"], config, device=args.device)}
    reader, big = at_scales(encoder.encoder, config, scales, layers)
    out = {"train": embed(reader, data["x_train_big"], big, device=args.device),
           "eval": embed(reader, data["x_eval_big"], big, device=args.device)}
    log(f"embeddings at {', '.join(str(config.image_size * s) for s in scales)} px, "
        f"stages {','.join(map(str, layers))}: {out['train'].shape[1]} features")
    return out


def run_method(args, data: dict, config: PretrainConfig, cache_dir: Path, device, out: Path,
               started: float) -> None:
    """Pretrain (or reuse) one method's encoder and run every evaluation on it."""
    log(f"method {config.method}")
    encoder, pretrain_info = get_encoder(data["x_train"], config, cache_dir, args.device,
                                         init=args.init_checkpoint, epochs=args.epochs)

    embed_started = time.perf_counter()
    embeddings = embed_sets(encoder, data, config, args)
    embed_seconds = time.perf_counter() - embed_started
    embedded = len(data["x_train"]) + len(data["x_eval"])
    num_classes = len(data["class_names"])
    label_free_rows = {
        config.method: label_free(embeddings["train"], data["y_train"], embeddings["eval"],
                                  data["y_eval"], num_classes),
        "pixels": label_free(pixels(data["x_train"]), data["y_train"], pixels(data["x_eval"]),
                             data["y_eval"], num_classes),
        **label_free_with_thumbnails(embeddings, data, num_classes),
    }

    runs, labeled_counts = [], {}

    def payload(complete: bool) -> dict:
        return {
            "complete": complete,
            "args": {k: v for k, v in vars(args).items()},
            "machine": machine_info(device),
            "data": data["info"],
            "configs": {"pretrain": asdict(config),
                        "finetune": {**asdict(finetune_config(args)),
                                     "seed": "the run's seed"},
                        "distill": {**asdict(distill_config(args)),
                                    "seed": "the run's seed"}},
            "encoder_cached": pretrain_info["encoder_cached"],
            "pretrain": {k: v for k, v in pretrain_info.items() if k != "encoder_cached"},
            "label_free": label_free_rows,
            "runs": runs,
            "aggregates": aggregate(runs, args.labels_fraction),
            "labeled_counts": labeled_counts,
            "timings": {"pretrain_seconds": pretrain_info["seconds"],
                        "pretrain_images_per_s": pretrain_info["images_per_s"],
                        "embed_seconds": embed_seconds,
                        "embed_images_per_s": embedded / max(embed_seconds, 1e-9),
                        "total_seconds": time.perf_counter() - started},
        }

    for fraction in args.labels_fraction:
        for seed in range(args.seeds):
            count = max(num_classes, round(fraction * len(data["y_train"])))
            subset = stratified_subset(data["y_train"], count, seed=seed)
            labeled_counts[f"{fraction:g}"] = len(subset)
            log(f"fraction {fraction:g}, seed {seed}: {len(subset)} labeled scans")
            results = run_methods(data, subset, seed, encoder, config, embeddings, args)
            for method, (proba, seconds) in results.items():
                report = classification_report(data["y_eval"], proba, data["class_names"])
                runs.append({"fraction": fraction, "seed": seed, "method": method,
                             "num_labeled": len(subset), "seconds": seconds,
                             "metrics": summarise(report)})
                auc = report["macro_auc"]
                log(f"  {method:<16} acc {report['accuracy']:.3f}  "
                    f"macro-F1 {report['macro_f1']:.3f}  "
                    f"AUC {'n/a' if auc is None else f'{auc:.3f}'}  ({seconds:.1f}s)")
            # A partial file after every seed: a long run stopped early still leaves its rows.
            write_json(out, payload(complete=False))

    aggregates = aggregate(runs, args.labels_fraction)
    log("")
    log(format_table(aggregates, labeled_counts, label_free_rows))
    log(f"pretrain {pretrain_info['seconds']:.1f}s"
        + (" (cached encoder)" if pretrain_info["encoder_cached"] else
           " (none: the encoder as is)" if pretrain_info["images_per_s"] is None else
           f" ({pretrain_info['images_per_s']:.0f} images/s)")
        + f", embedding {embedded / max(embed_seconds, 1e-9):.0f} images/s, "
        f"total {time.perf_counter() - started:.1f}s")
    write_json(out, payload(complete=True))
    log(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
