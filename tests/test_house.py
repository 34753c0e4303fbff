"""The package's shape: what a maintainer relies on when changing it."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mimir"
RAY_PRIVATE = [re.compile(p, re.MULTILINE) for p in (
    r"^\s*(from|import)\s+ray[\w.]*\._(private|internal)\b",  # imports from Ray's private modules
    r"\._execution_idx\b",  # Ray Data's execution counter
    r"\b_system_config\b",  # ray.init's private system config
)]


def test_rays_private_api_is_used_only_in_ray_private():
    """One small module holds every private Ray name, so a Ray upgrade has one place to check
    (and pyproject.toml pins Ray to the versions it was tested on)."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {match.group(0).strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "ray_private.py"
                 for pattern in RAY_PRIVATE for match in pattern.finditer(path.read_text())]
    assert offenders == []
    uses = (PACKAGE / "ray_private.py").read_text()
    assert all(pattern.search(uses) for pattern in RAY_PRIVATE)
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert re.search(r'"ray\[[\w,]+\]>=2\.60,<2\.61"', pyproject)
