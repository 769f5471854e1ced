"""``bench.ssl_eval`` on a multi-label findings source (NIH ChestX-ray14 CSV, CheXpert CSV,
0/1 CSV, ChestMNIST-style npz): per-finding AUC and macro AUC, at several label fractions, for
the raw-pixel floor and the linear probe (one calibrated, class-balanced binary head per
finding, ``ml_backend.active.findings``), the same network trained from scratch, SimCLRv2
fine-tuned with a masked binary cross-entropy and its distilled student
(``ml_backend.ssl.findings``; ``--finetune-*`` / ``--distill-*`` options as for classes).

    python -m bench.ssl_eval --train ../shared/data/nih_cxr14_subset/labels.csv#train \\
        --eval ../shared/data/nih_cxr14_subset/labels.csv#val \\
        --init-checkpoint ml_backend/starter/simclr-resnet18-64px.pt --epochs 0 \\
        --labels-fraction 0.2,1.0 --seeds 3 --out bench/results/findings_nih.json

``main`` of ``bench.ssl_eval`` hands over here when ``--train`` is a findings source. The
macro AUC is reported over every finding with an AUC on the evaluation set and over the
findings with at least ``--min-positives`` evaluation positives (the data README's floor
uses 5). Uncertain answers follow ``--uncertain`` (ignore, zeros, ones).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ml_backend.active.findings import fit_findings_head
from ml_backend.data.decode import ScanDecodeError, decode_scan
from ml_backend.data.findings import read_findings_source
from ml_backend.metrics.findings import findings_report, uncertain_policy
from ml_backend.ssl.config import network_config

FINDINGS_METHODS = ["pixels_logreg", "supervised", "linear_probe", "simclr_finetune",
                    "simclr_distill"]


def load_findings(spec: str, image_size: int, cache_dir: Path) -> dict:
    from bench.ssl_eval import _atomic_savez, _spec_key, log, to_uint8_square
    import hashlib

    listing = read_findings_source(spec)
    key = hashlib.sha256(f"findings|{_spec_key(spec)}|{len(listing.items)}|{image_size}"
                         .encode()).hexdigest()[:20]
    path = cache_dir / f"findings-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            images, keep = data["images"], data["keep"]
        log(f"{spec}: {len(images)} scans from cache {path.name}")
    else:
        started = time.perf_counter()
        images, keep = [], []
        for i, item in enumerate(listing.items):
            try:
                decoded = decode_scan(item.load(), name=item.name, salt="bench")
            except (ScanDecodeError, OSError) as exc:
                log(f"  skip {item.name}: {exc}")
                continue
            images.append(to_uint8_square(decoded.pixels, image_size))
            keep.append(i)
        if not images:
            raise SystemExit(f"{spec}: no scan could be read")
        images, keep = np.stack(images), np.array(keep)
        _atomic_savez(path, images=images, keep=keep)
        log(f"{spec}: decoded {len(images)} scans in {time.perf_counter() - started:.1f}s")
    return {"images": images, "targets": listing.targets[keep], "findings": listing.findings,
            "layout": listing.layout, "notes": listing.notes,
            "failed": len(listing.items) - len(keep)}


def _align(train: dict, evaluation: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The train findings; evaluation columns reordered to them (unknown where missing)."""
    names = train["findings"]
    column = {n: i for i, n in enumerate(evaluation["findings"])}
    if not set(names) & set(column):
        raise SystemExit("--eval shares no finding with --train "
                         f"(train: {', '.join(names[:8])}...; eval: "
                         f"{', '.join(evaluation['findings'][:8])}...)")
    y_eval = np.full((len(evaluation["targets"]), len(names)), np.nan)
    for f, n in enumerate(names):
        if n in column:
            y_eval[:, f] = evaluation["targets"][:, column[n]]
    return names, train["targets"], y_eval


def _subset(n: int, fraction: float, seed: int) -> np.ndarray:
    if fraction >= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max(2, int(round(fraction * n))), replace=False))


def _method_proba(method, args, config, encoder, features, x_train, x_eval, y_train, rows,
                  names, seed, teacher, network) -> np.ndarray:
    """``network``: the fine-tuned network's config and the train / eval scans at its size
    (``--finetune-input-scale`` times the encoder's); the scratch baseline reads at the
    encoder's size, as for classes."""
    from dataclasses import replace

    import torch

    from bench.ssl_eval import distill_config, finetune_config
    from ml_backend.ssl.findings import distill_findings, finetune_findings, predict_findings
    from ml_backend.ssl.models import SimCLRModel

    if method in features:                   # a calibrated head per finding on fixed features
        train_features, eval_features = features[method]
        head, _ = fit_findings_head(train_features[rows], y_train[rows], np.array(names),
                                    seed=seed)
        return head.predict_proba(eval_features)
    ft_config = finetune_config(args, seed)
    if method == "supervised":
        torch.manual_seed(seed)
        plain = replace(ft_config, head_init="random", backbone_lr_scale=1.0, batchnorm="train",
                        input_scale=1)
        model, _ = finetune_findings(SimCLRModel(config), config, x_train[rows], y_train[rows],
                                     plain, device=args.device)
        return predict_findings(model, x_eval, config, device=args.device)
    net, net_train, net_eval = network
    if method == "simclr_finetune":
        teacher["model"], _ = finetune_findings(encoder, config, net_train[rows], y_train[rows],
                                                ft_config, device=args.device)
        return predict_findings(teacher["model"], net_eval, net, device=args.device)
    if method == "simclr_distill":         # the student reads at its teacher's size
        student, _ = distill_findings(teacher["model"], encoder, net, net_train,
                                      distill_config(args, seed), labeled=net_train[rows],
                                      targets=y_train[rows], device=args.device)
        return predict_findings(student, net_eval, net, device=args.device)
    raise ValueError(method)


def _macro(report: dict, names: list[str], y_eval: np.ndarray, min_positives: int) -> dict:
    kept = [n for f, n in enumerate(names) if np.nansum(y_eval[:, f] == 1) >= min_positives]
    aucs = [report["per_finding"][n]["auc"] for n in kept
            if report["per_finding"][n]["auc"] is not None]
    return {"macro_auc_min_positives": float(np.mean(aucs)) if aucs else None,
            "findings_min_positives": kept}


def _at_size(train: dict, evaluation: dict, specs: tuple[str, str], size: int,
             cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The same train and eval scans decoded from their sources at ``size`` px (not the
    small images enlarged), checked to be the same scans in the same order."""
    larger = [load_findings(spec, size, cache_dir) for spec in specs]
    for small, large in zip((train, evaluation), larger):
        if len(large["images"]) != len(small["images"]) or not np.array_equal(
                large["targets"], small["targets"], equal_nan=True):
            raise SystemExit("the findings source decoded to different scans at two sizes")
    return larger[0]["images"], larger[1]["images"]


def run_findings(args, cache_dir: Path, device, started: float) -> int:
    from bench.ssl_eval import (
        embed,
        embed_layers,
        embed_scales,
        get_encoder,
        log,
        machine_info,
        pixels,
        pretrain_config,
        write_json,
    )

    config = pretrain_config(args)
    args.image_size = config.image_size
    train = load_findings(args.train, config.image_size, cache_dir)
    evaluation = load_findings(args.eval, config.image_size, cache_dir)
    names, y_train_raw, y_eval_raw = _align(train, evaluation)
    y_train = uncertain_policy(y_train_raw, args.uncertain)
    y_eval = uncertain_policy(y_eval_raw, "ignore")      # uncertain never scores the model
    log(f"findings ({train['layout']}): {len(names)}; {len(y_train)} train / {len(y_eval)} eval "
        f"scans; eval positives "
        f"{dict(zip(names, np.nansum(y_eval == 1, axis=0).astype(int).tolist()))}")
    encoder, pretrain_info = get_encoder(train["images"], config, cache_dir, args.device,
                                         init=args.init_checkpoint, epochs=args.epochs)
    scales, layers = embed_scales(args), embed_layers(args)
    if scales == (1,) and layers == (4,):
        probe = (embed(encoder.encoder, train["images"], config, device=args.device),
                 embed(encoder.encoder, evaluation["images"], config, device=args.device))
    else:       # as the product embeds: the scans at the largest size, every scale read
        from ml_backend.ssl.encoder import at_scales

        reader, big = at_scales(encoder.encoder, config, scales, layers)
        larger = _at_size(train, evaluation, (args.train, args.eval), big.image_size, cache_dir)
        probe = tuple(embed(reader, images, big, device=args.device) for images in larger)
        log(f"embeddings at {', '.join(str(config.image_size * s) for s in scales)} px, "
            f"stages {','.join(map(str, layers))}: {probe[0].shape[1]} features")
    net = network_config(config, args.finetune_input_scale)
    network = (net, train["images"], evaluation["images"])
    if net.image_size != config.image_size:
        network = (net, *_at_size(train, evaluation, (args.train, args.eval), net.image_size,
                                  cache_dir))
        log(f"fine-tuned networks read the scans at {net.image_size} px")
    features = {"linear_probe": probe,
                "pixels_logreg": (pixels(train["images"]), pixels(evaluation["images"]))}
    wanted = [m for m in FINDINGS_METHODS if m in args.evaluations.split(",")]
    if "simclr_distill" in wanted and "simclr_finetune" not in wanted:
        wanted.insert(wanted.index("simclr_distill"), "simclr_finetune")   # the teacher
    runs = []
    for fraction in args.labels_fraction:
        for seed in range(args.seeds if fraction < 1 else 1):
            rows = _subset(len(y_train), fraction, seed)
            log(f"fraction {fraction:g}, seed {seed}: {len(rows)} labelled scans")
            teacher = {}
            for method in wanted:
                t0 = time.perf_counter()
                proba = _method_proba(method, args, config, encoder, features, train["images"],
                                      evaluation["images"], y_train, rows, names, seed, teacher,
                                      network)
                report = findings_report(y_eval, proba, names)
                macro = _macro(report, names, y_eval, args.min_positives)
                runs.append({"fraction": fraction, "seed": seed, "labels": int(len(rows)),
                             "method": method, "seconds": time.perf_counter() - t0,
                             "report": {k: v for k, v in report.items()
                                        if k != "per_finding"},
                             "per_finding": {n: {k: report["per_finding"][n][k] for k in (
                                 "positives", "auc", "ap", "sensitivity", "specificity",
                                 "ppv", "f1", "ece", "log_loss")} for n in names},
                             **macro})
                log(f"  {method:14s} macro AUC {report['macro_auc'] or float('nan'):.3f} "
                    f"(≥{args.min_positives} positives: "
                    f"{macro['macro_auc_min_positives'] or float('nan'):.3f})  "
                    f"any-finding AUC {report['any_finding_auc'] or float('nan'):.3f}")
    aggregates = {}
    for fraction in args.labels_fraction:
        for method in wanted:
            chosen = [r for r in runs if r["fraction"] == fraction and r["method"] == method]

            def stat(values):
                values = [v for v in values if v is not None]
                return {"mean": float(np.mean(values)), "std": float(np.std(values)),
                        "n": len(values)} if values else None

            aggregates[f"{fraction:g}/{method}"] = {
                "labels": chosen[0]["labels"],
                "macro_auc": stat(r["report"]["macro_auc"] for r in chosen),
                "macro_auc_min_positives": stat(r["macro_auc_min_positives"] for r in chosen),
                "any_finding_auc": stat(r["report"]["any_finding_auc"] for r in chosen),
                "macro_ece": stat(r["report"].get("macro_ece") for r in chosen),
                "macro_log_loss": stat(r["report"].get("macro_log_loss") for r in chosen),
                "per_finding_auc": {n: stat(r["per_finding"][n]["auc"] for r in chosen)
                                    for n in names}}
    print("\nfraction  labels  method          macro AUC      macro AUC (≥"
          f"{args.min_positives} pos)  any-finding AUC  macro ECE  macro log-loss")
    for key, row in aggregates.items():
        fraction, method = key.split("/")

        def cell(s):
            return f"{s['mean']:.3f} ± {s['std']:.3f}" if s else "n/a"
        print(f"{fraction:>8}  {row['labels']:6d}  {method:14s}  {cell(row['macro_auc'])}  "
              f"{cell(row['macro_auc_min_positives'])}         {cell(row['any_finding_auc'])}"
              f"  {cell(row['macro_ece'])}  {cell(row['macro_log_loss'])}")
    out = Path(args.out)
    write_json(out, {
        "complete": True, "kind": "findings", "args": dict(vars(args)),
        "machine": machine_info(device), "findings": names,
        "data": {"train_spec": args.train, "eval_spec": args.eval, "layout": train["layout"],
                 "notes": train["notes"], "num_train": int(len(y_train)),
                 "num_eval": int(len(y_eval)), "train_failed": train["failed"],
                 "eval_failed": evaluation["failed"],
                 "train_positives": np.nansum(y_train == 1, axis=0).astype(int).tolist(),
                 "eval_positives": np.nansum(y_eval == 1, axis=0).astype(int).tolist()},
        "pretrain": {k: v for k, v in pretrain_info.items()},
        "runs": runs, "aggregates": aggregates,
        "total_seconds": time.perf_counter() - started})
    log(f"wrote {out}")
    return 0
