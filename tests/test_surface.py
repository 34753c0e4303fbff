"""Loss surfaces (Eq. 23, Figure 5): Li et al.'s filter-normalized directions, the grid's losses,
the surface files and figure, ``mimir surface``'s errors; the check of a real sweep's surfaces
(:func:`check_trial_surfaces`, run by tests/test_sweep.py's one sweep that trains)."""

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimir import attacks
from mimir.cli import build_parser, main
from mimir.config import RunConfig
from mimir.seeding import stream_seed
from mimir.evaluation import load_classifier
from mimir.models import build_classifier
from mimir.spec import SurfaceSettings, load_spec, load_spec_check
from mimir.surface import (Surface, grid_losses, load_test_subset, plot_surfaces, random_directions,
                           settings_from_args)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def convit(tiny_config):
    """A tiny ConViT (16 tokens): linear, conv, positional, gating, LayerNorm and bias parameters."""
    model = tiny_config.model.model_copy(update={"arch": "convit_tiny", "patch_size": 4})
    cfg = tiny_config.model_copy(update={"model": model})
    return build_classifier(cfg, 10).eval()


def _settings(**fields):
    return SurfaceSettings(**{"steps": 3, "num_images": 8, "inputs": ["natural"], **fields})


def test_filter_normalized_directions_have_the_weights_filter_norms_and_leave_biases_and_norms_alone(convit):
    for direction in random_directions(convit, seed=123):
        for (name, weight), d in zip(convit.named_parameters(), direction):
            assert d.shape == weight.shape
            if weight.dim() <= 1:  # biases, LayerNorm, ConViT's gates: not perturbed (Li et al.)
                assert not d.any(), name
            else:
                torch.testing.assert_close(d.flatten(1).norm(dim=1), weight.detach().flatten(1).norm(dim=1),
                                           rtol=1e-5, atol=1e-6, msg=name)
                assert not torch.allclose(d, weight), name  # a random direction, not the weights


def test_a_seed_fixes_the_two_directions(convit):
    first, second = random_directions(convit, seed=7)
    again, _ = random_directions(convit, seed=7)
    other, _ = random_directions(convit, seed=8)
    qkv = [i for i, (n, _) in enumerate(convit.named_parameters()) if n.endswith("qk.weight")][0]
    assert torch.equal(first[qkv], again[qkv])
    assert not torch.allclose(first[qkv], second[qkv]) and not torch.allclose(first[qkv], other[qkv])


def test_the_centre_of_the_grid_is_the_models_own_loss_and_the_weights_come_back(convit):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in convit.parameters()]
    settings = _settings(inputs=["natural", "adversarial"], attack_steps=2)
    centre, corner = grid_losses(convit, x, y, settings, 8 / 255, 2 / 255, batch_size=3, indices=[4, 0])
    with torch.no_grad():
        assert centre["natural_loss"] == pytest.approx(F.cross_entropy(convit(x), y).item(), rel=1e-5)
    torch.manual_seed(stream_seed(settings.seed, "evaluate"))  # the surface's attack starts
    adv = torch.cat([attacks.pgd_ce(convit, xb, yb, 8 / 255, 2 / 255, 2) for xb, yb in zip(x.split(3), y.split(3))])
    with torch.no_grad():
        assert centre["adversarial_loss"] == pytest.approx(F.cross_entropy(convit(adv), y).item(), rel=1e-5)
    assert centre["adversarial_loss"] > centre["natural_loss"]
    assert corner["natural_loss"] != pytest.approx(centre["natural_loss"])
    assert all(torch.equal(p, w) for p, w in zip(convit.parameters(), before))


def test_the_surface_of_a_trained_model_rises_away_from_the_centre(tiny_config):
    """Trained to a minimum (which side of the image is brighter), the loss grows in every direction."""
    torch.manual_seed(0)
    x = torch.rand(32, 3, 16, 16) * 0.5
    y = torch.arange(32) % 2
    x[y == 1, :, :, 8:] += 0.5
    x[y == 0, :, :, :8] += 0.5
    model = build_classifier(tiny_config.model_copy(update={"model": tiny_config.model.model_copy(
        update={"patch_size": 4})}), 2)  # 16 tokens: fast
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    settings = _settings(steps=5, num_images=32)
    losses = np.array([p["natural_loss"] for p in grid_losses(model, x, y, settings, 8 / 255, 2 / 255, 32)])
    grid = losses.reshape(5, 5)
    radius = np.maximum(*np.abs(np.meshgrid(np.arange(5) - 2, np.arange(5) - 2)))  # max(|α|, |β|) in steps
    by_radius = [grid[radius == r].mean() for r in range(3)]
    assert grid[2, 2] < 0.1
    assert by_radius[0] < by_radius[1] < by_radius[2] and by_radius[2] > 10 * by_radius[0]


def test_a_surface_round_trips_through_csv_and_its_record_and_is_drawn_one_column_per_model(tmp_path):
    settings = SurfaceSettings(steps=3, inputs=["natural", "adversarial"])
    points = [{"natural_loss": a * a + b * b, "natural_accuracy": 50.0, "adversarial_loss": 1 + a - b,
               "adversarial_accuracy": 10.0} for a, b in settings.points()]
    surface = Surface.from_points(settings, points, {"seed": 123})
    assert surface.values["natural_loss"][0][2] == pytest.approx(2.0)  # β = -1 row, α = 1 column
    assert surface.values["adversarial_loss"][0][2] == pytest.approx(3.0)
    surface.write_csv(tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "alpha,beta,natural_loss,natural_accuracy,adversarial_loss,adversarial_accuracy"
    assert len(lines) == 1 + 9
    assert Surface.read_csv(tmp_path / "s.csv").values == surface.values
    assert Surface.from_record(json.loads(json.dumps(surface.to_record()))) == surface
    one = matplotlib.image.imread(plot_surfaces([("a", surface)], tmp_path / "one.png"))
    two = matplotlib.image.imread(plot_surfaces([("a", surface), ("b", surface)], tmp_path / "two.png"))
    assert one.shape[0] == two.shape[0] and two.shape[1] == pytest.approx(2 * one.shape[1], rel=0.05)


def test_mimir_surface_defaults_to_the_settings_its_help_names(capsys):
    defaults = SurfaceSettings()
    assert settings_from_args(build_parser().parse_args(["surface", "run"])) == defaults
    assert settings_from_args(build_parser().parse_args(["surface", "run", "--steps", "5", "--inputs", "natural"])) \
        == defaults.model_copy(update={"steps": 5, "inputs": ["natural"]})
    with pytest.raises(SystemExit):
        main(["surface", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for option, field in (("steps", "steps"), ("span", "span"), ("images", "num_images"),
                          ("attack-steps", "attack_steps"), ("seed", "seed")):
        assert f"--{option}" in shown and f"(default {getattr(defaults, field):g})" in shown, option
    assert defaults.inputs == ["natural", "adversarial"] and "(default both)" in shown


def test_a_run_without_finished_fine_tuning_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import mimir.runner

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(mimir.runner, "init_ray", no_ray)
    assert main(["surface", str(tmp_path / "nowhere")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"output_dir": str(run)}))
    assert main(["surface", str(run)]) == 2
    assert "no finished finetune stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["surface", str(run), "--inputs", "natural,clean"])
    assert "natural, adversarial" in capsys.readouterr().err


def test_the_digits_figure5_spec_validates_every_trial():
    spec, base = load_spec(REPO / "tune" / "digits_figure5.yaml")
    load_spec_check(base, spec)
    assert spec.surface.steps == 21 and [row.set["model.arch"] for row in spec.rows] == [
        "convit_tiny", "convit_tiny", "vit_tiny", "vit_tiny"]


def check_trial_surfaces(experiment: Path, trials: list[dict], settings: SurfaceSettings, tmp_path: Path,
                         capsys) -> None:
    """A real sweep's loss surfaces (``tests/test_sweep.py``): each trial's surface was spread over
    Ray tasks and equals the single-process computation, the sweep drew the figure and one CSV per
    row, and ``mimir surface`` on a trial's checkpoint reproduces its surface."""
    assert (experiment / "surface.png").stat().st_size > 0
    assert len(list((experiment / "surfaces").glob("*.csv"))) == len(trials)
    for trial in trials:
        record = trial["surface"]
        assert record["num_images"] == settings.num_images and record["workers"] == 2  # the test Ray's 2 CPUs
        cfg = RunConfig.model_validate(trial["config"])
        images, labels = load_test_subset(cfg, settings.num_images)
        model = load_classifier(record["checkpoint"], cfg)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each chunk task (one CPU each)
        try:
            alone = grid_losses(model, torch.tensor(images).float() / 255, torch.tensor(labels), settings,
                                cfg.evaluate.eps, cfg.evaluate.step_size, cfg.evaluate.batch_size)
        finally:
            torch.set_num_threads(threads)
        assert Surface.from_points(settings, alone, {}).values == record["values"]
    out = tmp_path / "cli"
    capsys.readouterr()
    assert main(["surface", trials[0]["surface"]["checkpoint"], "--out", str(out), "--steps", str(settings.steps),
                 "--images", str(settings.num_images), "--attack-steps", str(settings.attack_steps),
                 "--inputs", "natural,adversarial"]) == 0
    assert f"surface: {settings.steps}x{settings.steps} points" in capsys.readouterr().out
    again = Surface.read_csv(out / "surface.csv")
    np.testing.assert_allclose(np.array(again.values["natural_loss"]),
                               np.array(trials[0]["surface"]["values"]["natural_loss"]), rtol=1e-12)
    assert (out / "surface.png").is_file() and json.loads((out / "surface.json").read_text())["settings"]["seed"] == 123
