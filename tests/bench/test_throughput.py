"""bench.throughput: both pretraining recipes are measured and reported beside the matmul rate."""

from __future__ import annotations

import json

import pytest

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


def test_embedding_at_two_sizes_is_measured_at_the_larger_one(tmp_path):
    out = tmp_path / "throughput.json"
    assert throughput.main(["--sizes", "32", "--steps", "1", "--batch-size", "4",
                            "--recipes", "fp32", "--embed-scales", "1,2",
                            "--out", str(out)]) == 0
    one = json.loads(out.read_text())["rows"][0]
    assert one["embed_scales"] == [1, 2]
    # the 64 px pass costs about four times the 32 px one: five passes' worth of FLOPs
    assert throughput.main(["--sizes", "32", "--steps", "1", "--batch-size", "4",
                            "--recipes", "fp32", "--out", str(out)]) == 0
    single = json.loads(out.read_text())["rows"][0]
    assert single["embed_scales"] == [1]
    assert 4.0 < one["embed_gflop_per_image"] / single["embed_gflop_per_image"] < 6.0
    # the third stage pooled beside the output costs no arithmetic of note: it is computed
    # on the way to the output either way
    assert throughput.main(["--sizes", "32", "--steps", "1", "--batch-size", "4",
                            "--recipes", "fp32", "--embed-scales", "1,2", "--embed-layers", "3,4",
                            "--out", str(out)]) == 0
    layers = json.loads(out.read_text())["rows"][0]
    assert layers["embed_layers"] == [3, 4]
    assert layers["embed_gflop_per_image"] == pytest.approx(one["embed_gflop_per_image"],
                                                            rel=0.01)
