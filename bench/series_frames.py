"""What one slice of a stacked series costs to show, and what stacking a series costs.

    python -m bench.series_frames --slices 150,300,600 --out bench/results/series_frames.json

For each size, a CT series of ``--slices`` slices of ``--side`` px (``bench.pacs_throughput``'s
study builder: real DICOM headers, 12-bit pixels, rescale to HU) is decoded slice by slice as
the import does, stacked (``ml_backend.data.series.stack_series``) and the stack read for its
row and preview (``decode_scan(keep_copy=False)``, as the import reads a stack; and with a
de-identified copy written, as it did before), then
``--frames`` slices spread over the stack are rendered as the label page's window endpoint
does (``decode_scan(keep_copy=False, frame=k, window=...)`` + ``render_preview``). Reported:
wall time and peak traced Python memory (``tracemalloc``) of each step. Times under
tracemalloc are slower than without; ``--no-trace`` times without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np


def build(slices: int, side: int) -> list[bytes]:
    from bench.pacs_throughput import build_study, dicom_bytes, synthetic_identity

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (side, side), dtype=np.uint8) for _ in range(slices)]
    return [dicom_bytes(ds) for ds in build_study(images, synthetic_identity(1), modality="CT",
                                                  body_part="CHEST", side=side)]


def measure(files: list[bytes], frames: int, trace: bool) -> dict:
    from ml_backend.data.decode import decode_scan, render_preview
    from ml_backend.data.series import stack_series

    limit = 10 ** 10
    steps: dict = {}

    def step(name, work):
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        try:
            result = work()
        finally:
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1] if trace else None
            if trace:
                tracemalloc.stop()
        steps[name] = {"seconds": round(seconds, 4),
                       "peak_mb": None if peak is None else round(peak / 2 ** 20, 1)}
        return result

    def decode_slices():
        out = [replace(decode_scan(f, name="slice.dcm", salt="bench", max_pixels=limit),
                       pixels=None) for f in files]
        return out, [hashlib.sha256(f).hexdigest() for f in files]

    slices, digests = step("decode_slices", decode_slices)
    stack = step("stack", lambda: stack_series(slices, digests))
    data = stack.data
    slices = stack = None     # let the slices and the stack object go; the bytes stay
    step("read_stack", lambda: decode_scan(data, name="series", salt="bench", max_pixels=limit,
                                           keep_copy=False))
    # what the import did with a stack until the thirty-third session (and still does with a
    # multi-frame file uploaded as it is): every frame decoded and a de-identified copy written
    step("read_stack_with_copy", lambda: decode_scan(data, name="series", salt="bench",
                                                     max_pixels=limit))
    count = len(files)
    picks = sorted({round(i * (count - 1) / max(frames - 1, 1)) for i in range(frames)})
    per_frame = []
    for k in picks:
        step("frame", lambda k=k: render_preview(
            decode_scan(data, salt="bench", keep_copy=False, max_pixels=limit, frame=k,
                        window=(40, 400)).pixels, max_side=1024))
        per_frame.append(steps["frame"])
    steps["frame"] = {"seconds_median": round(float(np.median([f["seconds"] for f in per_frame])), 4),
                      "peak_mb_max": (max(f["peak_mb"] for f in per_frame) if trace else None),
                      "frames": picks}
    return {"stack_mb": round(len(data) / 2 ** 20, 1), "steps": steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", default="150,300,600")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--frames", type=int, default=7, help="slices rendered per stack")
    parser.add_argument("--no-trace", action="store_true", help="time without tracemalloc")
    parser.add_argument("--out", default="bench/results/series_frames.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "medsite.settings")
    rows = []
    for count in (int(v) for v in args.slices.split(",")):
        files = build(count, args.side)
        row = {"slices": count, "side": args.side,
               **measure(files, args.frames, not args.no_trace)}
        rows.append(row)
        s = row["steps"]
        print(f"{count} slices ({row['stack_mb']} MB): decode slices {s['decode_slices']['seconds']:.1f}s "
              f"peak {s['decode_slices']['peak_mb']} MB; stack {s['stack']['seconds']:.2f}s peak "
              f"{s['stack']['peak_mb']} MB; read stack {s['read_stack']['seconds']:.3f}s peak "
              f"{s['read_stack']['peak_mb']} MB (with a copy {s['read_stack_with_copy']['seconds']:.2f}s "
              f"peak {s['read_stack_with_copy']['peak_mb']} MB); one slice shown {s['frame']['seconds_median'] * 1000:.0f} ms "
              f"peak {s['frame']['peak_mb_max']} MB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": {"python": platform.python_version(),
                                                               "cpus": os.cpu_count()},
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
