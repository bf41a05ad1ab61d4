"""The generic registry: register / get / create / list, clear errors, and loud optional dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from otbr_plugin.registry import MissingDependencyError, Registry


def test_register_get_create_list():
    reg: Registry = Registry("widget")

    @reg.register
    class Knob:
        name = "knob"

        def __init__(self, size=1):
            self.size = size

    reg.register("dial", dict)
    assert reg.list() == ["dial", "knob"]
    assert reg.get("knob") is Knob and reg.create("knob", size=3).size == 3
    assert reg.register("knob", Knob) is Knob  # the same object again is fine
    with pytest.raises(ValueError, match="widget 'knob' is already registered"):
        reg.register("knob", dict)
    with pytest.raises(ValueError, match=r"unknown widget 'nob'; available: dial, knob"):
        reg.get("nob")


def test_missing_third_party_dependency_is_listed_and_named(tmp_path):
    (tmp_path / "needs_pkg.py").write_text("import some_missing_pkg_xyz\n")
    sys.path.insert(0, str(tmp_path))
    try:
        reg: Registry = Registry("thing", builtins={"fancy": "needs_pkg"})
        assert reg.list() == ["fancy"]
        assert "some_missing_pkg_xyz" in reg.unavailable()["fancy"]
        with pytest.raises(MissingDependencyError, match="needs the Python package some_missing_pkg_xyz"):
            reg.get("fancy")
    finally:
        sys.path.remove(str(tmp_path))


def test_missing_own_module_is_raised():
    reg: Registry = Registry("thing", builtins={"x": "otbr_plugin.no_such_module"})
    with pytest.raises(ModuleNotFoundError):
        reg.list()


BLOCK_POT = textwrap.dedent("""
    import sys
    sys.modules["ot"] = None  # POT made unimportable: `import ot` raises ModuleNotFoundError(name="ot")
    for key in [k for k in sys.modules if k.startswith("ot.")]:
        del sys.modules[key]
    from otbr_plugin.defenses import get_defense, list_defenses, unavailable_defenses
    names = list_defenses()
    print("LIST", names)
    print("UNAVAILABLE", unavailable_defenses())
    assert "otbr" in names and "otbr" in unavailable_defenses(), names
    assert {"none", "clp", "fp", "anp"} <= set(names)
    get_defense("clp")  # the others still work
    try:
        get_defense("otbr")
    except ImportError as err:
        print("ERROR", err)
    else:
        raise SystemExit("get_defense('otbr') did not fail without POT")
""")


def test_otbr_without_pot_fails_loudly_and_stays_listed():
    out = subprocess.run([sys.executable, "-c", BLOCK_POT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
    assert "POT" in error and "pip install POT" in error
