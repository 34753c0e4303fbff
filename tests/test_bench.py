import json
from pathlib import Path

import pytest

from mimir import bench, memory
from mimir.cli import build_parser, load_handler
from mimir.errors import ConfigError

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


def test_step_memory_is_estimated_from_two_small_steps(tiny_config):
    """The fit predicts a real step 4x beyond its larger probe within its margin."""
    estimate = memory.estimate_memory("finetune", tiny_config, bench.torch.device("cpu"))
    assert estimate.per_image_mb > 0 and estimate.state_mb > 0
    images = bench.torch.rand(128, 3, 16, 16)
    labels = bench.torch.randint(0, 10, (128,))
    step = memory.stage_step("finetune", tiny_config, images, labels, bench.torch.device("cpu"))
    step.step()
    measured = memory.step_memory_mb(step.step, bench.torch.device("cpu"))
    assert measured / memory.ACTIVATION_MARGIN * 0.8 <= estimate.step_mb(128) <= measured * memory.ACTIVATION_MARGIN * 1.5


def test_a_batch_that_cannot_fit_is_refused_with_one_that_does(monkeypatch):
    estimates = {"mimir": memory.MemoryEstimate(state_mb=100, base_mb=20, per_image_mb=2.0),
                 "pgd10_at": memory.MemoryEstimate(state_mb=80, base_mb=10, per_image_mb=8.0)}
    monkeypatch.setattr(memory, "available_mb", lambda device: 2000.0)
    # 0.9 * 2000 = 1800 MB: states 180, so 1620 / 1.25 = 1296 MB for pgd10_at's (10 + 8 b): b <= 160.75
    assert memory.largest_batch(estimates, 1800.0) == 160
    memory.check_memory(estimates, 160, bench.torch.device("cpu"))
    with pytest.raises(ConfigError) as error:
        memory.check_memory(estimates, 512, bench.torch.device("cpu"))
    message = str(error.value)
    assert message.startswith("--batch 512 does not fit") and "pgd10_at needs about 5.2 GB" in message
    assert "2.0 GB are available" in message and message.endswith("--batch 160 fits")


def test_bench_refuses_before_timing_when_the_batch_cannot_fit(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_mb", lambda device: 1.0)  # 1 MB: nothing fits
    with pytest.raises(ConfigError, match="no batch fits"):
        bench.run_bench(_parse([*TINY, "--methods", "mae"]))
    assert "[bench] round" not in capsys.readouterr().out  # refused before any timing


def test_mimir_run_refuses_a_batch_that_cannot_fit_before_ray(monkeypatch, tmp_path, data_root):
    from mimir import runner
    from mimir.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(memory, "available_mb", lambda device: 200.0)  # room for a small batch, far from 4096
    monkeypatch.setattr(runner, "init_ray", lambda: pytest.fail("Ray must not start"))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [f"output_dir={tmp_path / 'run'}", f"data.root={data_root}",
                                                  "scaling.num_workers=2", "pretrain.batch_size=4096"])
    with pytest.raises(ConfigError, match=r"^pretrain.batch_size 4096 does not fit .* pretrain.batch_size \d+ fits$"):
        runner.run_pipeline(cfg)
    assert not (tmp_path / "run" / "config.json").exists()


def test_bench_rejects_unknown_methods():
    with pytest.raises(ConfigError, match="unknown pgd7"):
        bench.run_bench(_parse([*TINY, "--methods", "mae,pgd7"]))


def test_bench_ray_overhead(ray_local, data_root, tmp_path):
    args = _parse([*TINY, f"data.root={data_root}", "--methods", "mae", "--ray", "--ray-epochs", "2",
                   "--ray-batch", "256", "--out", str(tmp_path / "b.json")])
    ray_report = bench.run_bench(args)["ray"]
    assert len(ray_report["ray_epoch_seconds"]) == len(ray_report["bare_epoch_seconds"]) == 2
    assert ray_report["ray_overhead"] > 0


@pytest.mark.slow  # compiling even a tiny model's steps takes tens of seconds on a CPU
def test_bench_compile_checks_losses_then_times_both_alternately(tmp_path, capsys):
    out = tmp_path / "compile.json"
    args = _parse([*TINY, "--compile", "--methods", "mimir", "--out", str(out)])
    assert args.handler(args) == 0
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["mimir"]  # no MAE unless asked for: compiling costs seconds
    for name, row in report["methods"].items():
        assert len(row["eager_losses"]) == len(row["compiled_losses"]) == bench.COMPILE_CHECK_STEPS
        assert row["losses_match"] and row["largest_loss_difference"] <= bench.COMPILE_TOLERANCE["fp32"], name
        # the steps really train: three seeded steps from one initialization do not repeat a loss
        assert len(set(row["eager_losses"])) == bench.COMPILE_CHECK_STEPS
        assert row["eager"]["median_s"] > 0 and row["compiled"]["median_s"] > 0
        assert row["speedup"] == pytest.approx(row["eager"]["median_s"] / row["compiled"]["median_s"])
    assert report["target"]["mimir_speedup"] == report["methods"]["mimir"]["speedup"]
    assert "target MIMIR compiled speed-up" in capsys.readouterr().out


def test_a_compiled_model_keeps_its_parameter_names(tiny_config):
    from mimir.models import build_mae
    from mimir.train.steps import compile_forward

    eager, compiled = build_mae(tiny_config), compile_forward(build_mae(tiny_config))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    assert compile_forward(eager, on=False)._compiled_call_impl is None
    assert compiled._compiled_call_impl is not None


def test_bench_data_times_ray_data_against_a_bare_loop(ray_local, tmp_path, capsys):
    args = _parse(["--data", "--data-images", "24", "--data-epochs", "1", "--data-cpus", "2",
                   "--out", str(tmp_path / "data.json")])
    assert args.handler(args) == 0
    report = json.loads((tmp_path / "data.json").read_text())
    assert report["images"] == 24 and report["mean_jpeg_kb"] > 10  # real JPEGs of ImageNet's size
    assert len(report["epoch_seconds"]["ray"]) == len(report["epoch_seconds"]["bare"]) == 1
    assert report["ratio_per_cpu"] == pytest.approx(
        report["ray_images_per_second_per_cpu"] / report["bare_images_per_second_per_cpu"])
    assert report["data_cpus_per_gpu"] >= report["paper_images_per_second_per_gpu"] / report[
        "ray_images_per_second_per_cpu"]
    assert "CPUs per GPU" in capsys.readouterr().out


def test_synthetic_jpegs_have_imagenet_sizes():
    import io

    import numpy as np
    from PIL import Image

    from mimir.data.bench import synthetic_jpeg

    rng = np.random.default_rng(0)
    for _ in range(3):
        blob = synthetic_jpeg(rng)
        with Image.open(io.BytesIO(blob)) as image:
            assert image.format == "JPEG" and 400 <= image.width <= 500 and 300 <= image.height <= 375
        assert 20_000 < len(blob) < 400_000


def test_a_bench_of_a_run_config_prices_that_configs_sweep(tmp_path):
    """`mimir bench --config quickstart` times the quickstart's own model at its image size, and
    `mimir sweep digits_table7 --plan --costs` prices every trial of the digits Table 7 from it."""
    from mimir.plan import plan_sweep

    out = tmp_path / "bench-cpu.json"
    args = _parse(["--config", "quickstart", "--batch", "8", "--steps", "1", "--rounds", "1", "--warmup", "0",
                   "--device", "cpu", "--out", str(out)])
    assert args.handler(args) == 0
    report = json.loads(out.read_text())
    assert report["arguments"]["img_size"] == 16 and report["arguments"]["patch_size"] == 4
    assert (report["config"]["model"]["embed_dim"], report["config"]["model"]["depth"]) == (128, 4)
    plan = plan_sweep("digits_table7", costs=[out])
    assert not plan.unpriced and plan.device_hours > 0
    assert all(t.device.kind == "cpu" for t in plan.trials)
