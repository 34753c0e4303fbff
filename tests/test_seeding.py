"""One function derives every random stream of a run (mimir.seeding)."""

import ast
from pathlib import Path

import pytest

from mimir.seeding import STREAMS, stream_seed

PACKAGE = Path(__file__).resolve().parents[1] / "mimir"
# seeded draws that are no part of a run: a dataset's stored row order (fixed at conversion), and
# the benchmarks' synthetic images and probe batches
NOT_A_RUN_STREAM = {"data/format.py", "data/bench.py", "memory.py:fixed_batch"}


def test_a_stream_is_a_function_of_its_whole_key():
    keys = [dict(seed=0, stream="step", epoch=3, rank=1), dict(seed=1, stream="step", epoch=3, rank=1),
            dict(seed=0, stream="step", epoch=4, rank=1), dict(seed=0, stream="step", epoch=3, rank=0),
            dict(seed=0, stream="augment", epoch=3, rank=1), dict(seed=0, stream="step", epoch=3, rank=1, row=5)]
    seeds = [stream_seed(k.pop("seed"), k.pop("stream"), **k) for k in keys]
    assert len(set(seeds)) == len(seeds)
    assert stream_seed(0, "step", epoch=3, rank=1) == seeds[0]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(STREAMS.values())) == len(STREAMS)  # no two streams share a key


def test_an_unknown_stream_is_refused_by_name():
    with pytest.raises(ValueError, match="'augmentation'"):
        stream_seed(0, "augmentation")


def _seeding_calls(tree: ast.AST) -> list[tuple[ast.Call, str]]:
    """Every manual_seed / default_rng / SeedSequence call, with the function it sits in."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                callee = child.func.attr if isinstance(child.func, ast.Attribute) else getattr(child.func, "id", "")
                if callee in ("manual_seed", "default_rng", "SeedSequence", "seed"):
                    found.append((child, name))
            visit(child, name)

    visit(tree, "")
    return found


def test_every_seeded_draw_in_the_package_goes_through_stream_seed():
    """No module seeds torch or numpy from the run's seed by a formula of its own."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in NOT_A_RUN_STREAM or path.name == "seeding.py":
            continue
        for call, function in _seeding_calls(ast.parse(path.read_text())):
            if f"{relative}:{function}" in NOT_A_RUN_STREAM:
                continue
            arguments = " ".join(ast.unparse(a) for a in [*call.args, *call.keywords])
            if arguments and "stream_seed" not in arguments:
                offenders.append(f"{relative}:{call.lineno} {ast.unparse(call)}")
    assert not offenders, "seeded outside mimir.seeding.stream_seed:\n" + "\n".join(offenders)
