"""The starter encoder: one SimCLRv2 encoder pretrained on every public scan we have, shipped
with the project so a new project (and the demo) starts from it instead of from noise.

Pure core: no Django. ``build`` decodes the sources with the import pipeline's own decoder
(``decode_scan``; greyscale, padded to a square, resized), pretrains with ``ssl.pretrain``
(resumable, one checkpoint per epoch in ``work_dir``), then writes

- ``out`` (``*.pt``): an encoder checkpoint in half precision (``kind="simclr_encoder"``,
  ``config``, ``encoder``, ``head``, ``history``, ``batchnorm_recalibrated``, ``starter``: the
  card below), loadable by ``load_pretrained`` / ``load_encoder_weights`` like any of ours;
- ``out`` with ``.json``: the data card (what it saw, how long, the loss curve, the exact
  command, the file's sha256).

Rebuild it with ``make starter-encoder`` (= ``python -m ml_backend.ssl.starter``). Only the
train splits are used: PneumoniaMNIST's val, NIH's val and every official test split stay out,
so the benchmarks that evaluate on them are not transductive. Brain MRI's Training folder is
used whole (its official Testing folder is withheld), so a grouped split of Training that a
benchmark holds out *was* seen here, without labels; the card says so.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.data.arrays import to_square
from ml_backend.data.datasets import SourceError, read_source
from ml_backend.data.decode import ScanDecodeError, decode_scan
from ml_backend.errors import TrainingError
from ml_backend.ssl.config import SSL_METHODS, PretrainConfig

FORMAT = "starter-encoder/1"


@dataclass(frozen=True)
class StarterSource:
    name: str            # what a reader of the data card sees
    spec: str            # relative to the data root: a folder, ``file.npz#split`` or ``labels.csv#split``
    hflip: bool          # whether a left-right flip keeps the anatomy plausible


# Chest films are never flipped (the heart's side matters); brain MRI slices may be.
DEFAULT_SOURCES = (
    StarterSource("chest X-ray, PneumoniaMNIST train (MedMNIST v2, 28 px)",
                  "pneumoniamnist/pneumoniamnist.npz#train", hflip=False),
    StarterSource("chest X-ray, NIH ChestX-ray14 subset train (64 px)",
                  "nih_cxr14_subset/labels.csv#train", hflip=False),
    StarterSource("brain MRI, Training folder (Bhuvaji et al., mostly 512 px)",
                  "brain_mri/Training", hflip=True),
)

# The colour starter (colour projects: histopathology, blood smears): every public colour
# train image, RGB. Smears and tissue tiles have no handedness, so both may be flipped.
COLOUR_SOURCES = (
    StarterSource("blood smear, BloodMNIST-PBC train (Acevedo et al. 2020, 28 px rebuild)",
                  "bloodmnist_pbc/bloodmnist_pbc.npz#train", hflip=True),
    StarterSource("lung H&E, LC25000 lung train (Borkowski et al. 2019, 224 px)",
                  "lc25000_lung/train", hflip=True),
)

# The recipe: the project's default SimCLRv2 settings at 64 px (the demo's and the product's
# default size), standard ResNet-18 stem.
DEFAULT_CONFIG = PretrainConfig(arch="resnet18", image_size=64, epochs=20, batch_size=128,
                                lr=1e-3, temperature=0.2, warmup_epochs=1.0, seed=0)
# The colour one: the same, on 3 channels, with the colour projects' default colour
# augmentation (H&E stain jitter in HED space + bounded hue; ssl/transforms.py).
COLOUR_CONFIG = PretrainConfig(**{**asdict(DEFAULT_CONFIG), "channels": 3,
                                  "colour_augment": "stain"})

METHOD_NAMES = {"simclr": "SimCLRv2", "moco": "MoCo", "byol": "BYOL", "swav": "SwAV",
                "dino": "DINO"}

STARTER_DIR = Path(__file__).resolve().parent.parent / "starter"
DEFAULT_OUT = STARTER_DIR / "simclr-resnet18-64px.pt"
COLOUR_OUT = STARTER_DIR / "simclr-resnet18-rgb-64px.pt"


def _log(message: str) -> None:
    print(f"[starter {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _split_csv_files(csv_path: Path, split: str) -> list[Path]:
    """Files listed in a ChestX-ray14-style CSV (``Image Index``, ``split``) for one split;
    the images sit in ``images/`` beside the CSV (or beside the CSV itself)."""
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "split" not in rows[0]:
        raise TrainingError(f"{csv_path}: expected a 'split' column")
    name_key = next((k for k in ("Image Index", "filename", "path") if k in rows[0]), None)
    if name_key is None:
        raise TrainingError(f"{csv_path}: expected an 'Image Index' or 'filename' column")
    folder = csv_path.parent / "images"
    folder = folder if folder.is_dir() else csv_path.parent
    return [folder / row[name_key] for row in rows if row["split"].strip() == split]


def _raw_items(root: Path, spec: str) -> list[tuple[str, callable]]:
    path, _, split = spec.partition("#")
    try:
        if path.lower().endswith(".csv") and split:
            return [(p.name, p.read_bytes) for p in _split_csv_files(root / path, split)]
        listing = read_source(str(root / spec))
    except (SourceError, OSError) as exc:
        raise TrainingError(f"{spec}: cannot be read under {root} ({exc})") from exc
    return [(item.name, item.load) for item in listing.items]


def to_uint8(pixels: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """Decoded pixels (float in [0, 1], ``(H, W)`` grey or ``(H, W, 3)`` RGB) → ``uint8
    (size, size)`` (``channels=1``: colour becomes luma) or ``(size, size, 3)`` (grey is
    replicated), as training sees the import's 8-bit preview."""
    image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return np.asarray(to_square(image, size, channels), dtype=np.uint8)


def load_sources(root: Path, sources=DEFAULT_SOURCES, *, size: int, channels: int = 1) -> dict:
    """Decode every source: ``images uint8 (N, size, size)`` (or ``(N, size, size, 3)`` with
    ``channels=3``), ``hflip bool (N,)``, and per source ``{name, spec, scans, failed,
    sha256}`` (the hash of its decoded pixels)."""
    images, flips, card = [], [], []
    for source in sources:
        started, decoded, failed = time.perf_counter(), [], 0
        for name, load in _raw_items(root, source.spec):
            try:
                scan = decode_scan(load(), name=name, salt="starter")
            except (ScanDecodeError, OSError):
                failed += 1
                continue
            decoded.append(to_uint8(scan.pixels, size, channels))
        if not decoded:
            raise TrainingError(f"{source.spec}: no scan could be read under {root}")
        stack = np.stack(decoded)
        images.append(stack)
        flips.append(np.full(len(stack), source.hflip))
        card.append({"name": source.name, "spec": source.spec, "scans": len(stack),
                     "failed": failed, "hflip": source.hflip,
                     "sha256_pixels": hashlib.sha256(stack.tobytes()).hexdigest()})
        _log(f"{source.spec}: {len(stack)} scans ({failed} unreadable) in "
             f"{time.perf_counter() - started:.0f}s")
    return {"images": np.concatenate(images), "hflip": np.concatenate(flips), "sources": card}


def _cached_sources(root: Path, sources, size: int, work_dir: Path, channels: int = 1) -> dict:
    keyed = [asdict(s) for s in sources] + [size, str(root.resolve())]
    key = hashlib.sha256(json.dumps(keyed + ([channels] if channels != 1 else []))
                         .encode()).hexdigest()[:16]
    path = work_dir / f"sources-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return {"images": data["images"], "hflip": data["hflip"],
                    "sources": json.loads(str(data["card"]))}
    data = load_sources(root, sources, size=size, channels=channels)
    _write_sources(path, data)
    return data


def _write_sources(path: Path, data: dict) -> None:
    """Decoded sources to ``path`` (npz: ``images``, ``hflip``, ``card``), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("wb") as handle:
        np.savez_compressed(handle, images=data["images"], hflip=data["hflip"],
                            card=np.array(json.dumps(data["sources"])))
    tmp.replace(path)


def save_decoded(root: Path, sources, *, size: int, path: Path, channels: int = 1) -> dict:
    """Decode every source once and write ``path`` (npz: ``images``, ``hflip``, ``card``),
    so a machine that lacks the scans (a rented GPU) can train from the pixels alone
    (``build(decoded=path)``). Returns the per-source card."""
    data = load_sources(root, sources, size=size, channels=channels)
    _write_sources(path, data)
    return data["sources"]


def read_decoded(path: Path, sources, *, size: int, channels: int = 1) -> dict:
    """The pixels ``save_decoded`` wrote, checked: the same sources in the same order, the
    training size and channels, and each source's pixels hashing to what its card says."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images, hflip = data["images"], data["hflip"]
            card = json.loads(str(data["card"]))
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingError(f"{path}: not a decoded-sources file ({exc})") from exc
    if [c["spec"] for c in card] != [s.spec for s in sources]:
        raise TrainingError(f"{path} holds {[c['spec'] for c in card]}, expected "
                            f"{[s.spec for s in sources]}")
    shape = (size, size) if channels == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != shape or len(hflip) != len(images):
        raise TrainingError(f"{path}: images {images.dtype} {images.shape[1:]}, expected uint8 "
                            f"{shape} (decode again at --image-size {size})")
    start = 0
    for entry in card:
        chunk = images[start:start + entry["scans"]]
        if hashlib.sha256(chunk.tobytes()).hexdigest() != entry["sha256_pixels"]:
            raise TrainingError(f"{path}: the pixels of {entry['spec']} do not match its card")
        start += entry["scans"]
    if start != len(images):
        raise TrainingError(f"{path}: {len(images)} images, the card counts {start}")
    return {"images": images, "hflip": hflip.astype(bool), "sources": card}


def half_precision(state: dict) -> dict:
    """Floating tensors to float16 (BatchNorm counters stay integers)."""
    return {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}


def export(pretrain_checkpoint: Path, out: Path, card: dict) -> dict:
    """Write the shipped file (half precision, no optimizer state) and its card."""
    from ml_backend.ssl.checkpoints import load_checkpoint, save_checkpoint

    state = load_checkpoint(pretrain_checkpoint)
    if not state.get("batchnorm_recalibrated"):
        raise TrainingError(f"{pretrain_checkpoint}: pretraining has not finished")
    card = {**card, "format": FORMAT, "epochs": state["epoch"], "history": state["history"],
            "pretrain_seconds": round(sum(h.get("seconds", 0) for h in state["history"]), 1)}
    save_checkpoint(out, {
        "kind": "simclr_encoder", "model_version": "starter", "config": state["config"],
        "encoder": half_precision(state["encoder"]), "head": half_precision(state["head"]),
        "epoch": state["epoch"], "history": state["history"], "batchnorm_recalibrated": True,
        "starter": card,
    })
    card["file"] = {"name": out.name, "bytes": out.stat().st_size,
                    "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    out.with_suffix(".md").write_text(card_markdown(card))
    return card


def card_markdown(card: dict) -> str:
    """The data card as the README beside the shipped file (rewritten by every rebuild)."""
    config = card["config"]
    lines = [
        f"# The {'colour ' if config.get('channels', 1) == 3 else ''}starter encoder "
        "(data card)", "",
        f"`{card['file']['name']}` ({card['file']['bytes'] / 1e6:.1f} MB, half precision, "
        f"sha256 `{card['file']['sha256'][:16]}…`): {card['what']}.", "",
        "New projects start from it: `manage.py pretrain` continues from it on the project's "
        "own scans (`--from scratch` to start from random weights), `pretrain --epochs 0` and "
        "`make demo` use it as is. Settings: "
        + ("`STARTER_ENCODER_COLOUR` (env `MEDLABEL_STARTER_ENCODER_COLOUR`, empty to "
           "disable), for colour projects." if config.get("channels", 1) == 3 else
           "`STARTER_ENCODER` (env `MEDLABEL_STARTER_ENCODER`, empty to disable), for "
           "greyscale projects."), "",
        "## What it saw", "",
        "| source | scans | unreadable | left-right flips |", "|---|---:|---:|---|",
        *[f"| {s['name']} (`{s['spec']}`) | {s['scans']:,} | {s['failed']} | "
          f"{'yes' if s['hflip'] else 'no'} |" for s in card["sources"]],
        f"| **all** | **{card['scans']:,}** | | |", "",
        "Never seen: " + "; ".join(card["not_seen"]) + ". " + card["note"][0].upper()
        + card["note"][1:] + ".", "",
        "No labels were used. Every scan went through the import pipeline's own decoder "
        f"(`decode_scan`), {'in colour (RGB)' if config.get('channels', 1) == 3 else 'greyscale'}"
        f", padded to a square and resized to {config['image_size']} px"
        + (f"; colour augmentation `{config.get('colour_augment')}`"
           if config.get("channels", 1) == 3 else "") + ".", "",
        "## How it was trained", "",
        f"- Method: {config.get('method', 'simclr')} (`ml_backend/ssl/`), {config['arch']}, "
        f"{'small' if config.get('small_input') else 'standard'} stem, {config['image_size']} px, "
        f"{card['epochs']} epochs, batch {config['batch_size']}, AdamW lr {config['lr']}, "
        f"temperature {config['temperature']}, seed {config['seed']}; CPU bf16 autocast "
        f"{'on' if config.get('cpu_bf16') else 'off'}, channels-last "
        f"{'on' if config.get('channels_last') else 'off'}.",
        f"- Built {card['built']} on {card['device']}"
        + (f" ({card['gpu']}, fp16 autocast" if card.get("gpu") else f" ({card['threads']} threads")
        + f", torch {card['torch']}): {card['pretrain_seconds'] / 60:.0f} min of training.",
        *([f"- Decoded first, where the scans are: `{card['decode_command']}`; then trained "
           "from that file's pixels (each source's hash checked) with the command below."]
          if card.get("decode_command") else []),
        f"- Rebuild exactly: `{card['command']}` (`make starter-encoder"
        f"{'-colour' if config.get('channels', 1) == 3 else ''}` runs the same recipe"
        + (" from the scans directly, on a GPU where there is one, else on the CPU: about "
           "2 h on 2 cores" if card.get("gpu") else "")
        + "); the same seed, config and data give the same weights up to floating-point "
        "differences between machines and thread counts.", "",
        "## Loss (" + ("NT-Xent per image" if config.get("method", "simclr") == "simclr"
                       else f"{config.get('method')}'s loss") + ", mean over each epoch)", "",
        "| epoch | loss | images/s |", "|---:|---:|---:|",
        *[f"| {h['epoch']} | {h['loss']:.3f} | {h['images_per_s']:.0f} |"
          for h in card["history"]], "",
        "How it compares with raw pixels and with pretraining on one dataset alone: "
        "`docs/benchmarks.md`, *The starter encoder*.", "",
    ]
    return "\n".join(lines)


def read_card(path: Path) -> dict | None:
    """The starter's data card, or None when no starter is shipped at ``path``."""
    card = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not card.is_file():
        return None
    return json.loads(card.read_text())


GREY_NOT_SEEN = (["PneumoniaMNIST val and test", "NIH ChestX-ray14 val and test",
                  "brain MRI Testing folder"],
                 "brain MRI Training was used whole: a benchmark split held out of Training "
                 "was seen here without labels")
COLOUR_NOT_SEEN = (["BloodMNIST-PBC val and test", "LC25000 lung's withheld test images"],
                   "LC25000's images are rotated and flipped copies of 250 originals per class, "
                   "so its withheld test images have near-duplicates among the train images "
                   "seen here (without labels)")


def build(root: Path, out: Path, *, config: PretrainConfig = DEFAULT_CONFIG,
          sources=DEFAULT_SOURCES, work_dir: Path, workers: int = 0,
          device: str | None = None, command: str = "",
          not_seen: tuple[list[str], str] = GREY_NOT_SEEN, decoded: Path | None = None,
          decode_command: str = "") -> dict:
    """Pretrain the starter on ``sources`` under ``root`` (or on the pixels ``decoded`` holds,
    written by ``save_decoded``) and export it to ``out`` with its data card."""
    from ml_backend.ssl.train import pretrain

    started = time.perf_counter()
    if decoded is not None:
        data = read_decoded(decoded, sources, size=config.image_size, channels=config.channels)
    else:
        data = _cached_sources(root, sources, config.image_size, work_dir, config.channels)
    _log(f"pretraining on {len(data['images'])} scans: {config.arch}, {config.image_size}px, "
         f"{config.epochs} epochs, batch {config.batch_size}")
    last = {"t": 0.0}

    def progress(event: dict) -> None:
        now = time.perf_counter()
        if now - last["t"] > 60 or event.get("step") == event.get("steps"):
            last["t"] = now
            _log(f"epoch {event.get('epoch')}/{event.get('epochs')} step "
                 f"{event.get('step')}/{event.get('steps')} loss {event.get('loss', 0):.4f} "
                 f"{event.get('images_per_s', 0):.1f} img/s")

    checkpoint = work_dir / f"pretrain-{hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]}.pt"
    result = pretrain(data["images"], config, checkpoint_path=checkpoint, model_version="starter",
                      hflip_mask=data["hflip"], workers=workers, device=device,
                      progress=progress)
    import torch

    card = {
        "what": f"{METHOD_NAMES.get(config.method, config.method)} encoder (ResNet + projection "
                "head) pretrained without labels on the public scans below, shipped as the "
                "starting point of every new project",
        "sources": data["sources"], "scans": int(len(data["images"])),
        "config": asdict(config), "device": result["device"],
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
        "final_loss": result["final_loss"],
        "built": time.strftime("%Y-%m-%d"), "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "command": command or "make starter-encoder",
        "not_seen": not_seen[0], "note": not_seen[1],
    }
    if torch.cuda.is_available() and result["device"] == "cuda":
        card["gpu"] = torch.cuda.get_device_name(0)
    if decoded is not None:
        card["decode_command"] = decode_command or "python -m ml_backend.ssl.starter --save-decoded"
    card = export(checkpoint, out, card)
    _log(f"wrote {out} ({card['file']['bytes'] / 1e6:.1f} MB) and {out.with_suffix('.json').name}")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="the folder holding pneumoniamnist/, nih_cxr14_subset/, brain_mri/")
    parser.add_argument("--colour", action="store_true",
                        help="the colour starter: RGB, on bloodmnist_pbc/ and lc25000_lung/ "
                        f"(default --out {COLOUR_OUT.name})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {DEFAULT_OUT.name} (--colour: {COLOUR_OUT.name}) in "
                        f"{STARTER_DIR}")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/starter"),
                        help="decoded sources and the resumable pretraining checkpoint")
    parser.add_argument("--epochs", type=int, default=DEFAULT_CONFIG.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_CONFIG.batch_size)
    parser.add_argument("--image-size", type=int, default=DEFAULT_CONFIG.image_size)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG.seed)
    parser.add_argument("--method", choices=SSL_METHODS, default=DEFAULT_CONFIG.method,
                        help="the self-supervised method (ml_backend/ssl/methods.py)")
    parser.add_argument("--lr", type=float, default=DEFAULT_CONFIG.lr)
    parser.add_argument("--warmup-epochs", type=float, default=DEFAULT_CONFIG.warmup_epochs)
    parser.add_argument("--save-decoded", type=Path, default=None, metavar="FILE",
                        help="only decode the sources under --data into FILE (npz) and stop: "
                        "carry FILE to a machine without the scans (a GPU) and train there "
                        "with --decoded FILE")
    parser.add_argument("--decoded", type=Path, default=None, metavar="FILE",
                        help="train from the pixels --save-decoded wrote (checked against "
                        "each source's hash) instead of decoding --data")
    parser.add_argument("--decode-command", default="",
                        help="with --decoded: the command that wrote FILE, for the data card")
    args = parser.parse_args(argv)
    base = COLOUR_CONFIG if args.colour else DEFAULT_CONFIG
    sources = COLOUR_SOURCES if args.colour else DEFAULT_SOURCES
    config = PretrainConfig(**{**asdict(base), "epochs": args.epochs,
                               "batch_size": args.batch_size, "image_size": args.image_size,
                               "seed": args.seed, "lr": args.lr, "method": args.method,
                               "warmup_epochs": args.warmup_epochs})
    out = args.out or (COLOUR_OUT if args.colour else DEFAULT_OUT)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--decode-command" in given:            # said on the card's line of its own
        at = given.index("--decode-command")
        del given[at:at + 2]
    command = "python -m ml_backend.ssl.starter " + " ".join(
        a if a and " " not in a else repr(a) for a in given)
    try:
        if args.save_decoded is not None:
            card = save_decoded(args.data, sources, size=config.image_size,
                                path=args.save_decoded, channels=config.channels)
            _log(f"wrote {args.save_decoded}: {sum(c['scans'] for c in card)} scans")
            return 0
        build(args.data, out, config=config, work_dir=args.work_dir, workers=args.workers,
              device=args.device, command=command.strip(), sources=sources,
              not_seen=COLOUR_NOT_SEEN if args.colour else GREY_NOT_SEEN,
              decoded=args.decoded, decode_command=args.decode_command)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
