"""bench.throughput: both pretraining recipes are measured and reported beside the matmul rate."""

from __future__ import annotations

import json

from bench import throughput


def test_recipes_are_measured_side_by_side(tmp_path):
    out = tmp_path / "throughput.json"
    assert throughput.main(["--sizes", "32", "--steps", "1", "--batch-size", "8",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["recipe"] for r in result["rows"]] == ["fp32", "bf16-cl"]
    assert result["machine"]["matmul_gflops_fp32"] > 0
    # measured where the hardware has bf16; skipped (None), not emulated for minutes, elsewhere
    machine = result["machine"]
    if machine["native_bf16"]:
        assert machine["matmul_gflops_bf16"] > 0
    else:
        assert machine["matmul_gflops_bf16"] is None
    for row in result["rows"]:
        assert row["pretrain_images_per_s"] > 0 and row["pretrain_gflop_per_image"] > 0
