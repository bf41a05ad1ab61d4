"""A BackdoorBench-style face over any registered defense, so it can stand in a BackdoorBench checkout.

BackdoorBench's defense scripts share one shape: ``add_arguments(parser)``, a constructor that merges the
YAML file (``--yaml_path``) with the command line (non-None CLI values win), ``set_result(result_file)``
(reads ``record/<result_file>/attack_result.pt``), ``set_logger()``, ``mitigation()`` and
``defense(result_file)`` which runs them in order. :class:`BackdoorBenchDefense` offers the same for any
defense of the registry::

    face = BackdoorBenchDefense("otbr")
    parser = argparse.ArgumentParser()
    face.add_arguments(parser)
    args = parser.parse_args()
    face.configure(args)
    face.defense(args.result_file)

Settings are layered by :func:`otbr_plugin.config.resolve_config`, later wins: the defense's built-in
defaults < the package's ``configs/defense/<name>/<dataset>.yaml`` (when it exists) < the ``--yaml_path``
file < non-None CLI arguments. The YAML is flat, like BackdoorBench's: harness keys (dataset, device, random_seed, ratio, ...)
and any field of the defense's config dataclass; an unknown key is an error listing the valid ones.
BackdoorBench's own keys for the same defense (its YAMLs and flags) are taken too (:mod:`.bb_args`): mapped to
our fields, or accepted and reported as ignored, or an error naming a semantic we do not implement. A config
with ``oracle: true`` (FP/ANP's test-set selection, as BackdoorBench) runs with a test-set scorer and writes to
``defense/<name>_oracle/``, labelled.

Outputs go where BackdoorBench expects them, ``record/<result_file>/defense/<name>/``:
``defense_result.pt`` ({model_name, num_classes, model}), ``<name>_df_summary.csv`` (test_acc, test_asr,
test_ra), plus this package's ``record.json`` (metrics before/after, DER, config, seconds), the defended
model as a safetensors bundle in ``model/``, one CSV per diagnostic table and ``log/<time>.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from otbr_plugin.bench.runner import run_defense, summarize, write_defense_outputs
from otbr_plugin.config import load_yaml, resolve_config
from otbr_plugin.data.specs import get_dataset_spec
from otbr_plugin.data.subsets import read_index_file
from otbr_plugin.defenses import Defense, get_defense

from .bb_args import BBArgs, bb_file_keys, bb_flags, bb_help, short_option, translate_bb, u_values
from .clean_test import load_clean_test, resolve_data_root
from .record import load_attack_result
from .writer import write_defense_result, write_defense_summary

__all__ = ["BackdoorBenchDefense", "HARNESS_ARGUMENTS", "str2bool", "main"]


def str2bool(value: str | bool) -> bool:
    """``true/false``, ``1/0``, ``yes/no`` (any case) as BackdoorBench's CLI accepts them."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# (name, type, help): BackdoorBench's common defense arguments plus this package's two
HARNESS_ARGUMENTS: tuple[tuple[str, Any, str], ...] = (
    ("result_file", str, "attack record to defend: a folder name under --record_dir (e.g. badnet_0_1) or a path"),
    ("yaml_path", str, "YAML with defaults for every argument (e.g. ./config/defense/otbr/cifar10.yaml)"),
    ("dataset", str, "dataset name (cifar10, cifar100, gtsrb, tiny, mnist, fashion_mnist); checked against the record"),
    ("dataset_path", str, "data root holding <dataset>/ in its official layout (default: the record's data_path)"),
    ("device", str, "auto (accelerator when present, else cpu), cpu, or an accelerator device name"),
    ("random_seed", int, "seed of the defense (and of the clean subset for data-dependent defenses); default 0"),
    ("batch_size", int, "passed to the defense when its config has a batch_size field"),
    ("num_workers", int, "accepted for BackdoorBench compatibility; unused (data is held in memory)"),
    ("ratio", float, "clean defense subset as a share of the training set (data-dependent defenses); default 0.05"),
    ("model", str, "model name; checked against the record's model_name"),
    ("record_dir", str, "folder that holds the attack records (default ./record)"),
    ("trust_checkpoint", str2bool, "true: unpickle attack_result.pt without the allowlist (only for files you trust; "
                                   "command line only, never from --yaml_path)"),
    ("progress", str2bool, "show progress bars (default true)"),
)
_HARNESS_NAMES = frozenset(a[0] for a in HARNESS_ARGUMENTS)


def _cli_type(hint: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` (and extra kwargs) for a config field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        return _cli_type(inner[0]) if len(inner) == 1 else (str, {})
    if origin is typing.Literal:
        kind = type(args[0]) if args else str
        return (str2bool if kind is bool else kind), {"choices": list(args)}
    if origin in (list, tuple):
        inner = args[0] if args and args[0] is not Ellipsis else str
        t, _ = _cli_type(inner)
        return t, {"nargs": "+"}
    if hint is bool:
        return str2bool, {}
    if hint in (int, float, str):
        return hint, {}
    return str, {}


def _harness_value(name: str, kind: Any, value: Any) -> Any:
    """``value`` (from YAML or the CLI) as the harness argument ``name`` expects it, or a ValueError."""
    try:
        if kind is str2bool:
            return str2bool(value)
        if kind is int and not isinstance(value, bool) and (isinstance(value, int) or str(value).strip().isdigit()):
            return int(value)
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        pass
    expected = {str2bool: "true or false", int: "int", float: "float"}.get(kind, "a string")
    raise ValueError(f"{name} must be {expected}, got {value!r}")


class BackdoorBenchDefense:
    """BackdoorBench's defense-class shape around the registered defense ``defense_name``.

    ``save_name`` names the output folder ``record/<result_file>/defense/<save_name>/`` (default: the defense
    name); the drop-in baselines use ``otbr_<name>`` so they do not overwrite BackdoorBench's own results.
    """

    def __init__(self, defense_name: str, args: argparse.Namespace | Mapping[str, Any] | None = None,
                 save_name: str | None = None) -> None:
        self.defense_class: type[Defense] = get_defense(defense_name)
        self.name = defense_name
        self.save_name = save_name or defense_name
        self.args: dict[str, Any] = {}
        self.result = None  # the attack checkpoint (a Bundle) once set_result ran
        self.record_path: Path | None = None
        self.save_path: Path | None = None
        self.defense_obj: Defense | None = None
        self.logger: logging.Logger | None = None
        self.config_source = ""
        self.bb_args = BBArgs()
        self.clean_indices: list[int] | None = None  # BackdoorBench's --index FILE, read
        self._yaml_fields: dict[str, Any] = {}
        self._cli_fields: dict[str, Any] = {}
        self._configured = False
        if args is not None:
            self.configure(args)

    # ------------------------------------------------------------------------------------------------
    @property
    def config_fields(self) -> dict[str, Any]:
        hints = typing.get_type_hints(self.defense_class.config_class)
        return {f.name: hints[f.name] for f in dataclasses.fields(self.defense_class.config_class) if f.init}

    def add_arguments(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """BackdoorBench's common arguments plus every field of the defense's config, all defaulting to None
        (so the YAML supplies whatever the command line leaves out)."""
        taken = set(parser._option_string_actions)  # noqa: SLF001 - skip options the caller already defined
        for name, kind, text in HARNESS_ARGUMENTS:
            if f"--{name}" not in taken:
                parser.add_argument(f"--{name}", type=kind, default=None, help=text)
        group = parser.add_argument_group(f"{self.name} hyperparameters (override the YAML)")
        for name, hint in self.config_fields.items():
            if f"--{name}" in taken or name in _HARNESS_NAMES:
                continue
            kind, extra = _cli_type(hint)
            default = getattr(self.defense_class.config_class(), name)
            group.add_argument(f"--{name}", type=kind, default=None,
                               help=f"{self._field_help(name)}(built-in default {default!r})", **extra)
        bb = parser.add_argument_group("BackdoorBench's own arguments for this defense (mapped to the options above, "
                                       "or accepted and reported as ignored)")
        for name, kind in bb_flags(self.name).items():
            if f"--{name}" in taken or f"--{name}" in parser._option_string_actions:  # noqa: SLF001
                continue
            flags = [f"--{name}"]
            short = short_option(name)
            if short and short not in parser._option_string_actions:  # noqa: SLF001
                flags.insert(0, short)
            bb.add_argument(*flags, dest=name, type=kind, default=None, help=bb_help(self.name, name))
        if parser.epilog is None:
            parser.epilog = (
                "example (from the BackdoorBench root):\n"
                f"  python ./defense/{self.save_name}.py --result_file badnet_0_1 "
                f"--yaml_path ./config/defense/{self.save_name}/cifar10.yaml --dataset cifar10\n"
            )
            parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser

    def _field_help(self, name: str) -> str:
        doc = self.defense_class.config_class.__doc__ or ""
        for line in doc.splitlines():
            s = line.strip()
            if s.startswith(f"{name}:") or s.startswith(f"{name} "):
                return s[len(name):].lstrip(": ").rstrip(".") + ". "
        return ""

    def configure(self, args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``--yaml_path`` with the non-None CLI values (CLI wins); validate every key and value."""
        cli = {k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else dict(args)).items()
               if v is not None}
        yaml_path = cli.get("yaml_path")
        base = load_yaml(yaml_path) if yaml_path else {}
        if "trust_checkpoint" in base:  # unsafe unpickling is never switched on by a file
            try:
                wants_trust = _harness_value("trust_checkpoint", str2bool, base["trust_checkpoint"])
            except ValueError:
                wants_trust = True
            if wants_trust:
                raise ValueError(f"{yaml_path}: trust_checkpoint may not be set in a config file (it would unpickle "
                                 "arbitrary code); pass --trust_checkpoint true on the command line for a record you trust")
            base = {k: v for k, v in base.items() if k != "trust_checkpoint"}
        fields = set(self.config_fields)
        bb_keys = set(bb_flags(self.name)) - fields - _HARNESS_NAMES
        # a BackdoorBench YAML may hold keys its script never reads under our fields' names (NAD's epochs,
        # momentum, weight_decay): read as BackdoorBench's there; on the command line our names keep our meaning
        bb_file = bb_file_keys(self.name, base, fields) - _HARNESS_NAMES
        bb_base = translate_bb(self.name, {k: v for k, v in base.items() if k in bb_file and v is not None}, cli)
        bb_cli = translate_bb(self.name, {k: v for k, v in cli.items() if k in bb_keys}, base)
        self._yaml_fields = _with_bb({k: v for k, v in base.items() if k in fields and k not in bb_file}, bb_base,
                                     yaml_path or "YAML")
        self._cli_fields = _with_bb({k: v for k, v in cli.items() if k in fields}, bb_cli, "command line")
        self.bb_args = BBArgs(ignored=sorted(set(bb_base.ignored) | set(bb_cli.ignored)),
                              mapped={**bb_base.mapped, **bb_cli.mapped}, sweep={**bb_base.sweep, **bb_cli.sweep},
                              notes=list(dict.fromkeys(bb_base.notes + bb_cli.notes)),
                              index_file=bb_cli.index_file or bb_base.index_file)
        self.clean_indices = None
        if self.bb_args.index_file and self.defense_class.needs_clean_data:  # read now, before any data is loaded
            self.clean_indices = read_index_file(self.bb_args.index_file)
            self.bb_args.notes.append(f"index {self.bb_args.index_file}: the clean subset is these "
                                      f"{len(self.clean_indices)} training images (--ratio and --random_seed do not "
                                      "choose it)")
        elif self.bb_args.index_file:
            self.bb_args.ignored.append("index")
        if self.bb_args.sweep:
            u_values(self.bb_args.sweep)  # all three keys, a valid grid: checked now, before any data is loaded
        merged = {**{k: v for k, v in base.items() if k not in bb_file},
                  **{k: v for k, v in cli.items() if k not in bb_keys}}
        # harness keys that cannot change this defense's result: reported with BackdoorBench's ignored ones
        idle = [k for k in ("num_workers",) if k in merged] + (["batch_size"] if "batch_size" in merged and
                                                               "batch_size" not in fields else [])
        self.bb_args.ignored = sorted(set(self.bb_args.ignored) | set(idle))
        valid = _HARNESS_NAMES | set(self.config_fields)
        unknown = sorted(set(merged) - valid)
        if unknown:
            where = f"{yaml_path} / command line" if yaml_path else "arguments"
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for defense {self.name!r}; "
                             f"valid keys: {', '.join(sorted(valid))}")
        for name, kind, _ in HARNESS_ARGUMENTS:  # YAML values get the same types as the command line's
            if merged.get(name) is not None:
                merged[name] = _harness_value(name, kind, merged[name])
        if merged.get("dataset") is not None:
            merged["dataset"] = get_dataset_spec(merged["dataset"]).name
        for key, check, what in (("random_seed", lambda v: v >= 0, "a non-negative integer"),
                                 ("ratio", lambda v: 0 < v <= 1, "in (0, 1]")):
            if key in merged and not check(merged[key]):
                raise ValueError(f"{key} must be {what}, got {merged[key]!r}")
        self.args = merged
        self._configured = True
        self._build_defense(merged.get("dataset"))  # validate the defense config now, not after loading data
        return merged

    def _build_defense(self, dataset: str | None) -> Defense:
        resolved = resolve_config("defense", self.name, dataset, self._yaml_fields, self._cli_fields,
                                  user_label=self.args.get("yaml_path") or "--yaml_path")
        self.config_source = resolved.source
        self.defense_obj = self.defense_class(resolved.values)
        return self.defense_obj

    # ------------------------------------------------------------------------------------------------
    def _record(self, result_file: str) -> Path:
        direct = Path(result_file)
        if direct.is_dir() and (direct / "attack_result.pt").is_file():
            return direct
        return Path(self.args.get("record_dir") or "record") / result_file

    def set_result(self, result_file: str):
        """Read ``record/<result_file>/attack_result.pt`` (safely) and prepare ``.../defense/<name>/``."""
        if not self._configured:
            self.configure({"result_file": result_file})
        record = self._record(result_file)
        bundle = load_attack_result(record, trust=bool(self.args.get("trust_checkpoint", False)),
                                    data_root=self.args.get("dataset_path"))
        wanted = self.args.get("dataset")
        if wanted is not None and wanted != bundle.dataset:
            raise ValueError(f"--dataset {wanted} but the record {record} was made on {bundle.dataset}")
        model = self.args.get("model")
        bb_model = bundle.extra.get("backdoorbench", {}).get("model_name", bundle.model_config.name)
        if model is not None and model not in (bb_model, bundle.model_config.name):
            raise ValueError(f"--model {model} but the record {record} holds a {bb_model}")
        self.result = bundle
        self.record_path = record
        defense = self._build_defense(bundle.dataset)
        # an oracle run (selection scored on the TEST set) is kept apart from the reported one
        self.save_path = record / "defense" / (self.save_name + ("_oracle" if defense.wants_oracle() else ""))
        self.save_path.mkdir(parents=True, exist_ok=True)
        return bundle

    def set_logger(self) -> logging.Logger:
        """A logger for this run only (no global handlers): to stdout and ``<save_path>/log/<time>.log``."""
        if self.save_path is None:
            raise RuntimeError("call set_result(result_file) before set_logger()")
        logger = logging.getLogger(f"otbr_plugin.backdoorbench.{self.save_name}.{id(self)}")
        self.close()
        logger.setLevel(logging.INFO)
        logger.propagate = False
        log_dir = self.save_path / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s")
        for handler in (logging.FileHandler(log_dir / f"{time.strftime('%Y_%m_%d_%H_%M_%S')}.log"),
                        logging.StreamHandler(sys.stdout)):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        self.logger = logger
        return logger

    def close(self) -> None:
        """Detach and close this run's log handlers."""
        if self.logger is not None:
            for handler in list(self.logger.handlers):
                self.logger.removeHandler(handler)
                handler.close()

    def _log(self, msg: str) -> None:
        if self.logger is not None:
            self.logger.info(msg)

    def mitigation(self) -> dict[str, Any]:
        """Run the defense on the loaded record, evaluate it and write BackdoorBench's outputs."""
        if self.result is None or self.save_path is None or self.record_path is None:
            raise RuntimeError("call set_result(result_file) before mitigation()")
        bundle = self.result
        defense = self.defense_obj or self._build_defense(bundle.dataset)
        a = self.args
        user_root = a.get("dataset_path")
        root = resolve_data_root(self.record_path, bundle.dataset, None, user_root) if user_root else None
        root = root or (Path(user_root) if user_root else None) or (
            Path(bundle.extra["data_root"]) if bundle.extra.get("data_root") else None)
        self._log(f"{self.name} on {self.record_path} ({bundle.model_config.name}, {bundle.dataset}); "
                  f"config ({self.config_source}) {defense.config.to_dict()}; data root {root or 'default'}")
        self._log(self.describe_run())
        for line in self.bb_report():
            self._log(line)
        clean_test = load_clean_test(bundle, root)
        run = run_defense(bundle, defense, data_root=root, device=a.get("device", "auto"),
                          seed=int(a.get("random_seed", 0)), clean_ratio=float(a.get("ratio", 0.05)),
                          progress=bool(a.get("progress", True)), clean_test=clean_test,
                          config_source=self.config_source, allow_oracle=True, clean_indices=self.clean_indices)
        write_defense_outputs(run, self.save_path, overwrite=True)
        bb_model = bundle.extra.get("backdoorbench", {}).get("model_name", bundle.model_config.name)
        state = run.outcome.export_state or run.outcome.model.state_dict()
        result_pt = write_defense_result(self.save_path, bb_model, bundle.model_config.num_classes, state)
        summary = write_defense_summary(self.save_path, self.save_name, run.after.acc, run.after.asr, run.after.ra)
        for line in summarize(run).splitlines():
            self._log(line)
        self._log(f"wrote {result_pt} and {summary}" + (" (state dict with the classifier's pruning "
                                                        "reparametrisation, as BackdoorBench saves FP)"
                                                        if run.outcome.export_state else ""))
        if self.bb_args.sweep:
            self._u_sweep(bundle, defense, root, clean_test, run)
        return {"model": run.outcome.model, "before": run.before.to_dict(), "after": run.after.to_dict(),
                "der": run.der, "config": defense.config.to_dict(), "config_source": self.config_source, "save_path": str(self.save_path),
                "data_used": run.outcome.data_used, "seconds": run.seconds}

    def describe_run(self) -> str:
        """One line: which defense, setting / pairing and oracle switch run."""
        cfg = (self.defense_obj.config.to_dict() if self.defense_obj is not None else {})
        parts = [f"{k}={cfg[k]}" for k in ("setting", "pairing", "oracle") if k in cfg]
        text = f"running otbr-plugin's {self.name}" + (f" ({', '.join(parts)})" if parts else "")
        if cfg.get("oracle"):
            text += f": selection scored on the TEST set, an oracle diagnostic; written to {self.save_path}"
        return text

    def bb_report(self) -> list[str]:
        """The BackdoorBench keys taken: mapped ones and ignored ones (one line each), plus notes."""
        lines = []
        if self.bb_args.mapped:
            lines.append("BackdoorBench arguments mapped: " + ", ".join(f"{k} -> {v}" for k, v in self.bb_args.mapped.items()))
        if self.bb_args.ignored:
            lines.append("BackdoorBench arguments ignored (infrastructure or unused by this defense; no effect on the "
                         "result): " + ", ".join(self.bb_args.ignored))
        if self.bb_args.sweep:
            lines.append("BackdoorBench's u_min/u_max/u_num: the u sweep is scored on the TEST set and written as "
                         "u_step_df.csv, an oracle diagnostic; the reported model uses u")
        return lines + [f"note: {n}" for n in self.bb_args.notes]

    def _u_sweep(self, bundle, defense: Defense, root, clean_test, run) -> None:
        """CLP's u table (BackdoorBench's u_step_df.csv): each u of the grid scored on the test set, labelled oracle."""
        from otbr_plugin.bench.sweep import oracle_sweep, sweep_defenses
        from otbr_plugin.io import write_csv

        values = u_values(self.bb_args.sweep)
        a = self.args
        table = oracle_sweep(bundle, sweep_defenses(defense, "u", values), "u", clean_test=clean_test, before=run.before,
                             data_root=root, device=a.get("device", "auto"), seed=int(a.get("random_seed", 0)),
                             clean_ratio=float(a.get("ratio", 0.05)), progress=bool(a.get("progress", True)))
        table = table.rename(columns={"acc": "test_acc", "asr": "test_asr", "ra": "test_ra"})
        path = write_csv(self.save_path / "u_step_df.csv", table)
        self._log(f"wrote {path} (u sweep on the TEST set: oracle diagnostic, not the reported result)")

    def defense(self, result_file: str) -> dict[str, Any]:
        """``set_result`` + ``set_logger`` + ``mitigation``, as BackdoorBench's ``defense()``."""
        self.set_result(result_file)
        self.set_logger()
        try:
            return self.mitigation()
        finally:
            self.close()


def _with_bb(ours: dict[str, Any], bb: BBArgs, where: str) -> dict[str, Any]:
    """``ours`` (one layer's fields under our names) plus that layer's translated BackdoorBench keys; the same
    field given under both names with different values is an error."""
    out = dict(ours)
    for key, value in bb.fields.items():
        if key in out and out[key] != value:
            bb_name = next(k for k, v in bb.mapped.items() if v == key)
            raise ValueError(f"{where}: {key}={out[key]!r} and BackdoorBench's {bb_name}={value!r} set the same option "
                             "to different values; give one of them")
        out[key] = value
    for key, value in bb.implied.items():  # e.g. NAD's te_epochs -> the student's epochs, unless given
        out.setdefault(key, value)
    return out


def main(defense_name: str, argv: list[str] | None = None, save_name: str | None = None) -> int:
    """Entry point of the drop-in scripts: parse BackdoorBench's arguments and defend ``--result_file``."""
    prog = Path(sys.argv[0]).name if argv is None else f"{save_name or defense_name}.py"
    try:
        face = BackdoorBenchDefense(defense_name, save_name=save_name)
    except ValueError as err:  # the defense is not in the installed otbr-plugin
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    description = face.defense_class.description or "defense"
    parser = argparse.ArgumentParser(prog=prog, description=f"{defense_name}: {description}, on a BackdoorBench "
                                                            "attack record (otbr-plugin)")
    face.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = face.configure(args)
        if settings.get("result_file") is None:
            parser.error("--result_file is required (the record folder name under record/, e.g. badnet_0_1)")
        face.defense(settings["result_file"])
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0
