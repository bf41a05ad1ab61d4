"""BackdoorBench's own defense arguments, mapped onto otbr-plugin's, so a drop-in takes the flags and YAMLs of the
BackdoorBench defense it stands beside (``config/defense/fp/cifar10.yaml`` for ``otbr_fp``, ...).

The lists follow BackdoorBench's ``defense/{fp,anp,clp}.py`` (``add_arguments`` / ``set_args``) and
``config/defense/{fp,anp,clp}/cifar10.yaml`` (read, not copied: BackdoorBench is CC BY-NC). Every key is one of:

- *mapped* to a field of our defense's config (``--anp_eps`` -> ``eps``); the value is checked by that config;
- *harness*: the face's own argument of the same name (dataset, dataset_path, device, random_seed, ratio, ...);
- *ignored*: infrastructure or values BackdoorBench derives itself (``amp``, ``checkpoint_load``, ``num_classes``,
  ...), or a key BackdoorBench's script declares but never reads for that defense; accepted and reported in one
  line, never changing a result;
- *checked*: a key whose BackdoorBench default matches what we do and whose other values we do not implement
  (``client_optimizer`` must be sgd, ``lr_scheduler`` CosineAnnealingLR): another value is an error naming it;
- ``index``: BackdoorBench's file of clean-subset indices (``BBArgs.index_file``), read by the face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["BBArgs", "bb_flags", "bb_help", "bb_file_keys", "short_option", "translate_bb", "u_values", "BB_BOOL"]


def BB_BOOL(value: Any) -> bool:
    """BackdoorBench's boolean flags: ``str(x) in ['True', 'true', '1']``."""
    return str(value) in ("True", "true", "1")


# every BackdoorBench key, with the argparse type its scripts give it
_TYPES: dict[str, Callable[[Any], Any]] = {
    "amp": BB_BOOL, "pin_memory": BB_BOOL, "non_blocking": BB_BOOL, "prefetch": BB_BOOL,
    "checkpoint_load": str, "checkpoint_save": str, "log": str, "save_path": str, "frequency_save": int,
    "num_classes": int, "input_height": int, "input_width": int, "input_channel": int,
    "attack": str, "poison_rate": float, "target_type": str, "target_label": int, "trigger_type": str,
    "epochs": int, "lr": float, "lr_scheduler": str, "steplr_stepsize": int, "steplr_gamma": float,
    "steplr_milestones": str, "client_optimizer": str, "sgd_momentum": float, "wd": float, "index": str,
    "acc_ratio": float, "once_prune_ratio": float, "print_every": int, "nb_iter": int, "anp_eps": float,
    "anp_steps": int, "anp_alpha": float, "pruning_by": str, "pruning_max": float, "pruning_step": float,
    "pruning_number": float, "u": float, "u_min": float, "u_max": float, "u_num": float,
    "te_epochs": int, "beta1": float, "beta2": float, "beta3": float, "p": float, "momentum": float,
    "weight_decay": float, "teacher_model_loc": str,
}
_SHORT = {"pin_memory": "-pm", "non_blocking": "-nb", "prefetch": "-pf"}

_INFRA = ("amp", "checkpoint_load", "checkpoint_save", "log", "save_path", "frequency_save", "pin_memory",
          "non_blocking", "prefetch")
_DERIVED = ("num_classes", "input_height", "input_width", "input_channel")  # BackdoorBench derives them too
_ATTACK = ("attack", "poison_rate", "target_type", "target_label", "trigger_type")  # the record holds the attack
_TRAINING = ("epochs", "lr", "lr_scheduler", "steplr_stepsize", "steplr_gamma", "steplr_milestones",
             "client_optimizer", "sgd_momentum", "wd")

# BackdoorBench key -> our config field, per registered defense
_MAPPED: dict[str, dict[str, str]] = {
    "fp": {"acc_ratio": "acc_ratio", "once_prune_ratio": "prune_step_ratio", "epochs": "epochs", "lr": "lr",
           "sgd_momentum": "momentum", "wd": "weight_decay"},
    "anp": {"lr": "mask_lr", "acc_ratio": "max_acc_drop", "anp_eps": "eps", "anp_steps": "anp_steps",
            "anp_alpha": "alpha", "pruning_by": "pruning_by", "pruning_max": "pruning_max",
            "pruning_step": "pruning_step", "print_every": "bb_print_every"},
    "clp": {"u": "u"},
    "otbr": {},
    "ep": {"u": "u"},
    "ft": {"epochs": "epochs", "lr": "lr", "sgd_momentum": "momentum", "wd": "weight_decay"},
    # BackdoorBench's nad.py trains teacher and student with SGD(lr, sgd_momentum, wd); it declares momentum and
    # weight_decay but never reads them, and runs te_epochs for both (its `epochs` is unused)
    "nad": {"te_epochs": "teacher_epochs", "lr": "lr", "sgd_momentum": "momentum", "wd": "weight_decay", "p": "p"},
}
# (ANP's print_every: the length in batches of its clean loader, re-iterated per block; it places the loader and
# test-loader seed draws that random_stream: backdoorbench replays, and with nb_iter gives the iterations)
# keys BackdoorBench's script for that defense declares but does not use (ANP's mask SGD hard-codes momentum 0.9;
# CLP is data-free: its batch size only sizes test loaders)
_UNUSED: dict[str, tuple[str, ...]] = {
    "fp": ("steplr_stepsize", "steplr_gamma", "steplr_milestones", "index"),
    "anp": ("epochs", "lr_scheduler", "steplr_stepsize", "steplr_gamma", "steplr_milestones", "client_optimizer",
            "sgd_momentum", "wd"),
    "clp": _TRAINING,
    "otbr": _TRAINING,
    "ep": _TRAINING,
    "ft": ("steplr_stepsize", "steplr_gamma", "steplr_milestones", "index"),
    "nad": ("epochs", "lr_scheduler", "steplr_stepsize", "steplr_gamma", "steplr_milestones", "momentum",
            "weight_decay"),
}
# a BackdoorBench key that also sets, as BackdoorBench's script uses it, another of our fields unless the same layer
# gives that field itself (NAD: te_epochs is the epochs of BackdoorBench's teacher AND student)
_IMPLIED: dict[str, dict[str, str]] = {"nad": {"te_epochs": "epochs"}}
_SPECIAL = {"fp": ("client_optimizer", "lr_scheduler", "index"), "anp": ("nb_iter", "pruning_number", "index"),
            "clp": ("u_min", "u_max", "u_num", "index"), "otbr": ("index",),
            "ep": ("u_min", "u_max", "u_num", "index"), "ft": ("client_optimizer", "lr_scheduler", "index"),
            "nad": ("client_optimizer", "index", "beta1", "beta2", "beta3", "teacher_model_loc")}


def bb_flags(defense: str) -> dict[str, Callable[[Any], Any]]:
    """BackdoorBench's keys the drop-in of ``defense`` accepts, with their argparse types."""
    keys = set(_INFRA) | set(_DERIVED) | set(_ATTACK) | set(_MAPPED.get(defense, {})) | set(_UNUSED.get(defense, ())) \
        | set(_SPECIAL.get(defense, ()))
    if defense == "anp":
        keys.add("print_every")
    return {k: _TYPES[k] for k in sorted(keys)}


def bb_file_keys(defense: str, layer: dict[str, Any], fields: set[str]) -> set[str]:
    """The keys of one YAML ``layer`` to read as BackdoorBench's: every BackdoorBench key that is not a field of ours
    (``fields``) and, when the file holds one of the keys BackdoorBench's own script for ``defense`` reads under a
    name that is not ours (e.g. NAD's te_epochs, wd: a BackdoorBench YAML), also the keys that script declares but
    never reads, though ours bear their names (NAD's epochs, momentum, weight_decay: reported as ignored)."""
    bb_only = set(bb_flags(defense)) - fields
    own = (set(_MAPPED.get(defense, {})) | set(_SPECIAL.get(defense, ()))) - fields - {"index"}
    if any(k in own and layer.get(k) is not None for k in layer):
        return bb_only | (set(_UNUSED.get(defense, ())) & fields)
    return bb_only


def bb_help(defense: str, key: str) -> str:
    """One line for ``--help``: what BackdoorBench's ``key`` does in the drop-in of ``defense``."""
    mapped = _MAPPED.get(defense, {})
    if key in mapped:
        return f"BackdoorBench's name for --{mapped[key]}"
    special = {"nb_iter": "BackdoorBench's iterations: --iterations = ceil(nb_iter / print_every) * print_every",
               "pruning_number": "not supported (an error): use --threshold / --prune_number",
               "index": "a file of clean-subset indices of the training split (integers, whitespace-separated, as "
                        "BackdoorBench's np.loadtxt reads it): the clean subset instead of the --ratio/--random_seed draw",
               "client_optimizer": "must be sgd", "lr_scheduler": "must be CosineAnnealingLR",
               "u_min": "with --u_max/--u_num: the u sweep on the TEST set (u_step_df.csv, oracle-labelled)",
               "u_max": "see --u_min", "u_num": "see --u_min",
               "beta1": "with --beta2/--beta3: NAD's --betas (all three needed)", "beta2": "see --beta1",
               "beta3": "see --beta1", "teacher_model_loc": "must be empty: the teacher is fine-tuned here"}
    if key in _SPECIAL.get(defense, ()):
        return special[key]
    return "accepted and reported as ignored (no effect on the result)"


def short_option(key: str) -> str | None:
    """BackdoorBench's one-letter alias of ``key`` (``-pm`` for ``--pin_memory``), if any."""
    return _SHORT.get(key)


@dataclass
class BBArgs:
    """One layer's BackdoorBench keys, translated: ``fields`` for our config, ``ignored`` keys (reported),
    ``mapped`` (bb key -> our field, reported), ``sweep`` (CLP's u_min/u_max/u_num), ``notes``, ``index_file``
    (BackdoorBench's ``--index``: the clean subset's indices, read by the face)."""

    fields: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    index_file: str | None = None
    notes: list[str] = field(default_factory=list)
    implied: dict[str, Any] = field(default_factory=dict)  # fields set unless the layer gives them (``_IMPLIED``)


def _num(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"BackdoorBench's {key} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"BackdoorBench's {key} must be a number, got {value!r}") from None
    if kind is int:
        if not v.is_integer():
            raise ValueError(f"BackdoorBench's {key} must be an integer, got {value!r}")
        return int(v)
    return v


def translate_bb(defense: str, raw: dict[str, Any], other_layer: dict[str, Any] | None = None) -> BBArgs:
    """Translate the BackdoorBench keys of one layer (a YAML or the command line; None values already dropped)
    for the registered ``defense``. ``other_layer``: the other layer's raw keys (e.g. ANP's ``print_every`` from
    the YAML when ``--nb_iter`` comes from the command line). A key we do not implement is a ValueError naming it."""
    out = BBArgs()
    accepted = bb_flags(defense)
    mapped = _MAPPED.get(defense, {})
    unused = set(_UNUSED.get(defense, ()))
    for key, value in raw.items():
        if key not in accepted:
            continue
        if key in _INFRA or key in _DERIVED or key in _ATTACK or (key in unused and key not in _SPECIAL.get(defense, ())):
            out.ignored.append(key)
        elif key == "index":
            if value in (None, ""):
                out.ignored.append(key)
            else:
                out.index_file = str(value)
        elif key in mapped:
            ours = mapped[key]
            kind = _TYPES[key]
            out.fields[ours] = _num(key, value, kind) if kind in (int, float) else str(value)
            out.mapped[key] = ours
            also = _IMPLIED.get(defense, {}).get(key)
            if also is not None:
                out.implied[also] = out.fields[ours]
                out.notes.append(f"{key} {out.fields[ours]}: BackdoorBench's {defense}.py runs it for the student too, "
                                 f"so {also} = {out.fields[ours]} unless {also} is given")
        elif key == "client_optimizer":
            if str(value).lower() != "sgd":
                raise ValueError(f"BackdoorBench's client_optimizer={value!r} is not supported: otbr_{defense} fine-tunes "
                                 "with SGD (client_optimizer: sgd)")
            out.ignored.append(key)
        elif key == "lr_scheduler":
            if str(value) != "CosineAnnealingLR":
                raise ValueError(f"BackdoorBench's lr_scheduler={value!r} is not supported: otbr_{defense} fine-tunes with a "
                                 "cosine schedule (lr_scheduler: CosineAnnealingLR)")
            out.ignored.append(key)
            if defense == "fp":  # FPConfig.cos_t_max is BackdoorBench's key: its YAML / --cos_t_max set it directly
                out.notes.append("lr_scheduler CosineAnnealingLR: cos_t_max (an int >= 1) = BackdoorBench's schedule, "
                                 "stepped once per epoch with T_max = cos_t_max (setting backdoorbench: 100, the "
                                 "value BackdoorBench uses when its YAML has no cos_t_max); cos_t_max 0 = ours, "
                                 "annealed per iteration over all fine-tuning steps (the default setting's)")
            else:
                out.notes.append("lr_scheduler CosineAnnealingLR: ours anneals per iteration over all fine-tuning "
                                 "steps, BackdoorBench's once per epoch with T_max = cos_t_max (100 unless its YAML "
                                 "sets it): the curves agree only at 100 epochs")
        elif key == "nb_iter":
            every_raw = raw.get("print_every", (other_layer or {}).get("print_every", 500))
            every = _num("print_every", every_raw, int)
            nb = _num("nb_iter", value, int)
            if every < 1 or nb < 0:
                raise ValueError(f"BackdoorBench's nb_iter and print_every must be >= 0 and >= 1, got {nb}, {every}")
            out.fields["iterations"] = int(math.ceil(nb / every)) * every  # BackdoorBench runs whole print blocks
            out.mapped["nb_iter"] = "iterations"
            if out.fields["iterations"] != nb:
                out.notes.append(f"nb_iter {nb} with print_every {every}: {out.fields['iterations']} iterations, "
                                 "as BackdoorBench runs whole blocks of print_every")
        elif key == "pruning_number":
            raise ValueError("BackdoorBench's pruning_number is not supported: its anp.py scores that fixed "
                             "threshold/number but still saves the model of its threshold scan; for a fixed choice "
                             "use --threshold (or --pruning_by number --prune_number N) with --bb_selection false")
        elif key in ("u_min", "u_max", "u_num"):
            out.sweep[key] = _num(key, value, int if key == "u_num" else float)
        elif key == "teacher_model_loc":
            if value not in (None, ""):
                raise ValueError(f"BackdoorBench's teacher_model_loc={value!r} (a saved teacher) is not supported: "
                                 "the teacher is fine-tuned on the clean subset (--teacher_epochs)")
            out.ignored.append(key)
        elif key in ("beta1", "beta2", "beta3"):
            both = {**(other_layer or {}), **raw}
            missing = [k for k in ("beta1", "beta2", "beta3") if both.get(k) is None]
            if missing:
                raise ValueError(f"BackdoorBench's beta1, beta2 and beta3 go together (NAD's betas, one per attention "
                                 f"layer); missing {', '.join(missing)}")
            out.fields["betas"] = [_num(k, both[k], float) for k in ("beta1", "beta2", "beta3")]
            out.mapped[key] = "betas"
    return out


def u_values(sweep: dict[str, Any]) -> list[float]:
    """CLP's u grid ``numpy.linspace(u_min, u_max, u_num)`` from BackdoorBench's three keys (all needed)."""
    import numpy as np

    missing = [k for k in ("u_min", "u_max", "u_num") if k not in sweep]
    if missing:
        raise ValueError(f"CLP's u sweep needs u_min, u_max and u_num; missing {', '.join(missing)}")
    if sweep["u_num"] < 1:
        raise ValueError(f"u_num must be >= 1, got {sweep['u_num']}")
    return [float(u) for u in np.linspace(sweep["u_min"], sweep["u_max"], int(sweep["u_num"]))]
