"""Copy the drop-in defense scripts and config templates into a BackdoorBench checkout.

``dropin/defense/<name>.py`` go to ``BB_ROOT/defense/``; ``dropin/config/defense/<name>/cifar10.yaml`` is written
as ``BB_ROOT/config/defense/<name>/<dataset>.yaml`` for each requested dataset, followed by the defense's
resolved hyperparameters (otbr-plugin's defaults for that dataset) when the defense is installed, so the YAML
shows every value that will be used, as BackdoorBench's own configs do. The baselines are installed as
``otbr_anp``, ``otbr_fp`` and ``otbr_clp``: BackdoorBench ships its own anp/fp/clp, which stay untouched.
An existing file with other content is never overwritten unless ``force=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from otbr_plugin.io import write_text

__all__ = ["DROPIN_DIR", "DROPIN_DEFENSES", "BB_MARKERS", "check_backdoorbench_root", "install_dropin", "render_config"]

DROPIN_DIR = Path(__file__).resolve().parent / "dropin"
# script / config name in the checkout -> registered defense
DROPIN_DEFENSES = {"otbr": "otbr", "otbr_anp": "anp", "otbr_fp": "fp", "otbr_clp": "clp",
                   "otbr_ep": "ep", "otbr_ft": "ft", "otbr_nad": "nad"}
DROPIN_DEFENSES.update({"otbr_ibau": "ibau", "otbr_rnp": "rnp", "otbr_sau": "sau"})


# what every BackdoorBench checkout holds (files end in .py, folders in /)
BB_MARKERS = ("defense/base.py", "attack/", "utils/", "config/defense/")


def check_backdoorbench_root(root: Path) -> None:
    """A ValueError unless ``root`` looks like the root of a BackdoorBench checkout (:data:`BB_MARKERS`)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected the root of a BackdoorBench checkout)")
    missing = [m for m in BB_MARKERS if not ((root / m).is_dir() if m.endswith("/") else (root / m).is_file())]
    if missing:
        raise ValueError(f"{root} is not a BackdoorBench checkout: it lacks {', '.join(missing)} (expected the root "
                         "of a clone of https://github.com/SCLBD/BackdoorBench, the folder that holds defense/base.py)")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def render_config(save_name: str, dataset: str) -> str:
    """The YAML for ``config/defense/<save_name>/<dataset>.yaml``."""
    from otbr_plugin.config import declared_values, resolve_config
    from otbr_plugin.data.specs import get_dataset_spec
    from otbr_plugin.defenses import get_defense

    spec = get_dataset_spec(dataset)
    template = (DROPIN_DIR / "config" / "defense" / save_name / "cifar10.yaml").read_text()
    lines = [f"dataset: {spec.name}" if line.startswith("dataset:") else line for line in template.splitlines()]
    text = "\n".join(lines) + "\n"
    name = DROPIN_DEFENSES[save_name]
    try:
        cls = get_defense(name)
    except ValueError:
        return text + f"# (defense {name!r} is not installed in this otbr-plugin: its hyperparameters take the defaults)\n"
    resolved = resolve_config("defense", name, spec.name)
    cls(resolved.values)  # the package's config must be valid before it is written out
    # the fields as declared (not as resolved by validation: a None that means "follow another option",
    # e.g. OTBR's per-option settings under `setting`, must stay None so that editing that option works)
    values = declared_values(cls.config_class, resolved.values)
    if not values:
        return text
    from otbr_plugin._version import __version__

    header = f"# {name} hyperparameters: otbr-plugin {__version__} defaults for {spec.name}"
    header += " (null: derived from the other options)\n" if any(v is None for v in values.values()) else "\n"
    return text + header + yaml.safe_dump(_plain(values), sort_keys=False, default_flow_style=False)


def _put(path: Path, content: str, force: bool, written: list[tuple[Path, str]]) -> None:
    if path.exists():
        if path.read_text() == content:
            written.append((path, "unchanged"))
            return
        if not force:
            raise FileExistsError(f"{path} exists with other content; pass --force to overwrite it")
    write_text(path, content)
    written.append((path, "written"))


def install_dropin(bb_root: str | Path, defenses: list[str] | None = None, datasets: list[str] | None = None,
                   force: bool = False) -> list[tuple[Path, str]]:
    """Install drop-in scripts and configs into the BackdoorBench checkout ``bb_root``.

    ``defenses``: names among :data:`DROPIN_DEFENSES` (or the registered names otbr/anp/fp/clp); default all.
    ``datasets``: one YAML per dataset (default cifar10). Returns (path, "written"|"unchanged") pairs.
    """
    root = Path(bb_root)
    check_backdoorbench_root(root)
    by_defense = {v: k for k, v in DROPIN_DEFENSES.items()}
    chosen = []
    for d in defenses or list(DROPIN_DEFENSES):
        save = d if d in DROPIN_DEFENSES else by_defense.get(d)
        if save is None:
            raise ValueError(f"no drop-in for {d!r}; available: {', '.join(DROPIN_DEFENSES)}")
        chosen.append(save)
    datasets = datasets or ["cifar10"]
    planned: list[tuple[Path, str]] = []
    for save in chosen:
        planned.append((root / "defense" / f"{save}.py", (DROPIN_DIR / "defense" / f"{save}.py").read_text()))
        for ds in datasets:
            from otbr_plugin.data.specs import get_dataset_spec

            planned.append((root / "config" / "defense" / save / f"{get_dataset_spec(ds).name}.yaml",
                            render_config(save, ds)))
    if not force:  # check everything first: all or nothing
        clash = [str(p) for p, c in planned if p.exists() and p.read_text() != c]
        if clash:
            raise FileExistsError(f"these files exist with other content: {', '.join(clash)}; pass --force to overwrite")
    written: list[tuple[Path, str]] = []
    for path, content in planned:
        _put(path, content, force, written)
    return written
