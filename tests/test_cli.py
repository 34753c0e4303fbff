"""The command line itself: fast help without the heavy imports, --version, config show."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mimir import __version__, bench
from mimir.cli import BENCH_METHODS, build_parser, main
from mimir.config import load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
HEAVY = ("torch", "ray", "timm", "numpy", "pyarrow", "pydantic")


@pytest.mark.parametrize("command", [[], ["run"], ["sweep"], ["bench"], ["mi-scale"], ["submit"], ["config", "show"],
                                     ["data", "prepare"], ["table"], ["export"], ["plot"],
                                     ["surface"]])
def test_help_imports_nothing_heavy(command):
    code = ("import sys\nfrom mimir.cli import main\n"
            f"try:\n    main({[*command, '--help']!r})\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: mimir" in out
    assert out.strip().splitlines()[-1] == "[]"



def test_commands_that_do_not_train_import_no_torch_timm_or_ray(tmp_path):
    """config show, --plan, reproduce --list, table, runs, compare and plot (and plot's error path)
    read configs and files only: one process runs them in turn, and after each none of torch, timm
    or Ray has been imported (nothing hides behind an earlier command's import)."""
    from mimir.metrics import MetricsLog

    for name, blr in (("a", 0.02), ("b", 0.01)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"seed": 0, "finetune": {"blr": blr}}))
        (run / "results.json").write_text(json.dumps({"accuracy": {"natural": 98.0, "pgd20": 86.0}, "num_images": 450}))
        log = MetricsLog(str(run / "finetune"), 0)
        log.append({"loss": 1.0, "acc": 0.5, "epoch": 0, "lr": 1e-3, "seconds": 1.0, "images_per_second": 9.0})
        log.close()
    (tmp_path / "experiment").mkdir()
    (tmp_path / "empty").mkdir()
    commands = [["config", "show", "quickstart"], ["sweep", "digits_table7", "--plan"], ["reproduce", "--list"],
                ["table", "quickstart", "--out", str(tmp_path / "experiment")], ["runs", str(tmp_path / "runs")],
                ["compare", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")],
                ["plot", str(tmp_path / "runs" / "a")], ["plot", str(tmp_path / "empty")]]
    code = ("import contextlib, io, json, sys\nfrom mimir.cli import main\n"
            f"for command in {commands!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        status = main(command)\n"
            "    print(json.dumps([command[0], status, sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # with a cluster to ask, --plan joins it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a[:2] for a in answers] == [[c[0], 2 if c[-1].endswith("empty") else 0] for c in commands]
    assert [a[2] for a in answers] == [[]] * len(commands), answers

def test_top_level_help_says_what_mimir_is(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "masked adversarial pre-training" in out and "mimir run configs/quickstart.yaml" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mimir {__version__}"


def test_bench_help_lists_the_bench_methods():
    assert BENCH_METHODS == tuple(bench.METHODS)
    assert build_parser().parse_args(["bench"]).methods is None


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", QUICKSTART, "pretrain.epochs=3", "finetune.attack.eps=4/255"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(QUICKSTART, ["pretrain.epochs=3", "finetune.attack.eps=4/255"])
    assert shown == cfg.model_dump(mode="json")
    assert shown["pretrain"]["epochs"] == 3 and shown["finetune"]["attack"]["eps"] == pytest.approx(4 / 255)
    assert "drop_path" in shown["finetune"]  # defaults are filled in


def test_config_show_names_a_bad_override(capsys):
    assert main(["config", "show", QUICKSTART, "pretrain.epochz=3"]) == 2
    assert "pretrain.epochz" in capsys.readouterr().err


def test_the_api_names_survive_their_namesake_modules():
    """mimir.evaluate / mimir.sweep are functions even after everything is imported (a submodule of
    the same name would replace the attribute on import)."""
    import mimir
    import mimir.runner  # imports the evaluation and, through the API, everything else
    from mimir import api

    for name in mimir.API:
        assert getattr(mimir, name) is getattr(api, name), name
