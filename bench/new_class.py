"""A new anomaly type from a few labels, without a retrain and without forgetting.

    python -m bench.new_class --train SPEC --eval SPEC|split:0.2 [--holdout all|NAME]
        [--new-labels 10,20] [--seeds 5] [SimCLRv2 options as in bench.ssl_eval] --out results.json

Uses the same data readers and cached SimCLRv2 encoder as ``bench.ssl_eval`` (same options →
no new pretraining). For each held-out class H: a calibrated linear head (the loop's refit,
``ml_backend.active.refit.fit_head``) is fit on the embeddings of every train scan of the
other classes; then H is "added mid-project" with K random train examples (K in
``--new-labels``, per seed) and the head is refit on old + K. Reported on the eval set:

- recall (and precision, F1) of H with K labels (target: recall ≥ 0.80);
- the old classes' macro-F1 on their own eval scans before and after adding H (forgetting;
  target: a drop of at most 2 points);
- precision@20 of the candidates the loop would offer for H: the nearest train scans (cosine)
  to its K examples among all others, i.e. how many of the first 20 really are H;
- the ceiling: the same head fit on *every* train label, the held-out class included — its
  recall there is what the encoder and head allow with all labels, against which the K-label
  recall is read;
- with ``--old-labels-fraction F < 1``, only that share of each old class is labeled and the
  rest joins the unlabeled pool with the new class's unlabeled scans, as in a project; the
  ``selftrain:TAU`` head then adds the pool scans the head itself predicts with calibrated
  probability ≥ TAU as pseudo-labels and refits once (self-training);
- with ``--confirm-rounds R``, what happens after the first K: R rounds in which a clinician
  answers 20 unlabeled scans correctly (the new class, or its own old class) and the head is
  refit — recall, precision and forgetting after each round, with how many answers it took.
  ``--review-order`` picks the 20: the nearest to the class's examples (the class page's
  list), a spread of them, random scans, or the head's least certain (the worklist's way);
- ``--heads finetuned``: instead of a head on the frozen embeddings, the network fine-tuned
  (LP-FT, ``ml_backend.ssl.train.finetune`` with the ``--finetune-*`` options, as a scheduled
  retrain does) on the labels — the old classes' before the new class, old + K after, every
  train label for the ceiling — predicting the eval scans itself;
- (*) the same with K labeled scans of every old class too, by nearest neighbours and by
  label propagation over the k-NN graph (what the class page offers), on the same pool.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from bench.ssl_eval import (build_parser, embed_sets, finetune_config, get_encoder, hybrid_pixels,
                            load_data, log, network_arrays, pretrain_config)
from ml_backend.active.features import block_weights, head_inputs, thumbnails
from ml_backend.active.refit import fit_head, fit_head_choosing_block


def old_macro_f1(head, x, y, old: list[int]) -> float:
    mask = np.isin(y, old)
    pred = head.class_ids[head.predict_proba(x[mask]).argmax(1)]
    return float(f1_score(y[mask], pred, labels=old, average="macro", zero_division=0))


def candidates_precision(train_x, train_y, examples: np.ndarray, labeled: np.ndarray,
                         holdout: int, top: int = 20) -> float:
    unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    pool = np.setdiff1d(np.arange(len(train_y)), labeled)
    best = (unit[pool] @ unit[examples].T).max(axis=1)
    chosen = pool[np.argsort(-best)[:top]]
    return float((train_y[chosen] == holdout).mean())


def propagated_precision(train_x, train_y, picks: np.ndarray, holdout: int, *, seed: int,
                         top: int = 20) -> tuple[float, float]:
    """P@``top`` of the candidates for the new class, two ways over the same pool, when a
    clinician has labeled its K ``picks`` and K scans of each old class: nearest neighbours
    of the picks (cosine) and label propagation over the k-NN graph
    (``ml_backend.active.propagation``). Returns ``(nearest, propagated)``."""
    from ml_backend.active.propagation import UNLABELED, propagate

    rng = np.random.default_rng(seed)
    seeds = [picks] + [rng.choice(np.flatnonzero(train_y == c), len(picks), replace=False)
                       for c in np.unique(train_y) if c != holdout]
    seeds = np.concatenate(seeds)
    labels = np.full(len(train_y), UNLABELED)
    labels[seeds] = train_y[seeds]
    pool = np.setdiff1d(np.arange(len(train_y)), seeds)
    proba = propagate(train_x, labels)
    by_propagation = pool[np.argsort(-proba[pool, holdout])[:top]]
    unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    by_neighbour = pool[np.argsort(-(unit[pool] @ unit[picks].T).max(axis=1))[:top]]
    return (float((train_y[by_neighbour] == holdout).mean()),
            float((train_y[by_propagation] == holdout).mean()))


REVIEW_ORDERS = ("nearest", "diverse", "random", "margin")


def confirm_candidates(train_x, train_y, labeled: np.ndarray, holdout: int, *, rounds: int,
                       top: int = 20, order: str = "nearest", seed: int = 0,
                       fit_labeled=None, head_x=None):
    """The class page's review, simulated: per round, ``top`` unlabeled scans are labeled
    with their true class. ``order``: ``nearest`` — the scans nearest (cosine, best over the
    class's labeled examples) to the ``holdout`` class, as the class page lists them;
    ``diverse`` — from the ``5 × top`` nearest, ``top`` picked farthest-first (each the
    candidate farthest from the class's examples and the picks so far), so a round does not spend
    itself on near-copies of one example; ``random`` — any ``top`` of the pool; ``margin`` —
    the ``top`` with the smallest gap between the two most probable classes of the head
    ``fit_labeled(rows)`` fits on the labels so far (uncertainty sampling, as the worklist
    ranks within a label set, without its diversity step). Yields
    ``(labeled rows so far, new-class scans found this round)`` after each round; stops early
    when the pool is empty. ``head_x``: what ``fit_labeled``'s head reads (``train_x``
    unless given)."""
    if order not in REVIEW_ORDERS:
        raise ValueError(f"order must be one of {REVIEW_ORDERS}")
    unit = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    labeled = np.asarray(labeled)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        pool = np.setdiff1d(np.arange(len(train_y)), labeled)
        if not len(pool):
            return
        examples = labeled[train_y[labeled] == holdout]
        if order == "random":
            chosen = rng.choice(pool, min(top, len(pool)), replace=False)
        elif order == "margin":
            head_x = train_x if head_x is None else head_x
            proba = np.sort(fit_labeled(labeled).predict_proba(head_x[pool]), axis=1)
            chosen = pool[np.argsort(proba[:, -1] - proba[:, -2], kind="stable")[:top]]
        else:
            ranked = pool[np.argsort(-(unit[pool] @ unit[examples].T).max(axis=1))]
            chosen = ranked[:top] if order == "nearest" else farthest_first(
                unit, ranked[:5 * top], examples, top)
        labeled = np.concatenate([labeled, chosen])
        yield labeled, int((train_y[chosen] == holdout).sum())


def farthest_first(unit: np.ndarray, candidates: np.ndarray, anchors: np.ndarray,
                   count: int) -> np.ndarray:
    """``count`` of ``candidates`` picked greedily, each the one with the lowest best cosine
    to the ``anchors`` and to those already picked (k-centre over unit vectors)."""
    closest = (unit[candidates] @ unit[anchors].T).max(axis=1)
    picked = []
    for _ in range(min(count, len(candidates))):
        best = int(np.argmin(closest))
        picked.append(candidates[best])
        closest = np.maximum(closest, unit[candidates] @ unit[candidates[best]])
        closest[best] = np.inf
    return np.array(picked, dtype=candidates.dtype)


class SharedCovarianceHead:
    """Linear discriminant analysis as a head (``lda:S``): one Gaussian per class with a
    covariance shared by all (shrunk towards the identity by ``S``, or Ledoit-Wolf's
    ``auto``) and uniform priors, so a class with 20 labels borrows its spread from classes
    with hundreds instead of drawing a boundary around its few examples. Compared with the
    refit's logistic head, not used by the product."""

    def __init__(self, x, y, shrinkage):
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        self.class_ids = np.unique(y)
        self.model = LinearDiscriminantAnalysis(
            solver="lsqr", shrinkage=shrinkage,
            priors=np.full(len(self.class_ids), 1.0 / len(self.class_ids))).fit(x, y)

    def predict_proba(self, x):
        return self.model.predict_proba(x)


def head_options(name: str) -> dict:
    """``fit_head`` options of a --heads entry (``NAME[+px|+auto][@C]``: ``+px`` fits it on
    the embedding and a pixel thumbnail side by side, as ``--hybrid-pixels`` says; ``+auto``
    as the refit does, with the thumbnail only where it predicts the labels better out of
    fold (``fit_head_choosing_block``); ``@C`` sets the logistic head's inverse L2
    strength, 1 by default). Heads with a balance correction need the
    out-of-fold step (4 folds); the others skip it (``folds=0``: one temperature for every
    logit cannot change an argmax, so recall, precision and F1 are the same, 5x faster)."""
    name, _, strength = name.partition("@")
    pixels = "auto" if name.endswith("+auto") else name.endswith("+px")
    options = _head_options(name.removesuffix("+px").removesuffix("+auto"))
    if pixels:
        if "lda" in options:
            raise SystemExit("--heads: +px and +auto apply to the logistic heads, not lda")
        options["pixels"] = pixels
    if strength:
        if "lda" in options:
            raise SystemExit("--heads: @C applies to the logistic heads, not lda")
        options["c"] = float(strength)
    return options


def _head_options(name: str) -> dict:
    if name == "linear":
        return {"prototype_n0": 0.0, "folds": 0}
    if name == "product":
        from ml_backend.active.refit import PRODUCT_BALANCE, PRODUCT_PROTOTYPE_N0

        return {"prototype_n0": PRODUCT_PROTOTYPE_N0, "balance": PRODUCT_BALANCE,
                "folds": 4 if PRODUCT_BALANCE > 0 else 0}
    if name.startswith("blend:"):
        return {"prototype_n0": float(name.split(":", 1)[1]), "folds": 0}
    if name.startswith("selftrain:"):
        from ml_backend.active.refit import PRODUCT_BALANCE

        return {"balance": PRODUCT_BALANCE, "folds": 4,
                "selftrain": float(name.split(":", 1)[1])}
    if name.startswith("balance:"):
        return {"balance": float(name.split(":", 1)[1]), "folds": 4}
    if name == "shares":
        return {"balance": 1.0, "folds": 4, "shares": True}
    if name.startswith("lda:"):
        value = name.split(":", 1)[1]
        return {"lda": value if value == "auto" else float(value)}
    raise SystemExit(f"--heads: unknown head {name!r} (linear, product, blend:N0, "
                     "balance:B, shares, selftrain:TAU or lda:S, each optionally @C)")


def fit_one(x, y, *, seed: int, lda=None, embedding_dim=None, finetuned=None, shares=False,
            pool_x=None, **options):
    """The head a --heads entry names, fit on ``(x, y)`` (with ``embedding_dim``: the
    refit's choice of the pixel block, ``x`` holding the embedding and the thumbnail; with
    ``finetuned``: ``x`` holds train row indices, and the network is fine-tuned on them;
    with ``shares``: its offsets are fit for the class shares EM estimates over ``(x, y)``
    and the unlabeled ``pool_x``, ``fit_head(pool_x=...)``; none given: the labels')."""
    if shares:        # the offsets fit for the project's shares (fit_head(pool_x=...))
        options["pool_x"] = np.zeros((0, np.asarray(x).shape[1])) if pool_x is None else pool_x
    if finetuned is not None:
        return FinetunedHead(rows=np.asarray(x).ravel(), **{
            **finetuned, "ft_config": replace(finetuned["ft_config"], seed=seed)})
    if lda is not None:
        return SharedCovarianceHead(x, y, lda)
    if embedding_dim is not None:
        return fit_head_choosing_block(x, y, seed=seed, embedding_dim=embedding_dim,
                                       **options)[0]
    return fit_head(x, y, seed=seed, **options)[0]


def fit(x, y, pool_x, *, seed: int, selftrain: float | None = None, **options):
    """``fit_head`` on ``(x, y)``; with ``selftrain`` TAU, once more with the ``pool_x`` scans
    it predicts at calibrated probability ≥ TAU added as pseudo-labels. Returns the head and
    the number of pseudo-labels."""
    head = fit_one(x, y, seed=seed, pool_x=pool_x, **options)
    if selftrain is None or not len(pool_x):
        return head, 0
    proba = head.predict_proba(pool_x)
    keep = proba.max(axis=1) >= selftrain
    pseudo = head.class_ids[proba.argmax(axis=1)][keep]
    head = fit_one(np.concatenate([x, pool_x[keep]]), np.concatenate([y, pseudo]),
                   seed=seed, **options)
    return head, int(keep.sum())


class FinetunedHead:
    """The network ``ml_backend.ssl.train.finetune`` makes of the encoder on the labeled
    ``rows`` of ``images`` (classes remapped to ``0..n-1``, mapped back in ``class_ids``), as
    a head: ``predict_proba`` takes row indices of the ``images`` it was built for
    (``bench.new_class`` passes the eval set's)."""

    def __init__(self, encoder, config, network, images, labels, rows, eval_images, ft_config,
                 device):
        from ml_backend.ssl.train import finetune, predict_proba

        self.class_ids = np.unique(labels[rows])
        local = np.searchsorted(self.class_ids, labels[rows])
        model, _ = finetune(encoder, config, images[rows], local, len(self.class_ids),
                            ft_config, device=device)
        self.proba = predict_proba(model, eval_images, network, device=device)

    def predict_proba(self, rows):
        return self.proba[np.asarray(rows).ravel()]


def main(argv=None) -> int:
    parser = build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--holdout", default="all", help="class name, or all (each in turn)")
    parser.add_argument("--new-labels", default="10,20")
    parser.add_argument("--heads", default="linear",
                        help="comma-separated heads to compare: linear (the refit's head "
                             "without prototypes or balance), blend:N0 (linear + "
                             "nearest-class-mean, w_c = N0 / (N0 + n_c)), balance:B "
                             "(linear + B x the class-balanced out-of-fold offsets), shares "
                             "(balance:1 with the offsets fit for the project's class shares, "
                             "EM over the labeled and pool scans), product "
                             "(what the refit fits today), selftrain:TAU (product + one round "
                             "of self-training on the pool at confidence TAU; see "
                             "--old-labels-fraction), lda:S (linear discriminant analysis: "
                             "a covariance shared by every class, shrinkage S or auto, "
                             "uniform priors); NAME+px: on the embedding and a pixel thumbnail "
                             "(--hybrid-pixels SIDE:WEIGHT); NAME@C sets a logistic head's C "
                             "(default 1); finetuned: the network fine-tuned on the labels "
                             "(--finetune-* options; set --finetune-epochs, 30 by default)")
    parser.add_argument("--old-labels-fraction", type=float, default=1.0,
                        help="share of each old class's train scans that is labeled (the rest "
                             "is unlabeled pool, with the new class's unlabeled scans); 1 = all")
    parser.add_argument("--confirm-rounds", type=int, default=0,
                        help="after the first K, rounds of 20 answered scans (chosen by "
                             "--review-order, each answered correctly), refitting after each")
    parser.add_argument("--review-order", choices=REVIEW_ORDERS, default="nearest",
                        help="which 20 a review round shows: the nearest to the class's "
                             "examples (the class page), a farthest-first spread of the 100 "
                             "nearest, random scans of the pool, or the smallest margin of the "
                             "head fit so far (uncertainty)")
    args = parser.parse_args(argv)
    if not 0 < args.old_labels_fraction <= 1:
        raise SystemExit("--old-labels-fraction must be in (0, 1]")
    started = time.perf_counter()
    config = pretrain_config(args)
    args.image_size = config.image_size
    data = load_data(args)
    names = data["class_names"]
    encoder, pre = get_encoder(data["x_train"], config, Path(args.cache_dir), args.device,
                               init=args.init_checkpoint, epochs=args.epochs)
    embedded = embed_sets(encoder, data, config, args)
    train_x, eval_x = embedded["train"], embedded["eval"]
    train_y, eval_y = data["y_train"], data["y_eval"]
    side, weight = hybrid_pixels(args)
    hybrid = (head_inputs(train_x, thumbnails(data["x_train"], side)),
              head_inputs(eval_x, thumbnails(data["x_eval"], side)))
    pixel_weights = block_weights(train_x.shape[1], hybrid[0].shape[1] - train_x.shape[1],
                                  weight)
    holdouts = range(len(names)) if args.holdout == "all" else [names.index(args.holdout)]
    ks = [int(k) for k in args.new_labels.split(",")]
    heads = {name: {"finetuned": True} if name == "finetuned" else head_options(name)
             for name in args.heads.split(",")}
    if "finetuned" in heads and args.confirm_rounds:
        raise SystemExit("--confirm-rounds applies to the heads on the embeddings, not finetuned")
    eval_rows = np.arange(len(eval_y))[:, None]
    rows, ceiling = [], {}
    for head_name, options in heads.items():
        # the heads read hx / ex (the embedding, or it and the thumbnail); the candidates
        # the class page offers stay nearest neighbours in the embedding (train_x)
        pixels = options.pop("pixels", False)
        hx, ex = hybrid if pixels else (train_x, eval_x)
        if options.pop("finetuned", False):
            # the "features" are row indices: the head fine-tunes on the train images of
            # the rows it is given and predicts the eval images (row indices of eval_x)
            hx, ex = np.arange(len(train_y))[:, None], eval_rows
            ft_config = finetune_config(args)
            net, net_train, net_eval = network_arrays(data, config, ft_config)
            options["finetuned"] = dict(encoder=encoder, config=config, network=net,
                                        images=net_train, labels=train_y,
                                        eval_images=net_eval, device=args.device,
                                        ft_config=ft_config)
        if pixels:
            options["feature_weights"] = pixel_weights
        if pixels == "auto":
            options["embedding_dim"] = train_x.shape[1]
        plain = {k: v for k, v in options.items() if k != "selftrain"}
        full = fit_one(hx, train_y, seed=0, **plain)
        full_pred = full.class_ids[full.predict_proba(ex).argmax(1)]
        for h in holdouts:
            p, r, _, _ = precision_recall_fscore_support(eval_y == h, full_pred == h,
                                                         average="binary", zero_division=0)
            ceiling[f"{head_name}|{names[h]}"] = {"recall": float(r), "precision": float(p)}
        for h in holdouts:
            old = [c for c in range(len(names)) if c != h]
            old_rows = np.flatnonzero(train_y != h)
            if args.old_labels_fraction < 1:
                pick_old = np.random.default_rng(10_000 + h)
                old_rows = np.sort(np.concatenate([
                    pick_old.choice(np.flatnonzero(train_y == c),
                                    max(1, round(args.old_labels_fraction * (train_y == c).sum())),
                                    replace=False) for c in old]))
            before_head = fit_one(hx[old_rows], train_y[old_rows], seed=0, **plain)
            before = old_macro_f1(before_head, ex, eval_y, old)
            new_rows = np.flatnonzero(train_y == h)
            for k in ks:
                for seed in range(args.seeds):
                    picks = np.random.default_rng(seed).choice(new_rows, min(k, len(new_rows)),
                                                               replace=False)
                    rows_k = np.concatenate([old_rows, picks])

                    def refit(labeled, seed=seed, h=h, old=old, hx=hx, ex=ex):
                        """Fit on ``labeled`` rows (the rest is the pool); the new class's
                        precision, recall, F1, the old classes' macro-F1 and the pseudo-labels."""
                        pool = np.setdiff1d(np.arange(len(train_y)), labeled)
                        head, pseudo = fit(hx[labeled], train_y[labeled], hx[pool],
                                           seed=seed, **options)
                        pred = head.class_ids[head.predict_proba(ex).argmax(1)]
                        p, r, f, _ = precision_recall_fscore_support(
                            eval_y == h, pred == h, average="binary", zero_division=0)
                        return p, r, f, old_macro_f1(head, ex, eval_y, old), pseudo

                    p, r, f, after, pseudo = refit(rows_k)
                    reviewed = []
                    for number, (labeled, found) in enumerate(confirm_candidates(
                            train_x, train_y, rows_k, h, rounds=args.confirm_rounds,
                            order=args.review_order, seed=seed, head_x=hx,
                            fit_labeled=lambda rows, seed=seed, hx=hx: fit_one(
                                hx[rows], train_y[rows], seed=seed, **plain)),
                            start=1):
                        p_r, r_r, _, after_r, _ = refit(labeled)
                        reviewed.append({
                            "round": number, "answers": len(picks) + len(labeled) - len(rows_k),
                            "found": found,
                            "new_labels": int((train_y[labeled] == h).sum()),
                            "recall": float(r_r), "precision": float(p_r),
                            "old_drop_points": 100 * (before - after_r)})
                    rows.append({"confirm_rounds": reviewed,"head": head_name, "holdout": names[h], "k": k, "seed": seed,
                                 "recall": float(r), "precision": float(p), "f1": float(f),
                                 "old_macro_f1_before": before, "old_macro_f1_after": after,
                                 "old_drop_points": 100 * (before - after),
                                 "pseudo_labels": pseudo,
                                 "ceiling_recall": ceiling[f"{head_name}|{names[h]}"]["recall"],
                                 "candidates_precision_at_20": candidates_precision(
                                     train_x, train_y, picks, picks, h),
                                 **dict(zip(("candidates_p20_nearest_vs_k_per_class",
                                             "candidates_p20_propagated"),
                                            propagated_precision(train_x, train_y, picks, h,
                                                                 seed=seed)))})
    summary = {}
    print(f"\n{'head':>10} {'held-out class':>18} {'K':>3} {'recall':>13} {'precision':>13} "
          f"{'old F1 before':>14} {'old F1 after':>13} {'drop (pts)':>11} {'cand. P@20':>11} "
          f"{'NN P@20*':>9} {'LP P@20*':>9} {'all-label recall':>16}")
    for head_name in heads:
        for h in holdouts:
            for k in ks:
                sel = [r for r in rows if r["holdout"] == names[h] and r["k"] == k
                       and r["head"] == head_name]

                def stat(key, sel=sel):
                    return (float(np.mean([r[key] for r in sel])),
                            float(np.std([r[key] for r in sel])))

                key = f"{names[h]}@{k}" if len(heads) == 1 else f"{head_name}|{names[h]}@{k}"
                summary[key] = {name: stat(name) for name in
                                ("recall", "precision", "old_macro_f1_after",
                                 "old_drop_points", "candidates_precision_at_20",
                                 "candidates_p20_nearest_vs_k_per_class",
                                 "candidates_p20_propagated", "pseudo_labels")}
                s = summary[key]
                s["ceiling_recall"] = ceiling[f"{head_name}|{names[h]}"]["recall"]
                print(f"{head_name:>10} {names[h]:>18} {k:>3} {s['recall'][0]:>6.3f} ± "
                      f"{s['recall'][1]:.3f} {s['precision'][0]:>6.3f} ± {s['precision'][1]:.3f} "
                      f"{sel[0]['old_macro_f1_before']:>14.3f} {s['old_macro_f1_after'][0]:>13.3f} "
                      f"{s['old_drop_points'][0]:>+11.2f} "
                      f"{s['candidates_precision_at_20'][0]:>11.2f} "
                      f"{s['candidates_p20_nearest_vs_k_per_class'][0]:>9.2f} "
                      f"{s['candidates_p20_propagated'][0]:>9.2f} "
                      f"{s['ceiling_recall']:>16.3f}")
    if args.confirm_rounds > 0:
        print("\nAfter reviewing candidates (rounds of 20; recall / precision / old drop, "
              "new-class labels so far; mean over seeds)")
        for head_name in heads:
            for h in holdouts:
                for k in ks:
                    sel = [r for r in rows if r["holdout"] == names[h] and r["k"] == k
                           and r["head"] == head_name]
                    key = f"{names[h]}@{k}" if len(heads) == 1 else f"{head_name}|{names[h]}@{k}"
                    per_round = []
                    for number in range(1, args.confirm_rounds + 1):
                        done = [r["confirm_rounds"][number - 1] for r in sel
                                if len(r["confirm_rounds"]) >= number]
                        if not done:
                            break
                        per_round.append({name: float(np.mean([d[name] for d in done]))
                                          for name in ("answers", "new_labels", "recall",
                                                       "precision", "old_drop_points")})
                    summary[key]["after_review"] = per_round
                    cells = "  ".join(f"{d['answers']:.0f}: {d['recall']:.2f} / "
                                      f"{d['precision']:.2f} / {d['old_drop_points']:+.1f} "
                                      f"({d['new_labels']:.0f})" for d in per_round)
                    print(f"{head_name:>10} {names[h]:>18} {k:>3}  {cells}")
    payload = {"args": vars(args), "data": data["info"], "pretrain": pre, "rows": rows,
               "summary": summary, "ceiling": ceiling, "seconds": time.perf_counter() - started,
               "cpu_count": os.cpu_count()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, args.out)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
