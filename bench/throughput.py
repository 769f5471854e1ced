"""Pretraining and embedding throughput next to the machine's measured matmul FLOP/s.

    python -m bench.throughput [--sizes 28:small,32,64] [--arch resnet18] [--batch-size 64]
                               [--steps 5] [--device cpu|cuda] [--out results.json]

For each input size it times SimCLR pretraining steps (two views, forward + backward + AdamW)
and embedding (forward, no_grad), counts the FLOPs of one step with
``torch.utils.flop_counter.FlopCounterMode``, and reports images/s, achieved GFLOP/s, and the
fraction of the float32 matmul rate this machine reaches (the practical ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from ml_backend.ssl.config import check_layers, check_scales
from ml_backend.ssl.encoder import MultiScaleEncoder
from ml_backend.ssl.loop import cpu_has_bf16
from ml_backend.ssl.losses import NTXentLoss
from ml_backend.ssl.train import PretrainConfig, SimCLRModel


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10,
                  dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


RECIPES = {
    # name: (bf16 autocast on a CPU with native bf16, channels-last tensors)
    "fp32": (False, False),            # before issue 14: plain float32, NCHW
    "bf16-cl": (True, True),           # the pretraining default since (PretrainConfig)
}


def measure(size: int, small: bool, args, device: torch.device, recipe: str = "fp32") -> dict:
    from ml_backend.ssl.loop import autocast

    bf16, channels_last = RECIPES[recipe]
    config = PretrainConfig(arch=args.arch, image_size=size, small_input=small,
                            batch_size=args.batch_size, cpu_bf16=bf16,
                            channels_last=channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = SimCLRModel(config).to(device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = NTXentLoss(0.2)
    views = torch.rand(2 * args.batch_size, 1, size, size, device=device).contiguous(
        memory_format=memory_format)

    def train_step():
        with autocast(device, True, cpu_bf16=bf16):
            z = model(views)
            loss = criterion(*z.float().chunk(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    scales = check_scales(str(args.embed_scales).split(","))
    layers = check_layers(str(args.embed_layers).split(","))
    reader = (model.encoder if scales == (1,) and layers == (4,)
              else MultiScaleEncoder(model.encoder, scales, layers))
    # what the product embeds: the scan at size x the largest scale, every scale read from it
    embed_views = torch.rand(args.batch_size, 1, size * scales[-1], size * scales[-1],
                             device=device).contiguous(memory_format=memory_format)

    def embed_step():
        with torch.no_grad():
            reader(embed_views)

    model.train()
    train_flops = _flops(train_step)
    train_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    _sync(device)
    train_s = (time.perf_counter() - start) / args.steps
    model.eval()
    embed_flops = _flops(embed_step)
    embed_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        embed_step()
    _sync(device)
    embed_s = (time.perf_counter() - start) / args.steps
    return {
        "recipe": recipe,
        "size": size, "small_input": small, "arch": args.arch, "batch_size": args.batch_size,
        "pretrain_images_per_s": args.batch_size / train_s,
        "pretrain_gflop_per_image": train_flops / args.batch_size / 1e9,
        "pretrain_gflops_achieved": train_flops / train_s / 1e9,
        "embed_scales": list(scales),
        "embed_layers": list(layers),
        "embed_images_per_s": args.batch_size / embed_s,
        "embed_gflop_per_image": embed_flops / args.batch_size / 1e9,
        "embed_gflops_achieved": embed_flops / embed_s / 1e9,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="28:small,32,64",
                        help="comma list of SIZE or SIZE:small (3x3 stride-1 stem)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--recipes", default="fp32,bf16-cl",
                        help=f"comma list of {', '.join(RECIPES)} (pretraining precision and "
                             "memory layout; embedding stays float32)")
    parser.add_argument("--embed-scales", default="1",
                        help="embedding rows read each image at these multiples of SIZE, "
                             "side by side (the product's MEDLABEL_EMBED_SCALES, e.g. 1,2)")
    parser.add_argument("--embed-layers", default="4",
                        help="the encoder's stages pooled at each size (the product's "
                             "MEDLABEL_EMBED_LAYERS, e.g. 3,4)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        check_scales(args.embed_scales.split(","))
    except ValueError as exc:
        raise SystemExit(f"--embed-scales: {exc}") from None
    try:
        check_layers(args.embed_layers.split(","))
    except ValueError as exc:
        raise SystemExit(f"--embed-layers: {exc}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = matmul_gflops(device)
    # bf16 only where the hardware computes it: emulated (AVX2-only CPUs) it runs at ~1
    # GFLOP/s, so the 2048-wide matmul would take minutes and measure nothing the recipes use
    # (autocast stays off there too: ml_backend.ssl.loop.autocast)
    native_bf16 = device.type == "cuda" or cpu_has_bf16()
    machine = {"device": device.type, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "processor": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
               "matmul_gflops_fp32": peak,
               "native_bf16": native_bf16,
               "matmul_gflops_bf16": (matmul_gflops(device, dtype=torch.bfloat16)
                                      if native_bf16 else None)}
    print(f"{device.type}: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"float32 matmul {peak:.1f} GFLOP/s")
    rows = []
    print(f"bf16 matmul {machine['matmul_gflops_bf16']:.1f} GFLOP/s" if native_bf16 else
          "bf16: not native on this CPU (emulated, not measured; the bf16-cl recipe runs "
          "float32 with channels-last here)")
    header = (f"{'recipe':>8} {'input':>10} {'pretrain img/s':>15} {'GFLOP/img':>10} "
              f"{'% of fp32 matmul':>16} {'embed img/s':>12} {'% of matmul':>12}")
    print(header)
    for item in args.sizes.split(","):
        size_text, _, flag = item.partition(":")
        for recipe in args.recipes.split(","):
            if recipe not in RECIPES:
                raise SystemExit(f"--recipes: unknown {recipe!r}; use {', '.join(RECIPES)}")
            row = measure(int(size_text), flag == "small", args, device, recipe)
            rows.append(row)
            label = f"{row['size']}px{' small' if row['small_input'] else ''}"
            print(f"{recipe:>8} {label:>10} {row['pretrain_images_per_s']:>15.1f} "
                  f"{row['pretrain_gflop_per_image']:>10.2f} "
                  f"{100 * row['pretrain_gflops_achieved'] / peak:>15.0f}% "
                  f"{row['embed_images_per_s']:>12.1f} "
                  f"{100 * row['embed_gflops_achieved'] / peak:>11.0f}%")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"machine": machine, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
