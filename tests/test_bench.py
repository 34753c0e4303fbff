import json

import pytest

from mimir import bench
from mimir.cli import build_parser, load_handler
from mimir.config import ConfigError

TINY = ["--img-size", "16", "--patch-size", "4", "--batch", "8", "--steps", "1", "--rounds", "1",
        "--warmup", "0", "--device", "cpu",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_heads=4"]


def _parse(argv):
    args = build_parser().parse_args(["bench", *argv])
    args.handler = load_handler(args.handler)
    return args


def test_bench_reports_every_method_relative_to_mimir(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = _parse([*TINY, "--out", str(out)])
    assert args.handler(args) == 0
    report = json.loads(out.read_text())

    assert list(report["methods"]) == list(bench.METHODS)
    for name, row in report["methods"].items():
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"], name
        assert len(row["step_seconds"]) == 1
        assert row["images_per_second"] > 0
        assert row["ratio_to_mimir"] > 0
        assert row["state_mb"] > 0
    assert report["methods"]["mimir"]["ratio_to_mimir"] == 1.0
    assert report["methods"]["pgd10_at"]["paper_ratio_to_mimir"] == pytest.approx(149.3 / 18.4)
    assert report["methods"]["mimir_renyi"]["paper_seconds_per_epoch"] is None
    methods = report["methods"]
    assert report["attack_and_mi_overhead"] == pytest.approx(methods["mimir"]["median_s"] / methods["mae"]["median_s"] - 1)
    assert report["mi_overhead_in_step"] == pytest.approx(
        methods["mimir"]["median_s"] / methods["adv_mae_1"]["median_s"] - 1)
    assert set(report["mi_only"]) == {"hsic_cca", "renyi"}
    assert 0 < report["attack_only"]["median_s"] and report["attack_only"]["ratio_to_mae_step"] > 0
    assert report["mi_only"]["hsic_cca"]["ratio_to_mae_step"] > 0
    assert report["mi_only"]["hsic_cca"]["z_shape"] == [8, 1 + 4, 32]  # 16 patches, 4 visible, width 32
    assert set(report["targets"]) == set(bench.TARGETS)
    assert report["arguments"]["batch"] == 8 and report["machine"]["device"] == "cpu"
    assert report["config"]["model"]["embed_dim"] == 32
    assert "pgd10_at" in capsys.readouterr().out


def test_bench_always_times_the_reference_methods(tmp_path):
    args = _parse([*TINY, "--methods", "fast_at", "--out", str(tmp_path / "b.json")])
    report = bench.run_bench(args)
    assert list(report["methods"]) == ["mae", "mimir", "fast_at"]
    assert set(report["mi_only"]) == {"hsic_cca"}
    assert report["targets"]["mimir_over_pgd10_at"]["value"] is None and report["mi_overhead_in_step"] is None


def test_bench_rejects_unknown_methods():
    with pytest.raises(ConfigError, match="unknown pgd7"):
        bench.run_bench(_parse([*TINY, "--methods", "mae,pgd7"]))


def test_bench_ray_overhead(ray_local, data_root, tmp_path):
    args = _parse([*TINY, f"data.root={data_root}", "--methods", "mae", "--ray", "--ray-epochs", "2",
                   "--ray-batch", "256", "--out", str(tmp_path / "b.json")])
    ray_report = bench.run_bench(args)["ray"]
    assert len(ray_report["ray_epoch_seconds"]) == len(ray_report["bare_epoch_seconds"]) == 2
    assert ray_report["ray_overhead"] > 0
