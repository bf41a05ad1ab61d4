"""The layers of docs/architecture.md, checked on the import graph (``ast``; imports inside functions count too).

    core + data + models   _version, runtime, io, registry, metrics, config, bundle, train, graph; data/, models/
                           (the package root re-exports the API lazily from otbr_plugin.api)
    otbr/                  the method: core, data and models only
    defenses/ attacks/     the interface and the defenses; the attacks
    aggregate/             run records and what is made of them (tables, report, leaderboard, regress); no model code
    bench/ commands/ cli   the harness; api.py (otbr_plugin.defend / evaluate) sits beside the CLI
    analysis/              OTBR's own analyses (``otbr-bench diagnose``): the method, data and defenses, below commands
    benchmark_adapters/    formats of other toolkits; the only layer that combines a format with the harness

and across all of them: no import cycle among the package's modules, and no private name (``_x``) imported from
another module of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "otbr_plugin"
CORE_MODULES = ("_version", "runtime", "io", "registry", "metrics", "config", "bundle", "train", "graph", "__init__")
HIGHER = ("otbr_plugin.defenses", "otbr_plugin.bench", "otbr_plugin.commands", "otbr_plugin.attacks",
          "otbr_plugin.cli", "otbr_plugin.otbr", "otbr_plugin.aggregate", "otbr_plugin.analysis", "benchmark_adapters")
HARNESS = ("otbr_plugin.defenses", "otbr_plugin.bench", "otbr_plugin.commands", "otbr_plugin.attacks",
           "otbr_plugin.cli", "otbr_plugin.aggregate", "otbr_plugin.analysis", "benchmark_adapters")
# what the results aggregator may not import: it reads records and never runs (or builds, or loads data for) a model
MODEL_CODE = ("otbr_plugin.models", "otbr_plugin.data", "otbr_plugin.attacks", "otbr_plugin.defenses",
              "otbr_plugin.otbr", "otbr_plugin.train", "otbr_plugin.graph", "otbr_plugin.runtime", "otbr_plugin.bench",
              "otbr_plugin.analysis", "otbr_plugin.api", "otbr_plugin.commands", "otbr_plugin.cli", "benchmark_adapters",
              "torch.nn", "torchvision")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # "from . import x"
    return found


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for line, mod in imports(f):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    return sorted(set(bad))


def test_import_walker_sees_relative_and_function_level_imports(tmp_path):
    src = tmp_path / "fusion.py"
    src.write_text("import torch\nfrom .pruning import x\n\ndef f():\n    from ..defenses.base import Defense\n"
                   "    from .. import bench\n")
    found = {m for _, m in imports(src, package="otbr_plugin.otbr")}
    assert {"otbr_plugin.otbr.pruning", "otbr_plugin.defenses.base", "otbr_plugin.bench"} <= found
    assert violations.__name__  # the checks below use the same walker
    assert "otbr_plugin.defenses.base" in {m for _, m in imports(PKG / "defenses" / "otbr.py")}


def test_method_imports_nothing_from_the_harness():
    files = sorted((PKG / "otbr").rglob("*.py"))
    assert files
    assert violations(files, HARNESS) == []


def test_core_data_models_import_no_higher_layer():
    files = [PKG / f"{m}.py" for m in CORE_MODULES if (PKG / f"{m}.py").is_file()]
    files += sorted((PKG / "data").rglob("*.py")) + sorted((PKG / "models").rglob("*.py"))
    assert violations(files, HIGHER) == []
    assert violations([f for f in files if f != PKG / "__init__.py"], ("otbr_plugin.api",)) == []


def test_package_root_reaches_the_harness_only_through_the_api_facade():
    """``otbr_plugin.defend`` / ``evaluate`` are re-exported lazily from ``otbr_plugin.api`` (a harness module, like
    the CLI); the package root imports nothing else above the core."""
    found = {m for _, m in imports(PKG / "__init__.py")}
    assert {"otbr_plugin.api"} <= found
    assert violations([PKG / "__init__.py"], HIGHER) == []
    assert violations([PKG / "api.py"], ("otbr_plugin.otbr", "otbr_plugin.defenses.otbr", "benchmark_adapters",
                                         "otbr_plugin.commands", "otbr_plugin.cli")) == []


def test_defenses_and_attacks_do_not_reach_up():
    files = sorted((PKG / "defenses").rglob("*.py")) + sorted((PKG / "attacks").rglob("*.py"))
    assert violations(files, ("otbr_plugin.bench", "otbr_plugin.commands", "otbr_plugin.cli", "otbr_plugin.aggregate",
                              "otbr_plugin.analysis", "benchmark_adapters")) == []


def test_harness_talks_to_otbr_only_through_the_defense_interface():
    files = sorted((PKG / "bench").rglob("*.py")) + sorted((PKG / "commands").rglob("*.py")) + [PKG / "cli.py"]
    files.append(PKG / "api.py")
    files += sorted((ROOT / "benchmark_adapters").rglob("*.py"))
    files += sorted((PKG / "aggregate").rglob("*.py"))
    files = [f for f in files if "dropin" not in f.parts]
    # the one exception: the command of `otbr-bench diagnose` builds the options of OTBR's own analysis (analysis/,
    # the paper's Fig. 1/4/5, which calls the method's pure functions) through OTBRConfig
    files = [f for f in files if f != PKG / "commands" / "diagnose.py"]
    assert violations(files, ("otbr_plugin.otbr", "otbr_plugin.defenses.otbr")) == []


@pytest.mark.parametrize("folder", ["otbr_plugin", "benchmark_adapters"])
def test_every_package_is_listed_in_pyproject(folder):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "otbr_plugin.configs" in listed


def package_modules() -> dict[str, Path]:
    """Every module of the package and its adapters (the BackdoorBench drop-ins are scripts run by BackdoorBench)."""
    files = sorted(PKG.rglob("*.py")) + sorted((ROOT / "benchmark_adapters").rglob("*.py"))
    return {module_name(f): f for f in files if "dropin" not in f.parts}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it names in an import, at any depth of the file. A package's ``__init__`` that
    Python runs before a submodule is not an edge (it is not named); ``from pkg import sub`` names both."""
    return {name: {m for _, m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    src = tmp_path / "jobs.py"
    src.write_text("def f():\n    from .grid import plan\n")
    assert "otbr_plugin.bench.grid" in {m for _, m in imports(src, package="otbr_plugin.bench")}


def test_no_import_cycles_among_the_packages_modules():
    """Module-level and function-level imports alike: a lazy import is not a way around a circle."""
    modules = package_modules()
    assert "otbr_plugin.bench.grid" in modules and "benchmark_adapters.bundle" in modules
    assert cycles(import_graph(modules)) == []


def test_the_version_is_a_leaf_and_the_package_face_does_not_pull_in_the_harness():
    modules = package_modules()
    graph = import_graph(modules)
    assert graph["otbr_plugin._version"] == set()
    importers = sorted(m for m, targets in graph.items() if "otbr_plugin" in targets)
    assert importers == [], f"{importers} import the package face; import what they need from its module"


def test_aggregation_imports_no_model_code():
    files = sorted((PKG / "aggregate").rglob("*.py"))
    assert {f.stem for f in files} >= {"records", "tables", "report", "leaderboard", "regress"}
    assert violations(files, MODEL_CODE) == []


def test_analysis_sits_below_the_commands_and_nothing_below_imports_it():
    files = sorted((PKG / "analysis").rglob("*.py"))
    assert files
    assert violations(files, ("otbr_plugin.commands", "otbr_plugin.cli", "otbr_plugin.api")) == []
    others = [f for f in package_modules().values() if "analysis" not in f.relative_to(ROOT).parts
              and "commands" not in f.relative_to(ROOT).parts]
    assert violations(others, ("otbr_plugin.analysis",)) == []


def private_imports(modules: dict[str, Path], folders: tuple[str, ...]) -> list[str]:
    """``from <other module of the package> import _name`` in the files under ``folders``."""
    bad = []
    for name, path in modules.items():
        if not any(name == f or name.startswith(f + ".") for f in folders):
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == name or not (source in modules or source.startswith(("otbr_plugin.", "benchmark_adapters."))):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"{name}:{node.lineno} imports {alias.name} from {source}")
    return sorted(bad)


def test_private_import_finder(tmp_path):
    src = tmp_path / "jobs.py"
    src.write_text("import datetime as _dt\nfrom .grid import _fail, run_cell\nfrom .._version import __version__\n"
                   "from os.path import _get_sep\n\ndef f():\n    from ..io import _tmp\n")
    other = tmp_path / "other.py"
    other.write_text("")
    modules = {"otbr_plugin.bench.jobs": src, "otbr_plugin.bench.grid": other, "otbr_plugin.io": other,
               "otbr_plugin._version": other}
    assert private_imports(modules, ("otbr_plugin.bench",)) == [
        "otbr_plugin.bench.jobs:2 imports _fail from otbr_plugin.bench.grid",
        "otbr_plugin.bench.jobs:7 imports _tmp from otbr_plugin.io"]


def test_bench_and_aggregate_import_nothing_private_across_modules():
    modules = package_modules()
    assert private_imports(modules, ("otbr_plugin.bench", "otbr_plugin.aggregate", "otbr_plugin.analysis",
                                     "otbr_plugin.commands")) == []
