"""The layers of DESIGN.md, checked on the import graph (``ast``; imports inside functions count too).

    core + data + models   runtime, io, registry, metrics, config, bundle, train, graph; data/, models/
                           (the package root re-exports the API lazily from otbr_plugin.api)
    otbr/                  the method: core, data and models only
    defenses/ attacks/     the interface and the defenses; the attacks
    bench/ commands/ cli   the harness; api.py (otbr_plugin.defend / evaluate) sits beside the CLI
    benchmark_adapters/    formats of other toolkits; the only layer that combines a format with the harness
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "otbr_plugin"
CORE_MODULES = ("runtime", "io", "registry", "metrics", "config", "bundle", "train", "graph", "__init__")
HIGHER = ("otbr_plugin.defenses", "otbr_plugin.bench", "otbr_plugin.commands", "otbr_plugin.attacks",
          "otbr_plugin.cli", "otbr_plugin.otbr", "benchmark_adapters")
HARNESS = ("otbr_plugin.defenses", "otbr_plugin.bench", "otbr_plugin.commands", "otbr_plugin.attacks",
           "otbr_plugin.cli", "benchmark_adapters")


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
    assert violations(files, ("otbr_plugin.bench", "otbr_plugin.commands", "otbr_plugin.cli",
                              "benchmark_adapters")) == []


def test_harness_talks_to_otbr_only_through_the_defense_interface():
    files = sorted((PKG / "bench").rglob("*.py")) + sorted((PKG / "commands").rglob("*.py")) + [PKG / "cli.py"]
    files.append(PKG / "api.py")
    files += sorted((ROOT / "benchmark_adapters").rglob("*.py"))
    files = [f for f in files if "dropin" not in f.parts]
    # the one exception: `otbr-bench diagnose` is OTBR's own analysis (the paper's Fig. 1/4/5), so it calls the
    # method's pure functions directly; it still builds the config and fusion options through OTBRConfig
    files = [f for f in files if f.name != "diagnose.py"]
    assert violations(files, ("otbr_plugin.otbr", "otbr_plugin.defenses.otbr")) == []


@pytest.mark.parametrize("folder", ["otbr_plugin", "benchmark_adapters"])
def test_every_package_is_listed_in_pyproject(folder):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "otbr_plugin.configs" in listed
