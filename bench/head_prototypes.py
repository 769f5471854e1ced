"""The refit head with and without its nearest-class-mean component and its balance
correction when EVERY class has few labels (the start of every project), on an encoder's
frozen embeddings.

    python -m bench.head_prototypes --train SPEC --eval SPEC \
        [--encoder ml_backend/starter/simclr-resnet18-64px.pt] [--fractions 0.01,0.1] \
        [--n0 0,50] [--balance 0,0.5,shares] [--embed-scales 1,2] [--seeds 3] \
        [--keep CLASS:SHARE [--weigh-eval]] [--out results.json]

For each labeled fraction and seed: a stratified subset of --train, ``fit_head`` with
``prototype_n0`` in --n0 and ``balance`` in --balance (0, 0 = the linear head without
either; ``shares`` = balance 1 with the offsets fit for the project's class shares, EM over
the labeled subset and the rest of --train as the unlabeled pool, ``fit_head(pool_x=...)``),
macro-F1, accuracy and AUC on --eval; the embeddings read
each scan at --embed-scales, as the product's MEDLABEL_EMBED_SCALES. ``--keep CLASS:SHARE``
keeps a random SHARE of that class's scans in --train and --eval alike (a project where it
is rare, e.g. a finding in a screening population); with ``--weigh-eval`` the eval set is
kept whole and each of its scans weighed so that its classes have the train set's shares
(label shift: a class's scans look the same whatever its share), so the rare class is
scored on all its eval scans rather than on the few a subsample would keep.
(``bench.new_class`` measures the other case: one class with few labels beside many.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

from bench.ssl_eval import embed_layers, embed_scales, load_spec, log, stratified_subset
from ml_backend.active.refit import fit_head
from ml_backend.ssl.encoder import at_scales
from ml_backend.ssl.train import embed, load_pretrained


def kept_rows(labels: np.ndarray, keep: str, *, seed: int) -> np.ndarray:
    """Sorted rows left after ``--keep CLASS:SHARE`` subsamples one class of ``labels``."""
    name, _, share = keep.rpartition(":")
    try:
        share = float(share)
    except ValueError:
        share = -1.0
    if not name or not 0 < share <= 1:
        raise SystemExit(f"--keep {keep!r}: expected CLASS:SHARE with SHARE in (0, 1]")
    labels = np.asarray(labels).astype(str)
    rows = np.flatnonzero(labels == name)
    if not len(rows):
        raise SystemExit(f"--keep: no scan of class {name!r} (have {sorted(set(labels))})")
    chosen = np.random.default_rng(seed).choice(rows, max(1, round(share * len(rows))),
                                                replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels != name), chosen]))


def per_class(y_true: np.ndarray, y_pred: np.ndarray, names: list[str],
              weights: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``{class: {precision, recall, f1, support}}`` on the eval set (weighed as its
    macro-F1 is); a class never predicted has precision 0."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=range(len(names)), sample_weight=weights, zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": float(support[i])}
            for i, name in enumerate(names)}


def share_weights(y: np.ndarray, target_counts: np.ndarray) -> np.ndarray:
    """Per-scan weights ``(N,)`` that give the classes of ``y`` the shares of
    ``target_counts``, the weights summing to ``N``."""
    y = np.asarray(y)
    target = np.asarray(target_counts, dtype=np.float64)
    have = np.bincount(y, minlength=len(target)).astype(np.float64)
    if (have[target > 0] == 0).any():
        raise SystemExit("--weigh-eval: a class of the train set has no eval scan")
    per_class = np.divide(target / target.sum(), have / have.sum(),
                          out=np.zeros_like(target), where=have > 0)
    return per_class[y]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--encoder", default="ml_backend/starter/simclr-resnet18-64px.pt")
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument("--n0", default="0,50")
    parser.add_argument("--balance", default="0",
                        help="comma-separated fit_head(balance=...) values, or shares "
                             "(balance 1 for the project's class shares, by EM)")
    parser.add_argument("--embed-scales", default="1",
                        help="sizes each scan is embedded at, as multiples of the encoder's")
    parser.add_argument("--embed-layers", default="4",
                        help="the encoder's stages pooled into the embedding (e.g. 3,4)")
    parser.add_argument("--keep", default=None,
                        help="CLASS:SHARE: keep that share of one class's scans in train and "
                             "eval (the class made rare in the project)")
    parser.add_argument("--weigh-eval", action="store_true",
                        help="with --keep: weigh the whole eval set to the kept train shares "
                             "instead of subsampling it")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache-dir", default="bench/cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.weigh_eval and not args.keep:
        raise SystemExit("--weigh-eval weighs the eval set to --keep's shares: give --keep")
    balances = args.balance.split(",")
    for value in balances:
        if value != "shares":
            try:
                float(value)
            except ValueError:
                raise SystemExit(f"--balance: {value!r} is neither a number nor shares") from None
    model, config = load_pretrained(args.encoder)
    reader, read_config = at_scales(model.encoder, config, embed_scales(args),
                                    embed_layers(args))
    data = {}
    for name, spec in (("train", args.train), ("eval", args.eval)):
        # the encoder's own channels: a colour starter reads RGB, a greyscale one luma
        loaded = load_spec(spec, read_config.image_size, Path(args.cache_dir),
                           channels=read_config.channels)
        images, labels = loaded["images"], np.asarray(loaded["labels"])
        if args.keep and not (name == "eval" and args.weigh_eval):
            keep = kept_rows(labels, args.keep, seed=0 if name == "train" else 1)
            images, labels = images[keep], labels[keep]
        data[name] = (embed(reader, images, read_config), labels)
    names = sorted(set(data["train"][1].tolist()))
    y_train = np.array([names.index(v) for v in data["train"][1]])
    keep = np.isin(data["eval"][1], names)
    x_eval = data["eval"][0][keep]
    y_eval = np.array([names.index(v) for v in data["eval"][1][keep]])
    weights = (share_weights(y_eval, np.bincount(y_train, minlength=len(names)))
               if args.weigh_eval else None)
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        for n0, balance in ((float(v), b if b == "shares" else float(b))
                            for v in args.n0.split(",") for b in balances):
            for seed in range(args.seeds):
                subset = stratified_subset(y_train, round(fraction * len(y_train)), seed)
                x_train = data["train"][0]
                pool = np.delete(x_train, subset, axis=0) if balance == "shares" else None
                head, _ = fit_head(x_train[subset], y_train[subset], seed=seed,
                                   prototype_n0=n0,
                                   balance=1.0 if balance == "shares" else balance,
                                   pool_x=pool)
                proba = head.predict_proba(x_eval)
                auc = (roc_auc_score(y_eval, proba[:, 1]) if len(names) == 2 else
                       roc_auc_score(y_eval, proba, multi_class="ovr"))
                rows.append({"fraction": fraction, "n0": n0, "balance": balance, "seed": seed,
                             "labels": int(len(subset)),
                             "macro_f1": float(f1_score(y_eval, proba.argmax(1), average="macro",
                                                        sample_weight=weights)),
                             "accuracy": float(np.average(proba.argmax(1) == y_eval,
                                                          weights=weights)),
                             "auc": float(auc),
                             "per_class": per_class(y_eval, proba.argmax(1), names, weights)})
            sel = [r for r in rows if r["fraction"] == fraction and r["n0"] == n0
                   and r["balance"] == balance]

            def stat(key, sel=sel):
                return f"{np.mean([r[key] for r in sel]):.3f} ± {np.std([r[key] for r in sel]):.3f}"

            rare = ""
            if args.keep:
                kept = args.keep.rpartition(":")[0]
                rare = "; {}: recall {:.3f}, precision {:.3f}, F1 {:.3f}".format(kept, *(
                    np.mean([r["per_class"][kept][k] for r in sel])
                    for k in ("recall", "precision", "f1")))
            log(f"{fraction:g} ({sel[0]['labels']} labels), n0 {n0:g}, balance {balance}: "
                f"macro-F1 {stat('macro_f1')}, accuracy {stat('accuracy')}, AUC {stat('auc')}"
                + rare)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
