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


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions alike."""
    import ast

    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                graph[name] |= submodules
                if len(submodules) < len(node.names) and node.module in modules:
                    graph[name].add(node.module)  # names defined in that module itself
        graph[name].discard(name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_one_that_imports_it_back():
    """Floors, not circles: counting imports inside functions too, no chain of imports in the
    package leads back to where it started."""
    graph = import_graph()
    assert "mimir.spec" in graph["mimir.plan"] and "mimir.runner" in graph["mimir.sweeps"]  # it sees imports
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_sweep_spec_is_the_ground_floor_of_the_sweep_tier():
    """The planner, the report, the surfaces and the sweep runner build on the spec; it builds on
    none of them (nor on Ray, torch or the training code)."""
    graph = import_graph()
    for module in ("mimir.plan", "mimir.report", "mimir.surface", "mimir.sweeps"):
        assert "mimir.spec" in graph[module]
    below = set()
    todo = ["mimir.spec"]
    while todo:
        for target in graph[todo.pop()] - below:
            below.add(target)
            todo.append(target)
    assert below.isdisjoint({"mimir.plan", "mimir.report", "mimir.surface", "mimir.sweeps", "mimir.reproduce",
                             "mimir.cli", "mimir.api", "mimir.runner"})
    assert "mimir.cli" not in graph["mimir.reproduce"] and "mimir.bench" not in graph["mimir.runner"]


def test_an_installed_wheel_finds_its_bundled_configs_and_specs_by_name(tmp_path):
    """Built as a wheel and installed without dependencies into a fresh folder, run from another
    folder: the quickstart and the sweep specs are found by name, and `mimir reproduce --list` lists
    every table (not an empty table with a total of 0)."""
    import subprocess
    import sys

    import shutil

    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(PACKAGE, source / "mimir", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PACKAGE.parent / name, source / name)
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("mimir-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    script = (
        "import mimir.config, mimir.spec, mimir.reproduce\n"
        "assert mimir.config.__file__.startswith(%r), mimir.config.__file__\n"
        "print(mimir.config.load_config('quickstart').name)\n"
        "print(mimir.spec.load_spec('digits_table7')[0].name)\n"
        "print(mimir.config.load_config('quickstart.yaml').seed)\n"
        "print(len(mimir.reproduce.paper_specs()))\n" % str(target))
    found = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True,
                           env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert found.returncode == 0, found.stderr[-2000:]
    name, spec, seed, tables = found.stdout.split()
    assert (name, spec, seed) == ("quickstart", "digits_table7", "0") and int(tables) >= 12
