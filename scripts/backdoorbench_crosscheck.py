"""Cross-check inside a real BackdoorBench checkout: BackdoorBench's own attacks make the records, then its own
defenses and otbr-plugin's drop-ins run on the same records through BackdoorBench's own command lines.

    python scripts/backdoorbench_crosscheck.py BB_ROOT --bb-python BB_VENV/bin/python --out DIR

BackdoorBench is CC BY-NC: this script imports none of its code. It only runs BackdoorBench's Python
(``--bb-python``, an environment that holds BackdoorBench's requirements and otbr-plugin) on BackdoorBench's
own scripts, from BB_ROOT, via subprocess, and reads what they write (CSV summaries; ``defense_result.pt`` and
``attack_result.pt`` through otbr-plugin's allowlisted loader, never a plain unpickle).

Steps, each resumable (an output that exists is not made again):
1. ``install_dropin`` into BB_ROOT (defense/otbr*.py, config/defense/otbr*/gtsrb.yaml).
2. Data: Fashion-MNIST (offline, the IDX files otbr-plugin finds) SUBSAMPLED, stratified with a fixed seed, and
   written in the on-disk layout of BackdoorBench's ``gtsrb`` loader (Train/000NN/GT-000NN.csv + PNGs,
   Test/GT-final_test.csv): BackdoorBench's ``mnist`` path cannot feed its preactresnet18 (a 3-channel conv1;
   MNIST images are 1-channel), while its ``gtsrb`` path reads RGB image files with no checksum. Images are the
   28x28 Fashion-MNIST pixels, grey replicated to RGB and zero-padded to 32x32 (so BackdoorBench's Resize(32)
   and otbr-plugin's reader both leave them unchanged). Classes 0-9 are Fashion-MNIST's; the model has
   gtsrb's 43 outputs, 10-42 never seen.
3. Attacks: ``attack/<attack>.py`` with BackdoorBench's gtsrb prototype YAML and its attack YAML, on CPU.
4. Defenses: BackdoorBench's defense/<d>.py and the drop-ins defense/otbr*.py, each run from BB_ROOT; each
   run's output folder ``record/<r>/defense/<d>/`` is moved to ``record/<r>/defense/crosscheck/<d>[...]__s<seed>/``.
   CLP, FP, ANP, OTBR as listed in ``defense_runs``; FT, NAD, EP (``--defenses ft nad ep``): BackdoorBench's
   script and the drop-in on the same command line (``tuning_args``). The drop-ins import this checkout's
   otbr-plugin (``run_env``).
5. One table (markdown + CSV): defense x {BackdoorBench, plug-in} x ACC/ASR/RA/DER/seconds, with versions,
   machine and load; for CLP also the max |dw| between BackdoorBench's pruned weights and the plug-in's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATASET = "gtsrb"  # BackdoorBench's loader whose layout the subsample is written in (see the module docstring)
NUM_CLASSES_BB = 43
PAD = 2  # 28 -> 32 in the "pad" layout
SIZE = 32  # BackdoorBench's gtsrb input size
LAYOUTS = {
    "resize": "Fashion-MNIST 28x28 grey resized to 32x32 (PIL bilinear, Image.BILINEAR, on the uint8 grey image), "
              "replicated to 3 channels",
    "pad": "Fashion-MNIST 28x28 grey zero-padded by 2 to 32x32, replicated to 3 channels",
}


# ----------------------------------------------------------------------------------------------- data
def data_dir_name(n_train: int, n_test: int, seed: int, layout: str = "pad") -> str:
    """The folder under BB_ROOT/data/ that holds one subsample (BackdoorBench appends /gtsrb); the "pad" layout
    keeps the name it had before layouts existed."""
    return f"otbr_crosscheck_fmnist_{n_train}_{n_test}_s{seed}" + ("" if layout == "pad" else f"_{layout}")


def _stratified_take(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices, an equal share of every class (the remainder to the lowest classes), sorted."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per, rest = divmod(n, len(classes))
    picked = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        k = per + (1 if i < rest else 0)
        if k > len(idx):
            raise ValueError(f"class {c} has {len(idx)} samples, {k} requested")
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def to_rgb32(img28: np.ndarray, layout: str) -> np.ndarray:
    """A 28x28 uint8 grey image as the 32x32x3 uint8 image written for BackdoorBench (see ``LAYOUTS``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if img28.shape != (28, 28) or img28.dtype != np.uint8:
        raise ValueError(f"expected a 28x28 uint8 image, got {img28.shape} {img28.dtype}")
    if layout == "pad":
        grey = np.zeros((SIZE, SIZE), dtype=np.uint8)
        grey[PAD:PAD + 28, PAD:PAD + 28] = img28
    else:
        from PIL import Image

        grey = np.asarray(Image.fromarray(img28).resize((SIZE, SIZE), Image.BILINEAR))
    return np.repeat(grey[:, :, None], 3, axis=2)


GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def prepare_data(bb_root: Path, n_train: int, n_test: int, seed: int, layout: str = "resize") -> tuple[str, dict]:
    """Write the subsample under BB_ROOT/data/<name>/gtsrb/ (once) and return (dataset_path for BackdoorBench's
    ``--dataset_path``, a description)."""
    from PIL import Image

    from otbr_plugin.data import find_dataset
    from otbr_plugin.data.datasets import _idx_path, read_idx
    from otbr_plugin.io import atomic_dir

    src = find_dataset("fashion_mnist")
    if src is None:
        raise SystemExit("Fashion-MNIST not found (otbr_plugin.data.find_dataset('fashion_mnist')); install Debian's "
                         "dataset-fashion-mnist or put its IDX files under the data root")
    name = data_dir_name(n_train, n_test, seed, layout)
    rel = f"./data/{name}"
    target = bb_root / "data" / name / DATASET
    info = {"source": str(src), "n_train": n_train, "n_test": n_test, "seed": seed, "folder": str(target),
            "layout": layout,
            "images": "BackdoorBench gtsrb loader (Train/000NN/GT-000NN.csv, Test/GT-final_test.csv), "
                      f"RGB PNG 32x32 = {LAYOUTS[layout]}"}
    if (target / "Test" / "GT-final_test.csv").is_file():
        return rel, info
    splits = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = read_idx(_idx_path(src, f"{stem}-images-idx3-ubyte"))
        y = read_idx(_idx_path(src, f"{stem}-labels-idx1-ubyte")).astype(np.int64)
        idx = _stratified_take(y, n, seed)
        splits[split] = (x[idx], y[idx], idx)
    with atomic_dir(target) as tmp:
        x, y, idx = splits["train"]
        for c in range(NUM_CLASSES_BB):
            cdir = tmp / "Train" / f"{c:05d}"
            cdir.mkdir(parents=True)
            lines = [GT_HEADER]
            for j in np.flatnonzero(y == c):
                fn = f"{int(idx[j]):05d}.png"
                Image.fromarray(to_rgb32(x[j], layout)).save(cdir / fn)
                lines.append(f"{fn};32;32;0;0;31;31;{c}\n")
            (cdir / f"GT-{c:05d}.csv").write_text("".join(lines))
        x, y, idx = splits["test"]
        tdir = tmp / "Test"
        tdir.mkdir()
        lines = [GT_HEADER]
        for j in range(len(y)):
            fn = f"{int(idx[j]):05d}.png"
            Image.fromarray(to_rgb32(x[j], layout)).save(tdir / fn)
            lines.append(f"{fn};32;32;0;0;31;31;{int(y[j])}\n")
        (tdir / "GT-final_test.csv").write_text("".join(lines))
        (tmp / "SUBSAMPLE.json").write_text(json.dumps(info, indent=1))
    return rel, info


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One subprocess run from BB_ROOT: an attack or a defense on one record."""

    kind: str  # "attack" or "defense"
    record: str
    name: str  # attack name, or the defense as tabulated (clp, fp, anp, otbr)
    impl: str  # "BackdoorBench" or "plug-in"
    script: str  # path relative to BB_ROOT
    args: list[str]
    seed: int = 0
    variant: str = ""  # e.g. "pairing=backdoorbench"
    output: str = ""  # the folder the script writes, relative to BB_ROOT (moved to ``kept`` afterwards)
    kept: str = ""  # where the output is kept, relative to BB_ROOT (defenses); the record folder (attacks)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        v = f" [{self.variant}]" if self.variant else ""
        return f"{self.record} {self.impl} {self.name}{v} seed {self.seed}"


@dataclass
class Settings:
    bb_root: Path
    bb_python: str
    out: Path
    work: Path
    dataset_paths: dict[str, str]  # layout -> BackdoorBench's --dataset_path
    layout: str  # of an attack given without @LAYOUT
    attacks: list[str]
    attack_epochs: int
    attack_batch: int
    n_train: int
    n_test: int
    seeds: list[int]
    seeds_blended: list[int]
    threads: int
    fp_epochs: int
    fp_once_prune_ratio: float
    fp_ratio: float
    anp_iters: int
    anp_batch: int
    anp_pruning_step: float
    anp_lr: float | None
    clp_u: float
    defenses: list[str]
    wait_attacks_min: float = 0.0
    paired_subsets: bool = False  # --paired-subsets
    plugin_seeds: int = 1
    fp_bb_tmax: bool = False
    ft_epochs: int = 100  # FT's fine-tuning epochs (BackdoorBench: 100)
    ft_batch: int = 256  # FT's batch (BackdoorBench: 256)
    nad_epochs: int = 10  # NAD's te_epochs: teacher AND student epochs in BackdoorBench's nad.py (BackdoorBench: 10)
    nad_batch: int = 256  # NAD's batch (BackdoorBench: 256)
    clean_ratio: float = 0.05  # FT's and NAD's clean subset, --ratio (BackdoorBench: 0.05)
    ep_u: float = 3.0  # EP's u (BackdoorBench: 3, plus a test-set u sweep 0-10 that the YAML copy narrows to u)
    ep_batch: int = 256  # EP's batch: BackdoorBench's ep.py reads ONE batch of the poisoned training set
    nad_bb_layers: bool = False  # also the drop-in's NAD on BackdoorBench's attention layers (NAD_BB_LAYERS)
    nad_bn_reestimate: bool = False  # also the drop-in's NAD runs with --bn_stats reestimate (NAD_BN_VARIANT)


def attack_pratio(spec: str) -> tuple[str, float | None]:
    """``SPEC%PRATIO`` -> (SPEC, PRATIO): BackdoorBench's ``--pratio`` (share of the training images poisoned)
    for this attack; without ``%`` its attack YAML's own (None)."""
    head, sep, p = spec.partition("%")
    if not sep:
        return spec, None
    try:
        pratio = float(p)
    except ValueError:
        pratio = -1.0
    if not 0 < pratio <= 1:
        raise SystemExit(f"--attacks {spec!r}: %PRATIO must be a number in (0, 1], got {p!r}")
    return head, pratio


def split_attack(spec: str, default_epochs: int, default_layout: str = "resize") -> tuple[str, int, str, str]:
    """``NAME[:EPOCHS][@LAYOUT][%PRATIO]`` -> (attack, epochs, record-name suffix, layout): ``badnet:8@pad`` is
    BadNets for 8 epochs on the zero-padded images; without ``:EPOCHS`` the default epochs (no suffix), without
    ``@LAYOUT`` the default layout; ``%PRATIO`` (see ``attack_pratio``) adds ``_pPRATIO`` to the suffix."""
    spec, pratio = attack_pratio(spec)
    ptag = "" if pratio is None else f"_p{pratio:g}"
    head, _, layout = spec.partition("@")
    layout = layout or default_layout
    if layout not in LAYOUTS:
        raise SystemExit(f"--attacks {spec!r}: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    name, _, epochs = head.partition(":")
    if not name:
        raise SystemExit(f"--attacks {spec!r}: expected NAME[:EPOCHS][@LAYOUT]")
    if not epochs:
        return name, default_epochs, ptag, layout
    if not epochs.isdigit() or int(epochs) < 1:
        raise SystemExit(f"--attacks {spec!r}: expected NAME[:EPOCHS][@LAYOUT] with EPOCHS a positive integer")
    return name, int(epochs), f"_e{int(epochs)}{ptag}", layout


def record_name(attack: str, n_train: int, n_test: int, default_layout: str = "resize") -> str:
    """The record of ``attack`` (``NAME[:EPOCHS][@LAYOUT]``) on the subsample; records on the "pad" layout keep
    the names they had before layouts existed, the others name their layout."""
    name, _, suffix, layout = split_attack(attack, 0, default_layout)
    tag = "" if layout == "pad" else f"_{layout}"
    return f"otbrx_fmnist{n_train}_{n_test}{tag}_{name}{suffix}"


def attack_layout(s: "Settings", attack: str) -> str:
    return split_attack(attack, 0, s.layout)[3]


def dataset_path(s: "Settings", attack: str) -> str:
    """BackdoorBench's ``--dataset_path`` of the subsample ``attack``'s record is made on."""
    return s.dataset_paths[attack_layout(s, attack)]


COMMON_BB = ["--device", "cpu", "--num_workers", "0", "--pin_memory", "False", "--non_blocking", "False"]


def attack_run(s: Settings, attack: str) -> Run:
    rec = record_name(attack, s.n_train, s.n_test, s.layout)
    path = dataset_path(s, attack)
    pratio = attack_pratio(attack)[1]
    attack, epochs, _, _ = split_attack(attack, s.attack_epochs, s.layout)
    args = ["--yaml_path", "./config/attack/prototype/gtsrb.yaml", "--bd_yaml_path", f"./config/attack/{attack}/default.yaml",
            "--dataset_path", path, *COMMON_BB, "--epochs", str(epochs),
            "--batch_size", str(s.attack_batch), "--save_folder_name", rec]
    if pratio is not None:
        args += ["--pratio", f"{pratio:g}"]
    return Run("attack", rec, attack, "BackdoorBench", f"./attack/{attack}.py", args, kept=f"record/{rec}")


def bb_yaml_copy(s: Settings, defense: str, changes: dict, file_name: str, what: str) -> Path:
    """BackdoorBench's config/defense/<defense>/gtsrb.yaml with ``changes``, written to WORK/yaml/<file_name>
    with a first line naming its source and ``what`` changed."""
    import yaml

    from otbr_plugin.io import write_text

    src = s.bb_root / "config" / "defense" / defense / "gtsrb.yaml"
    values = yaml.safe_load(src.read_text())
    values.update(changes)
    path = s.work / "yaml" / file_name
    write_text(path, f"# {src} with {what} (otbr-plugin crosscheck)\n" + yaml.safe_dump(values, sort_keys=False))
    return path


def clp_yaml(s: Settings) -> Path:
    """BackdoorBench's clp/gtsrb.yaml with the u sweep narrowed to the one u that is compared (its ``--u_num``
    flag is parsed as float, which its own np.linspace refuses, so the sweep can only be narrowed by YAML)."""
    return bb_yaml_copy(s, "clp", {"u": s.clp_u, "u_min": s.clp_u, "u_max": s.clp_u, "u_num": 1},
                        f"clp_gtsrb_u{s.clp_u:g}.yaml", "u_min = u_max = u, u_num 1")


def fp_tmax_yaml(s: Settings) -> Path:
    """BackdoorBench's fp/gtsrb.yaml with ``cos_t_max`` = the fine-tuning epochs. Its scheduler factory reads
    ``cos_t_max`` (else T_max = 100, stepped per epoch), so with fewer than 100 epochs BackdoorBench's FP barely
    anneals, while the drop-in anneals over all its fine-tuning steps; with this YAML both follow the same curve
    (one step per epoch when the clean subset is smaller than the batch)."""
    return bb_yaml_copy(s, "fp", {"cos_t_max": s.fp_epochs}, f"fp_gtsrb_tmax{s.fp_epochs}.yaml",
                        f"cos_t_max = {s.fp_epochs}")


def ep_yaml(s: Settings) -> Path:
    """BackdoorBench's ep/gtsrb.yaml with its u sweep narrowed to the one u that is compared (as ``clp_yaml``: its
    ``--u_num`` flag is parsed as float, which its own np.linspace refuses); each u of the sweep is one more
    test-set evaluation, and only ``u`` makes the saved model."""
    return bb_yaml_copy(s, "ep", {"u": s.ep_u, "u_min": s.ep_u, "u_max": s.ep_u, "u_num": 1},
                        f"ep_gtsrb_u{s.ep_u:g}.yaml", "u_min = u_max = u, u_num 1")


def tuning_args(s: Settings, name: str) -> list[str]:
    """The CPU-sized budget of FT / NAD / EP as BackdoorBench's own flags, given to BackdoorBench's script and,
    unchanged, to the drop-in (which maps them onto its options, docs/baselines.md). NAD: ``--te_epochs`` is the
    epochs of BackdoorBench's teacher AND student (its ``--epochs`` is read by neither); ``--epochs`` with the same
    value sets the drop-in's student epochs and changes nothing in BackdoorBench's script."""
    if name == "ft":
        return ["--yaml_path", "./config/defense/ft/gtsrb.yaml", "--epochs", str(s.ft_epochs),
                "--batch_size", str(s.ft_batch), "--ratio", f"{s.clean_ratio:g}"]
    if name == "nad":
        return ["--yaml_path", "./config/defense/nad/gtsrb.yaml", "--te_epochs", str(s.nad_epochs),
                "--epochs", str(s.nad_epochs), "--batch_size", str(s.nad_batch), "--ratio", f"{s.clean_ratio:g}"]
    if name == "ep":
        return ["--yaml_path", str(ep_yaml(s)), "--u", f"{s.ep_u:g}", "--batch_size", str(s.ep_batch)]
    raise ValueError(f"no BackdoorBench flags for {name!r}: expected one of {', '.join(TUNING)}")


TMAX_VARIANT = "cos_t_max=epochs"
TUNING = ("ft", "nad", "ep")  # run as BackdoorBench runs them: its script, and the drop-in on the same command line


def defense_runs(s: Settings, attack: str) -> list[Run]:
    """The defense runs on one record, most important first (so an interrupted run still fills the table)."""
    rec = record_name(attack, s.n_train, s.n_test, s.layout)
    base = ["--result_file", rec, "--dataset", DATASET, "--dataset_path", dataset_path(s, attack)]
    bb = [*base, *COMMON_BB, "--amp", "False"]
    ours = [*base, "--device", "cpu", "--progress", "false"]
    seeds = s.seeds if attack == s.attacks[0] else s.seeds_blended
    runs: list[Run] = []

    def add(name, impl, script, args, seed, out_name, variant=""):
        tag = out_name + (f"__{variant.replace('=', '-').replace(',', '-')}" if variant else "")
        if name in BUDGETED:  # runs of another CPU budget are other runs
            tag += f"__{budget_tag(s, name)}"
        tag += f"__s{seed}"
        if name in s.defenses:
            runs.append(Run("defense", rec, name, impl, script, [*args, "--random_seed", str(seed)], seed, variant,
                            output=f"record/{rec}/defense/{out_name}", kept=f"record/{rec}/defense/crosscheck/{tag}"))

    if "clp" in s.defenses:
        add("clp", "BackdoorBench", "./defense/clp.py", [*bb, "--yaml_path", str(clp_yaml(s)), "--u", str(s.clp_u)],
            0, "clp")
    for pairing in ("backdoorbench", "structural"):
        add("clp", "plug-in", "./defense/otbr_clp.py",
            [*ours, "--yaml_path", "./config/defense/otbr_clp/gtsrb.yaml", "--u", str(s.clp_u), "--pairing", pairing],
            0, "otbr_clp", f"pairing={pairing}")
    add("otbr", "plug-in", "./defense/otbr.py", [*ours, "--yaml_path", "./config/defense/otbr/gtsrb.yaml"], 0, "otbr")
    fp_bb = [*bb, "--yaml_path", "./config/defense/fp/gtsrb.yaml", "--epochs", str(s.fp_epochs),
             "--once_prune_ratio", str(s.fp_once_prune_ratio), "--ratio", str(s.fp_ratio)]
    # the drop-in's FP variants named before cos_t_max existed anneal per iteration over all steps: cos_t_max 0
    fp_bb_steps = [*fp_bb, *FP_STEP_SCHEDULE]
    fp_ours = [*ours, "--yaml_path", "./config/defense/otbr_fp/gtsrb.yaml", "--epochs", str(s.fp_epochs),
               "--ratio", str(s.fp_ratio)]
    lr_bb = [] if s.anp_lr is None else ["--lr", str(s.anp_lr)]
    lr_ours = [] if s.anp_lr is None else ["--mask_lr", str(s.anp_lr)]
    anp_bb = [*bb, "--yaml_path", "./config/defense/anp/gtsrb.yaml", "--nb_iter", str(s.anp_iters),
              "--print_every", str(s.anp_iters), "--batch_size", str(s.anp_batch),
              "--pruning_step", str(s.anp_pruning_step), *lr_bb]
    anp_ours = [*ours, "--yaml_path", "./config/defense/otbr_anp/gtsrb.yaml", "--iterations", str(s.anp_iters),
                "--batch_size", str(s.anp_batch), *lr_ours]
    # the drop-ins in BackdoorBench's setting, with BackdoorBench's own YAML and flags (the command line of
    # BackdoorBench's script with the script's name changed) and its test-set selection behind the oracle switch
    oracle = ["--setting", "backdoorbench", "--oracle", "true"]
    fp_bb_tmax = None
    if s.fp_bb_tmax and "fp" in s.defenses:
        fp_bb_tmax = [*fp_bb]
        fp_bb_tmax[fp_bb_tmax.index("--yaml_path") + 1] = str(fp_tmax_yaml(s))
    for i, seed in enumerate(seeds):
        add("fp", "BackdoorBench", "./defense/fp.py", fp_bb, seed, "fp")
        if fp_bb_tmax is not None:
            add("fp", "BackdoorBench", "./defense/fp.py", fp_bb_tmax, seed, "fp", TMAX_VARIANT)
        add("anp", "BackdoorBench", "./defense/anp.py", anp_bb, seed, "anp")
        if i == 0:  # the plug-in's own setting: a different method setting, one seed
            add("fp", "plug-in", "./defense/otbr_fp.py", fp_ours, seed, "otbr_fp")
            add("anp", "plug-in", "./defense/otbr_anp.py", anp_ours, seed, "otbr_anp")
        if i < s.plugin_seeds:
            if s.paired_subsets:  # BackdoorBench's own clean subset at the same seed
                paired = [*oracle, "--subset_sampling", "backdoorbench_stream"]
                add("fp", "plug-in", "./defense/otbr_fp.py", [*fp_bb_steps, *paired], seed, "otbr_fp_oracle",
                    PAIRED_SETTING)
                # and BackdoorBench's fine-tuning schedule as its YAML gives it (per epoch, T_max 100)
                add("fp", "plug-in", "./defense/otbr_fp.py", [*fp_bb, *paired], seed, "otbr_fp_oracle",
                    PAIRED_BB_SCHEDULE)
                add("anp", "plug-in", "./defense/otbr_anp.py", [*anp_bb, *paired], seed, "otbr_anp_oracle",
                    PAIRED_SETTING)
                # and torch's random stream as BackdoorBench's anp.py draws it at the same seed
                add("anp", "plug-in", "./defense/otbr_anp.py", [*anp_bb, *paired, *ANP_BB_STREAM], seed,
                    "otbr_anp_oracle", PAIRED_BB_STREAM)
            add("fp", "plug-in", "./defense/otbr_fp.py", [*fp_bb_steps, *oracle], seed, "otbr_fp_oracle", BB_SETTING)
            add("anp", "plug-in", "./defense/otbr_anp.py", [*anp_bb, *oracle], seed, "otbr_anp_oracle", BB_SETTING)
    # FT / NAD / EP: BackdoorBench's script, and the drop-in on the same command line (script name changed), so
    # both get the same budget and hyperparameters by construction; the drop-in maps BackdoorBench's keys
    for name in TUNING:
        if name not in s.defenses:
            continue
        args = [*bb, *tuning_args(s, name)]
        for i, seed in enumerate(seeds):
            add(name, "BackdoorBench", f"./defense/{name}.py", args, seed, name)
            if i < s.plugin_seeds:
                add(name, "plug-in", f"./defense/otbr_{name}.py", args, seed, f"otbr_{name}", BB_FLAGS)
                if name == "nad" and s.nad_bb_layers:
                    add(name, "plug-in", "./defense/otbr_nad.py", [*args, "--attention_layers", *NAD_BB_LAYERS],
                        seed, "otbr_nad", NAD_LAYERS_VARIANT)
                if name == "nad":
                    nad_variants = [(BB_FLAGS, args)]
                    if s.paired_subsets:  # BackdoorBench's nad.py trains on the 1st choose_index draw
                        nad_variants.append((NAD_PAIRED_VARIANT,
                                             [*args, "--index", str(bb_stream_index_file(s, seed))]))
                        add(name, "plug-in", "./defense/otbr_nad.py", nad_variants[-1][1], seed, "otbr_nad",
                            NAD_PAIRED_VARIANT)
                    if s.nad_bn_reestimate:
                        for variant, nad_args in nad_variants:
                            add(name, "plug-in", "./defense/otbr_nad.py", [*nad_args, "--bn_stats", "reestimate"],
                                seed, "otbr_nad", variant + NAD_BN_VARIANT)
    return runs


# --paired-subsets: BackdoorBench's setting drawing BackdoorBench's own clean subset (seeds paired across sides)
PAIRED_SETTING = "setting=backdoorbench,oracle,subset_sampling=backdoorbench_stream"
BB_SETTING = "setting=backdoorbench,oracle"
# FP runs of the variants above fine-tune with the drop-in's own schedule (cosine over all steps, per iteration);
# this one with BackdoorBench's (its YAML: no cos_t_max, so T_max 100, stepped once per epoch)
PAIRED_BB_SCHEDULE = PAIRED_SETTING + ",cos_t_max=100"
# ANP with BackdoorBench's subset and torch's random stream replayed as its anp.py consumes it (batches, crops, noise)
ANP_BB_STREAM = ["--random_stream", "backdoorbench"]
PAIRED_BB_STREAM = PAIRED_SETTING + ",random_stream=backdoorbench"
FP_STEP_SCHEDULE = ["--cos_t_max", "0"]
BB_FLAGS = "flags=backdoorbench"  # the drop-in run on BackdoorBench's own command line (FT, NAD, EP)
# the modules whose outputs BackdoorBench's nad.py distils in its preactresnet18 (children()[:-3], [:-2], [:-1]:
# the outputs of layer3, layer4 and avgpool, for beta1, beta2, beta3); the drop-in's default: layer2, layer3, layer4
NAD_BB_LAYERS = ("layer3", "layer4", "avgpool")
NAD_LAYERS_VARIANT = BB_FLAGS + ",attention_layers=" + "+".join(NAD_BB_LAYERS)
# --paired-subsets for NAD: the drop-in on BackdoorBench's own clean subset at the same seed, given as --index FILE
# (BackdoorBench's nad.py trains on the first choose_index draw after fix_random: bb_stream_index_file)
NAD_PAIRED_VARIANT = BB_FLAGS + ",index=backdoorbench_stream"
# --nad-bn-reestimate: the drop-in's NAD with bn_stats: reestimate (BN statistics re-estimated on the clean subset
# after the distillation; an option of the plug-in, not BackdoorBench's semantics), appended to a variant's name
NAD_BN_VARIANT = ",bn_stats=reestimate"
NAD_VARIANTS = (BB_FLAGS + NAD_BN_VARIANT, NAD_PAIRED_VARIANT, NAD_PAIRED_VARIANT + NAD_BN_VARIANT)


def bb_stream_index_file(s: Settings, seed: int) -> Path:
    """A file (under the work dir; written once) of BackdoorBench's clean subset at ``--random_seed seed`` for the
    FT/NAD ratio, in ``--index`` format: the first ``choose_index`` draw (``backdoorbench_stream_indices``)."""
    from otbr_plugin.data.subsets import backdoorbench_stream_indices
    from otbr_plugin.io import write_text

    idx = backdoorbench_stream_indices(s.n_train, s.clean_ratio, seed, draw=1)
    path = s.work / "indices" / f"bb_stream_n{s.n_train}_r{s.clean_ratio:g}_s{seed}.txt"
    text = "".join(f"{i}\n" for i in idx)
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)  # creates the folder
    return path


BUDGETED = ("fp", "anp", "ft", "nad", "ep")  # defenses whose CPU-sized budget is part of a run's name


def budget_tag(s: Settings, defense: str) -> str:
    """The CPU budget of an FP or ANP run, as it appears in the run's folder name (e.g. ``e10-r0.2-p0.1``)."""
    if defense == "fp":
        return f"e{s.fp_epochs}-r{s.fp_ratio:g}-p{s.fp_once_prune_ratio:g}"
    if defense == "anp":
        lr = "" if s.anp_lr is None else f"-lr{s.anp_lr:g}"
        return f"i{s.anp_iters}-b{s.anp_batch}-ps{s.anp_pruning_step:g}{lr}"
    if defense == "ft":
        return f"e{s.ft_epochs}-b{s.ft_batch}-r{s.clean_ratio:g}"
    if defense == "nad":
        return f"te{s.nad_epochs}-b{s.nad_batch}-r{s.clean_ratio:g}"
    if defense == "ep":
        return f"u{s.ep_u:g}-b{s.ep_batch}"
    raise ValueError(f"no CPU budget for {defense!r}")


COMPAT_DIR = Path(__file__).resolve().parent / "backdoorbench_compat"


def run_env(s: Settings, run: Run) -> dict[str, str]:
    """Threads limited for every run. The drop-ins import the otbr-plugin of this script's checkout (REPO on
    PYTHONPATH), the one whose commit the table names, whatever otbr-plugin BackdoorBench's environment has
    installed. BackdoorBench's own scripts (not the drop-ins) also get the two
    workarounds they need under torch >= 2.6 / numpy 2 (docs/backdoorbench.md): TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
    (its loader calls torch.load without weights_only, i.e. a full unpickle of its own records) and
    scripts/backdoorbench_compat/sitecustomize.py on PYTHONPATH (restores np.infty, removed in numpy 2)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads), "PYTHONUNBUFFERED": "1"})
    env.pop("PYTHONPATH", None)
    if run.impl == "plug-in":
        env["PYTHONPATH"] = str(REPO)
    if run.impl == "BackdoorBench":
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        env["PYTHONPATH"] = str(COMPAT_DIR)
        env["MPLBACKEND"] = "Agg"
    return env


def plugin_code() -> str:
    """The otbr-plugin a drop-in run imports (``run_env``): this checkout and its commit."""
    dirty = _git(REPO, "status", "--porcelain", "--untracked-files=no")
    return f"{REPO} @ {_git(REPO, 'rev-parse', 'HEAD')}" + (" (+ local changes)" if dirty else "")


def _done_marker(s: Settings, run: Run) -> Path:
    return s.bb_root / run.kept / "crosscheck_run.json"


def execute(s: Settings, run: Run) -> dict:
    """Run one script from BB_ROOT unless its kept output exists; returns its run info."""
    from otbr_plugin.io import write_json

    marker = _done_marker(s, run)
    if marker.is_file():
        return json.loads(marker.read_text())
    if run.kind == "attack" and (s.bb_root / run.kept / "attack_result.pt").is_file():
        info = {"label": run.label, "cmd": ["python", run.script, *run.args], "seconds": None,
                "note": "existing record"}
        write_json(marker, info)
        return info
    deadline = time.time() + 60 * s.wait_attacks_min
    while run.kind == "attack" and (s.bb_root / run.kept).exists() and time.time() < deadline:
        if (s.bb_root / run.kept / "attack_result.pt").is_file():
            time.sleep(10)  # let it finish writing
            info = {"label": run.label, "cmd": ["python", run.script, *run.args], "seconds": None,
                    "note": "made by an earlier invocation"}
            write_json(marker, info)
            return info
        time.sleep(15)
    if run.kind == "attack" and (s.bb_root / run.kept).exists():
        raise RuntimeError(f"{s.bb_root / run.kept} exists without attack_result.pt: an attack still running or "
                           "interrupted; wait for it, or remove the folder to make the record again")
    if run.output and (s.bb_root / run.output).exists():  # a half-written folder of an interrupted run
        shutil.rmtree(s.bb_root / run.output)
    log = s.work / "logs" / run.record / (Path(run.kept).name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [s.bb_python, run.script, *run.args]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=s.bb_root, env=run_env(s, run), stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{run.label}: exit {rc}; see {log}")
    if run.kind == "defense":
        dest = s.bb_root / run.kept
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(s.bb_root / run.output, dest)
    info = {"label": run.label, "record": run.record, "defense": run.name, "impl": run.impl, "variant": run.variant,
            "seed": run.seed, "cmd": ["python", run.script, *run.args], "seconds": round(seconds, 1),
            "threads": s.threads, "loadavg_start": [round(x, 2) for x in load0],
            "otbr_plugin": plugin_code() if run.impl == "plug-in" else None,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "log": str(log)}
    write_json(marker, info)
    return info


# ----------------------------------------------------------------------------------------------- results
def _read_summary(path: Path) -> dict[str, float]:
    """test_acc/test_asr/test_ra from a BackdoorBench-style CSV: the row labelled ``last`` of a
    Metric_Aggregator summary, else the last row."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: empty")
    first = next(iter(rows[0]))
    row = next((r for r in rows if r.get(first) == "last"), rows[-1])
    return {k: float(row[f"test_{k}"]) for k in ("acc", "asr", "ra")}


SUMMARY_FILE = {"clp": "clp_df_summary.csv", "fp": "finetune_df_summary.csv", "anp": "anp_df_summary.csv",
                "ft": "ft_df_summary.csv", "nad": "nad_df_summary.csv", "ep": "ep_df_summary.csv",
                "otbr_ft": "otbr_ft_df_summary.csv", "otbr_nad": "otbr_nad_df_summary.csv",
                "otbr_ep": "otbr_ep_df_summary.csv",
                "otbr_clp": "otbr_clp_df_summary.csv", "otbr_fp": "otbr_fp_df_summary.csv",
                "otbr_anp": "otbr_anp_df_summary.csv", "otbr": "otbr_df_summary.csv",
                "otbr_fp_oracle": "otbr_fp_df_summary.csv", "otbr_anp_oracle": "otbr_anp_df_summary.csv"}


def run_metrics(s: Settings, run: Run) -> dict[str, float]:
    out_name = Path(run.output).name
    return _read_summary(s.bb_root / run.kept / SUMMARY_FILE[out_name])


def attack_metrics(s: Settings, record: str) -> dict[str, float]:
    return _read_summary(s.bb_root / "record" / record / "attack_df_summary.csv")


def der(before: dict[str, float], after: dict[str, float]) -> float:
    from otbr_plugin.metrics import BackdoorMetrics, defense_effectiveness_rating

    return defense_effectiveness_rating(BackdoorMetrics(**before), BackdoorMetrics(**after))


def load_state(path: Path) -> dict:
    """``model`` of a defense_result.pt, through otbr-plugin's allowlisted loader."""
    from benchmark_adapters.backdoorbench.safe_load import safe_torch_load

    obj = safe_torch_load(path)
    return obj["model"] if isinstance(obj, dict) and "model" in obj else obj


def max_weight_diff(a: dict, b: dict) -> tuple[float, str, list[str]]:
    """max |a - b| over the float tensors both hold, the key where it is, and the keys that differ at all."""
    worst, where, differ = 0.0, "", []
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if not (hasattr(x, "is_floating_point") and x.is_floating_point()) or x.shape != y.shape:
            continue
        d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if d > 0:
            differ.append(k)
        if d > worst:
            worst, where = d, k
    return worst, where, differ


def _effective(state: dict, key: str):
    """The weight ``key`` as the model uses it: ``weight_orig * weight_mask`` where a pruning reparametrisation
    was saved (BackdoorBench's FP), else the tensor itself."""
    if key in state:
        return state[key]
    if key + "_orig" in state and key + "_mask" in state:
        return state[key + "_orig"] * state[key + "_mask"]
    return None


def pruned_bn_channels(state: dict, before: dict) -> list[str]:
    """The BatchNorm channels whose weight a defense set to 0 (nonzero before), as ``<bn>:<channel>``, read from
    the weights alone (the same for BackdoorBench's result and the plug-in's)."""
    out = []
    for k, w in before.items():
        if k.endswith(".weight") and k[:-len("weight")] + "running_mean" in before and k in state:
            for c in ((state[k] == 0) & (w != 0)).flatten().nonzero().flatten().tolist():
                out.append(f"{k[:-len('.weight')]}:{int(c)}")
    return out


def pruned_units(state: dict, before: dict, defense: str) -> int | None:
    """How many units a pruning defense switched off, read from the weights alone (the same count for
    BackdoorBench's result and the plug-in's): ANP and EP, BatchNorm channels whose weight became 0; FP, input
    columns of the final ``linear`` layer that became all-zero. None for other defenses."""
    if defense in ("anp", "ep"):
        return len(pruned_bn_channels(state, before))
    if defense == "fp":
        after, orig = _effective(state, "linear.weight"), _effective(before, "linear.weight")
        if after is None or orig is None:
            return None
        return int(((after == 0).all(dim=0) & ~(orig == 0).all(dim=0)).sum())
    return None


def anp_masks(run_dir: Path) -> dict[tuple[str, int], float] | None:
    """The learnt ANP masks of a run by (BN layer, channel): BackdoorBench's ``checkpoint/mask_values.txt``
    (4 decimals) or the drop-in's ``masks.csv``; None without either."""
    bb, ours = run_dir / "checkpoint" / "mask_values.txt", run_dir / "masks.csv"
    if bb.is_file():
        cells = [line.split("\t") for line in bb.read_text().splitlines()[1:] if line.strip()]
        return {(c[1].strip(), int(c[2])): float(c[3]) for c in cells}
    if ours.is_file():
        with open(ours, newline="") as fh:
            return {(r["layer"], int(r["channel"])): float(r["mask"]) for r in csv.DictReader(fh)}
    return None


def min_anp_mask(run_dir: Path) -> float | None:
    """The smallest learnt ANP mask of a run (:func:`anp_masks`)."""
    masks = anp_masks(run_dir)
    return min(masks.values()) if masks else None


def mask_max_diff(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float]) -> tuple[float, int]:
    """max |a - b| over the neurons of two runs' masks, and how many differ (ValueError if the neurons differ)."""
    if set(a) != set(b):
        raise ValueError(f"the two runs' masks cover different BN neurons ({len(a)} and {len(b)})")
    diffs = [abs(a[k] - b[k]) for k in a]
    return max(diffs, default=0.0), sum(1 for d in diffs if d > 0)


def ep_overlap(channels: dict[tuple[str, str, int], list[str]]) -> list[dict]:
    """Every BackdoorBench EP run against every plug-in EP run on the same record: how many BN channels each
    zeroed and how many both did (``channels``: (record, impl, seed) -> ``<bn>:<channel>`` list)."""
    rows = []
    for (rec, impl, seed), bb in sorted(channels.items()):
        if impl != "BackdoorBench":
            continue
        for (rec2, impl2, seed2), ours in sorted(channels.items()):
            if rec2 != rec or impl2 != "plug-in":
                continue
            rows.append({"record": rec, "bb_seed": seed, "plugin_seed": seed2, "bb_pruned": len(bb),
                         "plugin_pruned": len(ours), "common": len(set(bb) & set(ours)),
                         "bb_channels": ";".join(bb), "plugin_channels": ";".join(ours)})
    return rows


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.1f}"


def cpu_settings(s: Settings) -> dict[str, str]:
    """The FP / ANP / CLP settings of the runs, each with BackdoorBench's default beside it."""
    lr = "each side's own (BackdoorBench 0.01, plug-in default 0.2)" if s.anp_lr is None else f"{s.anp_lr:g}"
    return {"FP fine-tuning epochs": f"{s.fp_epochs} [100]", "FP clean subset ratio": f"{s.fp_ratio:g} [0.05]",
            "FP once_prune_ratio": f"{s.fp_once_prune_ratio:g} [0.01]",
            "ANP iterations": f"{s.anp_iters} [2000]", "ANP batch": f"{s.anp_batch} [256]",
            "ANP mask lr": f"{lr} [0.01]", "ANP pruning_step": f"{s.anp_pruning_step:g} [0.05]",
            "CLP u": f"{s.clp_u:g} [sweep 0-10]", **tuning_settings(s)}


def tuning_settings(s: Settings) -> dict[str, str]:
    """The FT / NAD / EP settings of the runs (only of those in ``--defenses``), BackdoorBench's default beside."""
    out = {}
    if "ft" in s.defenses:
        out.update({"FT epochs": f"{s.ft_epochs} [100]", "FT batch": f"{s.ft_batch} [256]"})
    if "nad" in s.defenses:
        out.update({"NAD te_epochs (teacher and student)": f"{s.nad_epochs} [10]", "NAD batch": f"{s.nad_batch} [256]"})
    if "ft" in s.defenses or "nad" in s.defenses:
        out["FT/NAD clean subset ratio"] = f"{s.clean_ratio:g} [0.05]"
    if "ep" in s.defenses:
        out.update({"EP u": f"{s.ep_u:g} [3, sweep 0-10 on the test set]",
                    "EP batch (one batch of the poisoned training set, BackdoorBench's side)": f"{s.ep_batch} [256]"})
    return out


def build_tables(s: Settings, runs: list[Run], infos: dict[str, dict], versions: dict, data_info: dict) -> None:
    """Write crosscheck.csv, crosscheck.md and crosscheck.json under ``s.out``."""
    from otbr_plugin.io import write_csv, write_json, write_text

    rows, by_key = [], {}
    records = sorted({r.record for r in runs if r.kind == "defense" and r.label in infos})
    before = {rec: attack_metrics(s, rec) for rec in records}
    attack_states: dict[str, dict] = {}
    ep_channels: dict[tuple[str, str, int], list[str]] = {}  # (record, impl, seed) -> BN channels EP zeroed
    for run in runs:
        if run.kind != "defense" or run.label not in infos:
            continue
        m = run_metrics(s, run)
        pruned, min_mask = None, None
        if run.name in ("fp", "anp", "ep"):
            if run.record not in attack_states:
                attack_states[run.record] = load_state(s.bb_root / "record" / run.record / "attack_result.pt")
            state = load_state(s.bb_root / run.kept / "defense_result.pt")
            pruned = pruned_units(state, attack_states[run.record], run.name)
            if run.name == "ep":
                ep_channels[(run.record, run.impl, run.seed)] = pruned_bn_channels(state, attack_states[run.record])
            if run.name == "anp":
                min_mask = min_anp_mask(s.bb_root / run.kept)
        row = {"record": run.record, "defense": run.name, "impl": run.impl, "variant": run.variant, "seed": run.seed,
               "acc": m["acc"], "asr": m["asr"], "ra": m["ra"], "der": der(before[run.record], m),
               "pruned": pruned, "min_mask": min_mask,
               "budget": budget_tag(s, run.name) if run.name in BUDGETED else "",
               "seconds": infos[run.label]["seconds"], "threads": s.threads,
               "otbr_plugin": (infos[run.label].get("otbr_plugin") or "not recorded (the otbr-plugin installed in "
                               "BackdoorBench's environment)") if run.impl == "plug-in" else "",
               "loadavg_start_1min": infos[run.label]["loadavg_start"][0]}
        if run.name == "anp" and run.impl == "plug-in":  # its masks against BackdoorBench's run at the same seed
            twin = next((r for r in runs if (r.record, r.name, r.impl, r.variant, r.seed)
                         == (run.record, "anp", "BackdoorBench", "", run.seed) and r.label in infos), None)
            ours, theirs = anp_masks(s.bb_root / run.kept), twin and anp_masks(s.bb_root / twin.kept)
            if ours and theirs:
                row["mask_max_abs_d_vs_bb"], row["masks_differing_vs_bb"] = mask_max_diff(
                    {k: float(f"{v:.4f}") for k, v in ours.items()}, theirs)
        rows.append(row)
        by_key.setdefault((run.record, run.name, run.impl, run.variant), []).append(row)
    header = list(dict.fromkeys(h for r in rows for h in r)) if rows else ["record"]
    write_csv(s.out / "crosscheck_runs.csv", rows=[header] + [[r.get(h, "") for h in header] for r in rows])

    # CLP: weights of BackdoorBench's pruned model against the plug-in's, per record and pairing
    clp_rows = []
    for rec in records:
        bb_run = next((r for r in runs if r.record == rec and r.name == "clp" and r.impl == "BackdoorBench"), None)
        if bb_run is None or bb_run.label not in infos:
            continue
        bb_state = load_state(s.bb_root / bb_run.kept / "defense_result.pt")
        for r in runs:
            if r.record == rec and r.name == "clp" and r.impl == "plug-in" and r.label in infos:
                ours = load_state(s.bb_root / r.kept / "defense_result.pt")
                worst, where, differ = max_weight_diff(bb_state, ours)
                clp_rows.append({"record": rec, "u": s.clp_u, "variant": r.variant, "max_abs_dw": worst,
                                 "at": where, "tensors_differing": len(differ),
                                 "differing": ";".join(differ)})

    def agg(key):
        rs = by_key.get(key, [])
        if not rs:
            return None
        out = {k: statistics.fmean(r[k] for r in rs) for k in ("acc", "asr", "ra", "der", "seconds")}
        for k in ("acc", "asr"):
            out[k + "_spread"] = max(r[k] for r in rs) - min(r[k] for r in rs)
            out[k + "_min"], out[k + "_max"] = min(r[k] for r in rs), max(r[k] for r in rs)
        out["n"] = len(rs)
        out["seeds"] = ",".join(str(r["seed"]) for r in rs)
        out["pruned"] = ",".join("-" if r["pruned"] is None else str(r["pruned"]) for r in rs)
        out["min_mask"] = ",".join("-" if r["min_mask"] is None else f"{r['min_mask']:.3f}" for r in rs)
        return out

    lines = [
        "# BackdoorBench's own defenses vs otbr-plugin's drop-ins on BackdoorBench's own records",
        "",
        f"Data: Fashion-MNIST SUBSAMPLED ({s.n_train} train / {s.n_test} test, stratified, "
        f"seed {next(iter(data_info.values()))['seed']}), written in the file layout of BackdoorBench's `gtsrb` "
        "loader (43-output model, classes 0-9 used); 28x28 -> 32x32 per record (column layout): "
        + "; ".join(f"{k} = {LAYOUTS[k]}" for k in sorted(data_info))
        + ". Attacks: BackdoorBench's own attack scripts; defenses: BackdoorBench's own scripts and the drop-ins, "
        "all from BackdoorBench's root on CPU. Metrics in %, on the subsample's test split; DER against the attack's "
        "own last-epoch metrics. Seconds: wall time of the whole script (load, defend, evaluate, save) on a "
        f"shared machine, {s.threads} thread(s) each.",
        "",
        "CPU-sized settings, the same on both sides (BackdoorBench's defaults in brackets): "
        + "; ".join(f"{k} {v}" for k, v in cpu_settings(s).items()) + ".",
        "",
        "| record | layout | attack epochs | attack ACC / ASR / RA |",
        "|---|---|---|---|",
    ]
    spec = {record_name(a, s.n_train, s.n_test, s.layout): split_attack(a, s.attack_epochs, s.layout)
            for a in s.attacks}
    for rec in records:
        b = before[rec]
        _, epochs, _, layout = spec[rec]
        lines.append(f"| {rec} | {layout} | {epochs} | {_fmt(b['acc'])} / {_fmt(b['asr'])} / {_fmt(b['ra'])} |")
    lines += ["", "Pruned: ANP and EP, BatchNorm channels whose weight the defense set to 0; FP, input columns of the "
              "final linear layer that became all-zero; both read from the saved weights against the attack's, per "
              "seed. Min mask: ANP's smallest learnt mask, per seed. Budget: the CPU-sized settings (see below).",
              "", "| record | defense | implementation | budget | seeds | ACC | ASR | RA | DER | pruned | min mask | "
              "seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(by_key, key=lambda k: (k[0], k[1], k[2] != "BackdoorBench", k[3])):
        a = agg(key)
        rec, name, impl, variant = key
        impl_txt = impl + (f" ({variant})" if variant else "")
        if a["n"] > 1:
            acc = f"{_fmt(a['acc'])} ({_fmt(a['acc_min'])}-{_fmt(a['acc_max'])})"
            asr = f"{_fmt(a['asr'])} ({_fmt(a['asr_min'])}-{_fmt(a['asr_max'])})"
        else:
            acc, asr = _fmt(a["acc"]), _fmt(a["asr"])
        budget = budget_tag(s, name) if name in BUDGETED else "-"
        lines.append(f"| {rec} | {name} | {impl_txt} | {budget} | {a['seeds']} | {acc} | {asr} | {_fmt(a['ra'])} | "
                     f"{a['der']:.3f} | {a['pruned'] if name in BUDGETED else '-'} | "
                     f"{a['min_mask'] if name == 'anp' else '-'} | {_fmt(a['seconds'], pct=False)} |")
    # FP / ANP / FT / NAD / EP: the plug-in against BackdoorBench's seed spread
    diff_rows = []
    for rec in records:
        for name in ("fp", "anp", *TUNING):
            for bb_variant in ("", TMAX_VARIANT):
                bbk = agg((rec, name, "BackdoorBench", bb_variant))
                for variant in (BB_SETTING, PAIRED_SETTING, PAIRED_BB_SCHEDULE, PAIRED_BB_STREAM, BB_FLAGS,
                                NAD_LAYERS_VARIANT,
                                *NAD_VARIANTS, ""):
                    ok = agg((rec, name, "plug-in", variant))
                    if bbk is None or ok is None:
                        continue
                    # 1e-6: the drop-ins write float32 fractions, BackdoorBench python floats (0.64 vs 0.6399999938)
                    within = (abs(ok["acc"] - bbk["acc"]) <= bbk["acc_spread"] + 1e-6
                              and abs(ok["asr"] - bbk["asr"]) <= bbk["asr_spread"] + 1e-6) if bbk["n"] > 1 else None
                    diff_rows.append({"record": rec, "defense": name, "bb_variant": bb_variant or "as shipped",
                                      "plugin_setting": variant or "default", "plugin_seeds": ok["seeds"],
                                      "plugin_acc_range": f"{_fmt(ok['acc_min'])}-{_fmt(ok['acc_max'])}",
                                      "plugin_asr_range": f"{_fmt(ok['asr_min'])}-{_fmt(ok['asr_max'])}",
                                      "bb_seeds": bbk["seeds"], "dacc": abs(ok["acc"] - bbk["acc"]),
                                      "acc_spread": bbk["acc_spread"], "dasr": abs(ok["asr"] - bbk["asr"]),
                                      "asr_spread": bbk["asr_spread"], "within_spread": within,
                                      "time_ratio": ok["seconds"] / bbk["seconds"]})
    if diff_rows:
        lines += ["", "|plug-in - mean of BackdoorBench's runs| against the spread (max - min) of "
                  "BackdoorBench's own runs over its seeds (the issue's tolerance); time ratio = plug-in seconds / "
                  "BackdoorBench's mean seconds. `setting=backdoorbench,oracle` = the drop-in run with "
                  "BackdoorBench's YAML and flags, `--setting backdoorbench --oracle true` (its test-set selection, "
                  "labelled oracle; FP, ANP); `flags=backdoorbench` = the drop-in run on BackdoorBench's own command "
                  "line and YAML, script name changed (FT, NAD, EP: no test-set selection to switch); `default` = "
                  "the plug-in's own setting (no test data). FP in the backdoorbench settings fine-tunes with the "
                  "plug-in's cosine over all steps, per iteration (`--cos_t_max 0`), except `...,cos_t_max=100`: "
                  "BackdoorBench's schedule (T_max 100 epochs, stepped per epoch).",
                  "The plug-in's value is its mean over its seeds (range beside it). BackdoorBench `as shipped` = its "
                  "fp.py/anp.py with its YAML; `cos_t_max=epochs` = its fp.py with a YAML copy that sets "
                  "cos_t_max to the fine-tuning epochs (the drop-in's cosine schedule; BackdoorBench's own is "
                  "T_max = 100 epochs whatever --epochs says).",
                  "", "| record | defense | BackdoorBench | plug-in setting | plug-in seeds | plug-in ACC range | "
                  "plug-in ASR range | BB seeds | abs dACC | BB ACC spread | abs dASR | BB ASR spread | within spread "
                  "| time ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in diff_rows:
            w = "-" if d["within_spread"] is None else ("yes" if d["within_spread"] else "no")
            lines.append(f"| {d['record']} | {d['defense']} | {d['bb_variant']} | {d['plugin_setting']} | "
                         f"{d['plugin_seeds']} | {d['plugin_acc_range']} | {d['plugin_asr_range']} | {d['bb_seeds']} | "
                         f"{_fmt(d['dacc'])} | {_fmt(d['acc_spread'])} | {_fmt(d['dasr'])} | {_fmt(d['asr_spread'])} | "
                         f"{w} | {d['time_ratio']:.2f} |")
    mask_rows = [r for r in rows if "mask_max_abs_d_vs_bb" in r]
    if mask_rows:
        lines += ["", "ANP masks: each drop-in run's learnt masks (at 4 decimals, as BackdoorBench writes them) "
                  "against BackdoorBench's anp.py run at the same seed on the same record (its "
                  "`checkpoint/mask_values.txt`): max |d| over all BN neurons and how many differ. Only the paired "
                  "settings draw the same subset (`subset_sampling=backdoorbench_stream`) and the same random "
                  "stream (`random_stream=backdoorbench`).",
                  "", "| record | plug-in setting | seed | max abs d mask | neurons differing | ACC / ASR |",
                  "|---|---|---|---|---|---|"]
        for r in mask_rows:
            lines.append(f"| {r['record']} | {r['variant'] or 'default'} | {r['seed']} | "
                         f"{r['mask_max_abs_d_vs_bb']:.4f} | {r['masks_differing_vs_bb']} | "
                         f"{_fmt(r['acc'])} / {_fmt(r['asr'])} |")
    if clp_rows:
        lines += ["", f"CLP at u = {s.clp_u:g}: max |dw| between BackdoorBench's pruned weights and the plug-in's "
                  "(all float tensors of the state dicts).", "",
                  "| record | plug-in pairing | max abs dw | where | tensors that differ |", "|---|---|---|---|---|"]
        for c in clp_rows:
            lines.append(f"| {c['record']} | {c['variant']} | {c['max_abs_dw']:.3g} | {c['at'] or '-'} | "
                         f"{c['tensors_differing']} |")
    ep_rows = ep_overlap(ep_channels)
    if ep_rows:
        lines += ["", f"EP at u = {s.ep_u:g}: which BatchNorm channels each run zeroed (read from the weights). "
                  "BackdoorBench's ep.py scores one shuffled batch of the POISONED training set (histogram entropy "
                  "of each channel's standardised per-sample maxima, lower tail); the drop-in is data-free (Gaussian "
                  "entropy of the BN's stored statistics, upper tail): a different score, compared by its result.", "",
                  "| record | BackdoorBench seed | plug-in seed | BackdoorBench pruned | plug-in pruned | both | "
                  "BackdoorBench's channels | plug-in's channels |", "|---|---|---|---|---|---|---|---|"]
        for e in ep_rows:
            lines.append(f"| {e['record']} | {e['bb_seed']} | {e['plugin_seed']} | {e['bb_pruned']} | "
                         f"{e['plugin_pruned']} | {e['common']} | {e['bb_channels'] or '-'} | "
                         f"{e['plugin_channels'] or '-'} |")
    lines += ["", "Versions and machine:", ""] + [f"- {k}: {v}" for k, v in versions.items()]
    lines += ["", "Commands (from BackdoorBench's root; `python` = BackdoorBench's environment; every run with "
              f"`OMP_NUM_THREADS={s.threads} MKL_NUM_THREADS={s.threads}`, BackdoorBench's own scripts also with "
              "`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 PYTHONPATH=<otbr-plugin>/scripts/backdoorbench_compat`, "
              "see docs/backdoorbench.md):", ""]
    seen = set()
    for run in runs:
        info = infos.get(run.label)
        if info and info.get("cmd"):
            cmd = " ".join(info["cmd"]).replace(str(s.work), "<work>")
            key = (run.record, run.impl, run.name, run.variant)
            if key not in seen:
                seen.add(key)
                lines.append(f"- {run.impl} {run.name}{' ' + run.variant if run.variant else ''} "
                             f"({run.record}): `{cmd}`")
    lines.append("")
    write_text(s.out / "crosscheck.md", "\n".join(lines))
    write_json(s.out / "crosscheck.json", {"versions": versions, "data": data_info, "settings": cpu_settings(s),
                                           "attack_metrics": before,
                                           "runs": rows, "clp_weights": clp_rows, "fp_anp_vs_spread": diff_rows,
                                           "ep_channels": ep_rows})
    if clp_rows:
        h = list(clp_rows[0])
        write_csv(s.out / "crosscheck_clp_weights.csv", rows=[h] + [[c[k] for k in h] for c in clp_rows])


# ----------------------------------------------------------------------------------------------- main
def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(s: Settings) -> dict:
    probe = ("import sys, torch, numpy, torchvision; "
             "print(sys.version.split()[0], torch.__version__, numpy.__version__, torchvision.__version__)")
    try:
        py, torch_v, np_v, tv_v = subprocess.run([s.bb_python, "-c", probe], capture_output=True, text=True,
                                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError, ValueError) as err:
        raise SystemExit(f"--bb-python {s.bb_python}: cannot import torch, numpy and torchvision ({err})")
    from otbr_plugin import __version__

    dirty = _git(REPO, "status", "--porcelain", "--untracked-files=no")
    return {
        "BackdoorBench commit": _git(s.bb_root, "rev-parse", "HEAD"),
        "otbr-plugin": f"{__version__}, commit {_git(REPO, 'rev-parse', 'HEAD')}" + (" (+ local changes)" if dirty
                                                                                    else ""),
        "python / torch / torchvision / numpy (BackdoorBench's environment)": f"{py} / {torch_v} / {tv_v} / {np_v}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; CPU only",
        "threads per run": s.threads,
    }


def schedule(s: Settings) -> list[Run]:
    """All runs in priority order, so that a run cut off by a deadline leaves the most informative part of the
    table filled: the attacks; then per record (in --attacks order) CLP, the first seed of BackdoorBench's FP
    and ANP with the drop-ins in BackdoorBench's setting, BackdoorBench's further seeds, the drop-ins in their
    default setting; OTBR (no BackdoorBench counterpart) last."""
    def rank(run: Run) -> tuple[int, int]:
        first_seed = (s.seeds if run.record == record_name(s.attacks[0], s.n_train, s.n_test, s.layout)
                      else s.seeds_blended)[0]
        if run.name == "clp":
            return (0, 0)
        if run.name == "otbr":
            return (9, 0)
        if run.impl == "BackdoorBench":
            return (1, 0) if run.seed == first_seed else (2, run.seed)
        if run.variant in (BB_SETTING, BB_FLAGS, NAD_LAYERS_VARIANT):
            return (1, 1) if run.seed == first_seed else (2, run.seed)
        return (3, run.seed)

    ordered = []
    for attack in s.attacks:
        ordered += sorted(defense_runs(s, attack), key=rank)
    ordered.sort(key=lambda r: rank(r)[0] == 9)  # OTBR of every record after everything else
    return [attack_run(s, attack) for attack in s.attacks] + ordered


def run_all(s: Settings, runs: list[Run], infos: dict[str, dict], failures: list[str], jobs: int) -> None:
    """Execute the runs not yet done with ``jobs`` workers, in order, never two at once that write the same
    output folder, and a record's defenses only after its attack."""
    import threading

    pending = [r for r in runs if r.label not in infos]
    busy: set[str] = set()
    failed_records: set[str] = set()
    lock = threading.Lock()

    def ready(run: Run) -> bool:
        if run.kind == "defense":
            attack = next(r for r in runs if r.kind == "attack" and r.record == run.record)
            if attack.label not in infos:
                return False
        return (run.output or run.kept) not in busy

    def worker() -> None:
        while True:
            with lock:
                for r in list(pending):
                    if r.record in failed_records:
                        pending.remove(r)
                if not pending:
                    return
                run = next((r for r in pending if ready(r)), None)
                if run is not None:
                    pending.remove(run)
                    busy.add(run.output or run.kept)
            if run is None:
                time.sleep(5)
                continue
            print(f"  run  {run.label}", flush=True)
            try:
                info = execute(s, run)
                with lock:
                    infos[run.label] = info
                print(f"  done {run.label}: {info['seconds']} s", flush=True)
            except RuntimeError as err:
                with lock:
                    failures.append(str(err))
                    if run.kind == "attack":
                        failed_records.add(run.record)
                print(f"  FAIL {err}", flush=True)
            finally:
                with lock:
                    busy.discard(run.output or run.kept)

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bb_root", help="root of a BackdoorBench checkout (holds attack/, defense/, config/, utils/)")
    p.add_argument("--bb-python", default=sys.executable,
                   help="python of BackdoorBench's environment, with otbr-plugin installed (default: this python)")
    p.add_argument("--out", required=True, help="folder for the table (crosscheck.md/.csv/.json)")
    p.add_argument("--work", default=None, help="folder for logs and generated YAMLs (default: OUT/work)")
    p.add_argument("--n-train", type=int, default=1000, help="training subsample (stratified) (default 1000)")
    p.add_argument("--n-test", type=int, default=250, help="test subsample (stratified) (default 250)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="resize",
                   help="how the 28x28 images become BackdoorBench's 32x32 ones, for attacks given without @LAYOUT: "
                        "resize (PIL bilinear; default) or pad (zero border of 2; BadNets' corner trigger falls "
                        "on it)")
    p.add_argument("--attacks", nargs="+", default=["badnet", "blended"],
                   help="BackdoorBench attack scripts, NAME[:EPOCHS][@LAYOUT][%%PRATIO] (own epochs: record name gets "
                        "_eEPOCHS; own layout; own --pratio: _pPRATIO); the first gets --seeds, the others "
                        "--seeds-other")
    p.add_argument("--attack-epochs", type=int, default=3, help="BackdoorBench's --epochs of the attacks (default 3)")
    p.add_argument("--attack-batch", type=int, default=32,
                   help="BackdoorBench's --batch_size of the attacks (default 32: more steps per CPU second)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of BackdoorBench's FP and ANP on the first attack's record (default 0 1 2)")
    p.add_argument("--seeds-other", type=int, nargs="+", default=None,
                   help="seeds of BackdoorBench's FP and ANP on the other records (default: --seeds)")
    p.add_argument("--defenses", nargs="+", default=["clp", "otbr", "fp", "anp"],
                   choices=["clp", "otbr", "fp", "anp", *TUNING],
                   help="defenses to run and tabulate (default clp otbr fp anp; ft, nad, ep: BackdoorBench's script "
                        "and the drop-in on the same command line)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every run (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--fp-epochs", type=int, default=100, help="FP fine-tuning epochs, both (BackdoorBench: 100)")
    p.add_argument("--fp-once-prune-ratio", type=float, default=0.01,
                   help="BackdoorBench FP's pruning step as a share of the channels (BackdoorBench: 0.01)")
    p.add_argument("--fp-ratio", type=float, default=0.05,
                   help="FP's clean subset as a share of the training split, both (--ratio; BackdoorBench: 0.05)")
    p.add_argument("--anp-lr", type=float, default=None,
                   help="ANP mask learning rate, both (BackdoorBench's --lr, the drop-ins' --mask_lr; default: each "
                        "side's own, BackdoorBench 0.01, plug-in default setting 0.2)")
    p.add_argument("--plugin-seeds", type=int, default=1,
                   help="the drop-ins' FP/ANP in BackdoorBench's setting run at the first N of BackdoorBench's "
                        "seeds (default 1; their default setting at the first seed only)")
    p.add_argument("--fp-bb-tmax", action="store_true",
                   help="also run BackdoorBench's FP with cos_t_max = --fp-epochs (a YAML copy): the drop-in's "
                        "cosine schedule, to measure that one difference at a reduced epoch count")
    p.add_argument("--anp-iters", type=int, default=2000, help="ANP mask iterations, both (BackdoorBench: 2000)")
    p.add_argument("--anp-batch", type=int, default=256, help="ANP batch size, both (BackdoorBench: 256, plug-in default 128)")
    p.add_argument("--anp-pruning-step", type=float, default=0.05,
                   help="BackdoorBench ANP's threshold grid step (BackdoorBench: 0.05)")
    p.add_argument("--clp-u", type=float, default=3.0)
    p.add_argument("--ft-epochs", type=int, default=100, help="FT fine-tuning epochs, both (BackdoorBench: 100)")
    p.add_argument("--ft-batch", type=int, default=256, help="FT batch size, both (BackdoorBench: 256)")
    p.add_argument("--nad-epochs", type=int, default=10,
                   help="NAD's --te_epochs, both: BackdoorBench's nad.py trains the teacher AND the student for it "
                        "(BackdoorBench: 10); the drop-in also gets --epochs with the same value (its student)")
    p.add_argument("--nad-batch", type=int, default=256, help="NAD batch size, both (BackdoorBench: 256)")
    p.add_argument("--nad-bb-layers", action="store_true",
                   help="also run the drop-in's NAD with --attention_layers " + " ".join(NAD_BB_LAYERS) + ": the layers "
                        "BackdoorBench's nad.py distils in its preactresnet18 (the drop-in's default: layer2 layer3 "
                        "layer4)")
    p.add_argument("--nad-bn-reestimate", action="store_true",
                   help="also run each of the drop-in's NAD runs (flags=backdoorbench, and with --paired-subsets the "
                        "one on BackdoorBench's subset) with --bn_stats reestimate: its BN running statistics "
                        "re-estimated on the clean subset after the distillation (the plug-in's option)")
    p.add_argument("--clean-ratio", type=float, default=0.05,
                   help="FT's and NAD's clean subset as a share of the training split (--ratio), both (BackdoorBench: "
                        "0.05)")
    p.add_argument("--ep-u", type=float, default=3.0,
                   help="EP's u, both (BackdoorBench: 3; its test-set u sweep is narrowed to this u by a YAML copy)")
    p.add_argument("--ep-batch", type=int, default=256,
                   help="EP's --batch_size: BackdoorBench's ep.py scores ONE batch of the poisoned training set of "
                        "this size (BackdoorBench: 256); the drop-in (data-free) ignores it")
    p.add_argument("--wait-attacks", type=float, default=0.0, metavar="MIN",
                   help="wait up to MIN minutes for an attack record that another process is still making")
    p.add_argument("--only-impl", choices=("BackdoorBench", "plug-in"), default=None,
                   help="run (and tabulate) only this side's defense runs")
    p.add_argument("--paired-subsets", action="store_true",
                   help="also run the drop-ins' FP/ANP in BackdoorBench's setting with --subset_sampling "
                        "backdoorbench_stream (BackdoorBench's own clean subset at the same seed; own folders); "
                        "FP both with the drop-in's schedule and with BackdoorBench's (cos_t_max 100, per epoch); "
                        "NAD with --index FILE holding that subset (BackdoorBench's nad.py draws it once)")
    p.add_argument("--only-variant", default=None, metavar="TEXT",
                   help="run (and tabulate) only the defense runs whose variant name contains TEXT (e.g. "
                        "bn_stats=reestimate)")
    p.add_argument("--tables-only", action="store_true", help="only rebuild the table from the runs that exist")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    bb_root = Path(a.bb_root).resolve()
    from benchmark_adapters.backdoorbench.install import install_dropin

    for sub in ("attack", "defense", "config/defense", "utils"):
        if not (bb_root / sub).is_dir():
            raise SystemExit(f"{bb_root} is not a BackdoorBench checkout (no {sub}/)")
    out = Path(a.out).resolve()
    s = Settings(bb_root=bb_root, bb_python=a.bb_python, out=out, work=Path(a.work).resolve() if a.work else out / "work",
                 dataset_paths={}, layout=a.layout, attacks=a.attacks, attack_epochs=a.attack_epochs, attack_batch=a.attack_batch, n_train=a.n_train, n_test=a.n_test,
                 seeds=a.seeds, seeds_blended=a.seeds_other or a.seeds, threads=a.threads, fp_epochs=a.fp_epochs,
                 fp_once_prune_ratio=a.fp_once_prune_ratio, anp_iters=a.anp_iters, anp_batch=a.anp_batch,
                 anp_pruning_step=a.anp_pruning_step, anp_lr=a.anp_lr, fp_ratio=a.fp_ratio,
                 plugin_seeds=a.plugin_seeds, fp_bb_tmax=a.fp_bb_tmax, clp_u=a.clp_u, defenses=a.defenses,
                 wait_attacks_min=a.wait_attacks, ft_epochs=a.ft_epochs, ft_batch=a.ft_batch,
                 nad_epochs=a.nad_epochs, nad_batch=a.nad_batch, clean_ratio=a.clean_ratio, ep_u=a.ep_u,
                 ep_batch=a.ep_batch, nad_bb_layers=a.nad_bb_layers,
                 nad_bn_reestimate=a.nad_bn_reestimate)
    ver = versions(s)
    print(f"otbr-plugin crosscheck in {bb_root}: {ver['BackdoorBench commit']}", flush=True)
    # force: the drop-ins of the otbr-plugin that runs the crosscheck replace older ones (only defense/otbr*.py
    # and config/defense/otbr*/ are written)
    for path, status in install_dropin(bb_root, datasets=[DATASET], force=True):
        print(f"  drop-in {status:9} {path.relative_to(bb_root)}", flush=True)
    for attack in a.attacks:
        split_attack(attack, 1, a.layout)  # a malformed spec fails here, before anything runs
    data_info = {}
    for layout in sorted({attack_layout(s, attack) for attack in a.attacks}):
        s.dataset_paths[layout], data_info[layout] = prepare_data(bb_root, a.n_train, a.n_test, a.data_seed, layout)
        print(f"  data: Fashion-MNIST SUBSAMPLED to {a.n_train} train / {a.n_test} test (stratified, seed "
              f"{a.data_seed}), {layout} layout, in BackdoorBench's gtsrb file layout at "
              f"{data_info[layout]['folder']}", flush=True)

    s.paired_subsets = a.paired_subsets
    runs = schedule(s)
    if a.only_impl:  # e.g. more seeds of the drop-ins while BackdoorBench's runs go on in another invocation
        runs = [r for r in runs if r.kind == "attack" or r.impl == a.only_impl]
    if a.only_variant is not None:
        runs = [r for r in runs if r.kind == "attack" or a.only_variant in r.variant]
    infos: dict[str, dict] = {}
    for run in runs:
        if _done_marker(s, run).is_file():
            infos[run.label] = json.loads(_done_marker(s, run).read_text())
    failures: list[str] = []
    if not a.tables_only:
        run_all(s, runs, infos, failures, a.jobs)
    ver["load average at the table's writing (1/5/15 min)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    build_tables(s, runs, infos, ver, data_info)
    print(f"table: {s.out / 'crosscheck.md'}", flush=True)
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
