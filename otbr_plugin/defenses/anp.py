"""ANP: Adversarial Neuron Pruning (Wu and Wang, "Adversarial Neuron Perturbations Purify Backdoored Deep
Neural Networks", NeurIPS 2021). Needs the clean defense subset.

Every BatchNorm2d neuron (channel) k gets a mask m_k in [0, 1] (init 1) and multiplicative perturbations
delta_k, xi_k on its weight and bias: the BN computes BN(x) with weight gamma * (m + delta) and bias
beta * (1 + xi) when perturbed, weight gamma * m and bias beta otherwise (as the reference code). Per
iteration on a clean batch (sampled with replacement, training-style augmentation, BN in training mode):

1. perturbation: delta, xi ~ U(-eps, eps), then ``anp_steps`` signed-gradient ascent steps of size
   eps / anp_steps on the cross-entropy (the reference does not clip delta, xi back to [-eps, eps] after the
   step; ``clip_noise=true`` does, as the paper's constraint reads);
2. mask step: loss = alpha * CE(unperturbed) + (1 - alpha) * CE(perturbed), SGD (momentum 0.9) on m, then
   m is clipped to [0, 1].

Model weights are never updated. Pruning then works on a fresh copy of the input model: a pruned neuron's
BN weight is set to 0 (its bias stays, exactly as the reference's pruning and the mask model, where m
multiplies only the weight). Which neurons:

- ``pruning_by="threshold"`` (default): every neuron with m <= ``threshold`` (default 0.2, fixed; the
  reference code scans thresholds and reads the test ASR to pick one, which this project never does);
- ``pruning_by="number"`` / ``"fraction"``: the ``prune_number`` / ``prune_fraction`` (of all BN neurons)
  neurons with the smallest masks (ties broken by layer order, then channel);
- ``select_threshold=true``: a held-out part of the clean defense subset (``holdout_ratio``) is kept out of
  mask learning, and the threshold is the largest of ``threshold_grid`` whose held-out clean accuracy drop
  stays within ``max_acc_drop`` (relative to the unpruned model), i.e. chosen from clean data only.

Random numbers: ``random_stream="plugin"`` (default) draws batches, augmentation and noise on three generators
seeded from the seed; ``"backdoorbench"`` replays, on one generator seeded with the seed, torch's global stream as
BackdoorBench's anp.py consumes it at the same seed (:class:`BackdoorBenchANPStream`), so that with its clean
subset (``subset_sampling: backdoorbench_stream``) the masks are the ones it learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data.subsets import SAMPLINGS
from .bb_stream import burn_default_init, loader_seed, replacement_sampler_indices
from .base import ORACLE_LABEL, CleanData, Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .common import FollowsSetting, bb_tolerance_ok, clean_accuracy, preprocess_batch, split_holdout
from .registry import register_defense

__all__ = ["ANPConfig", "ANP", "SETTINGS", "SETTING_OPTIONS", "PerturbedBatchNorm2d", "attach_perturbations",
           "PluginStream", "BackdoorBenchANPStream",
           "optimize_masks", "select_neurons", "prune_neurons", "mask_table", "bb_candidates", "bb_choice"]


# options whose value depends on `setting` (None in the config: as the setting says)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"mask_lr": 0.2, "batch_size": 128, "bb_selection": False, "mask_precision": "full",
                "subset_sampling": "stratified"},
    "backdoorbench": {"mask_lr": 0.01, "batch_size": 256, "bb_selection": True, "mask_precision": "round4",
                      "subset_sampling": "uniform"},
}
SETTING_OPTIONS = tuple(SETTINGS["default"])


@dataclass
class ANPConfig(FollowsSetting, DefenseConfig):
    """ANP settings; defaults are the paper's / reference code's (eps 0.4, one step, alpha 0.2, mask lr 0.2,
    2000 iterations of batch 128, pruning threshold 0.2). ``setting: backdoorbench`` reproduces BackdoorBench's
    anp.py (mask lr 0.01, batch 256, its threshold scan and choice, masks compared at 4 decimals; see the module
    docstring); ``oracle: true`` makes that choice on the TEST set, as BackdoorBench does (labelled diagnostic)."""

    SETTINGS: ClassVar[dict[str, dict[str, Any]]] = SETTINGS
    setting: Literal["default", "backdoorbench"] = "default"
    oracle: bool = False
    eps: float = 0.4
    anp_steps: int = 1
    alpha: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    rand_init: bool = True
    clip_noise: bool = False
    augment: bool = True
    pruning_by: Literal["threshold", "number", "fraction"] = "threshold"
    threshold: float = 0.2
    prune_number: int = 0
    prune_fraction: float = 0.0
    select_threshold: bool = False
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 19)])
    max_acc_drop: float = 0.1
    holdout_ratio: float = 0.2
    batch_size_eval: int = 512
    # BackdoorBench's scan (bb_selection): thresholds arange(0, pruning_max + pruning_step, pruning_step), or
    # for pruning_by number ceil(pruning_step) more neurons per step up to ceil(pruning_max)
    pruning_max: float = 0.9
    pruning_step: float = 0.05
    # whose random numbers the mask optimisation draws: "plugin" (own generators: batches, augmentation and noise
    # each seeded from the seed) or "backdoorbench" (one generator replaying torch's global stream as
    # BackdoorBench's anp.py consumes it after fix_random(seed): BackdoorBenchANPStream)
    random_stream: Literal["plugin", "backdoorbench"] = "plugin"
    # BackdoorBench's print_every: its clean loader holds print_every batches, re-iterated (fresh seeds) per block,
    # with its two test loaders iterated between blocks; read only by random_stream: backdoorbench
    bb_print_every: int = 500
    # setting-dependent options (None: as `setting` says)
    mask_lr: float | None = None
    batch_size: int | None = None
    bb_selection: bool | None = None
    mask_precision: Literal["full", "round4"] | None = None
    subset_sampling: Literal["stratified", "uniform", "backdoorbench_stream"] | None = None

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(map(repr, SETTINGS))}, got {self.setting!r}")
        for name in ("oracle", "bb_selection", "rand_init", "clip_noise", "augment", "select_threshold"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask_precision not in ("full", "round4"):
            raise ValueError(f"mask_precision must be 'full' or 'round4', got {self.mask_precision!r}")
        if self.subset_sampling not in SAMPLINGS:
            raise ValueError(f"subset_sampling must be one of {', '.join(map(repr, SAMPLINGS))}, "
                             f"got {self.subset_sampling!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if not isinstance(self.anp_steps, int) or self.anp_steps < 1:
            raise ValueError(f"anp_steps must be an integer >= 1, got {self.anp_steps!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.mask_lr > 0:
            raise ValueError(f"mask_lr must be > 0, got {self.mask_lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.random_stream not in ("plugin", "backdoorbench"):
            raise ValueError(f"random_stream must be 'plugin' or 'backdoorbench', got {self.random_stream!r}")
        if not isinstance(self.bb_print_every, int) or isinstance(self.bb_print_every, bool) or self.bb_print_every < 1:
            raise ValueError(f"bb_print_every must be an integer >= 1, got {self.bb_print_every!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("batch_size", "batch_size_eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.pruning_by not in ("threshold", "number", "fraction"):
            raise ValueError(f"pruning_by must be 'threshold', 'number' or 'fraction', got {self.pruning_by!r}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not isinstance(self.prune_number, int) or self.prune_number < 0:
            raise ValueError(f"prune_number must be an integer >= 0, got {self.prune_number!r}")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction!r}")
        if self.select_threshold and self.pruning_by != "threshold":
            raise ValueError("select_threshold=true needs pruning_by='threshold'")
        if self.select_threshold and self.bb_selection:
            raise ValueError("select_threshold and bb_selection are two threshold choices: set one of them")
        if self.bb_selection and self.pruning_by == "fraction":
            raise ValueError("bb_selection scans thresholds or numbers (pruning_by threshold | number), not fractions")
        if not self.pruning_max > 0 or not self.pruning_step > 0:
            raise ValueError(f"pruning_max and pruning_step must be > 0, got {self.pruning_max!r}, {self.pruning_step!r}")
        if self.oracle and not self.bb_selection:
            raise ValueError("oracle: true scores BackdoorBench's threshold choice on the test set; it needs "
                             "bb_selection: true (setting: backdoorbench)")
        if not self.threshold_grid or any(not 0 <= t <= 1 for t in self.threshold_grid):
            raise ValueError(f"threshold_grid must be a non-empty list of values in [0, 1], got {self.threshold_grid!r}")
        if not 0 <= self.max_acc_drop <= 1:
            raise ValueError(f"max_acc_drop must be in [0, 1], got {self.max_acc_drop!r}")
        if not 0 < self.holdout_ratio < 1:
            raise ValueError(f"holdout_ratio must be in (0, 1), got {self.holdout_ratio!r}")


class PerturbedBatchNorm2d(nn.Module):
    """Wraps a BatchNorm2d with a neuron mask and multiplicative weight / bias perturbations."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if not bn.affine:
            raise ValueError("ANP needs affine BatchNorm layers (a weight to mask)")
        self.bn = bn
        n = bn.num_features
        self.mask = nn.Parameter(torch.ones(n, device=bn.weight.device))
        self.noise_weight = nn.Parameter(torch.zeros(n, device=bn.weight.device))
        self.noise_bias = nn.Parameter(torch.zeros(n, device=bn.weight.device))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.perturbed:
            w, b = bn.weight * (self.mask + self.noise_weight), bn.bias * (1 + self.noise_bias)
        else:
            w, b = bn.weight * self.mask, bn.bias
        use_batch = bn.training or bn.running_mean is None
        if bn.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(x, bn.running_mean if not bn.training or bn.track_running_stats else None,
                            bn.running_var if not bn.training or bn.track_running_stats else None,
                            w, b, use_batch, momentum, bn.eps)


def attach_perturbations(model: nn.Module) -> dict[str, PerturbedBatchNorm2d]:
    """Replace every BatchNorm2d of ``model`` (in place) by a :class:`PerturbedBatchNorm2d`; returns them by
    the BN's module name (so ``name + '.weight'`` is the BN weight in the original model)."""
    wrapped: dict[str, PerturbedBatchNorm2d] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            w = PerturbedBatchNorm2d(module)
            setattr(parent, attr, w)
            wrapped[name] = w
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer: ANP perturbs BN neurons")
    return wrapped


class PluginStream:
    """The plug-in's own draws for the mask optimisation: batch indices (with replacement), augmentation and noise
    on three CPU generators seeded ``seed + 1``, ``+ 2``, ``+ 3``."""

    def __init__(self, context: DefenseContext) -> None:
        self.batch_gen = context.generator(offset=1)
        self.aug_gen = context.generator(offset=2)
        self.noise_gen = context.generator(offset=3)

    def batch(self, n: int, batch_size: int) -> torch.Tensor:
        return torch.randint(0, n, (batch_size,), generator=self.batch_gen)

    def inputs(self, images: torch.Tensor, context: DefenseContext, augment: bool) -> torch.Tensor:
        return preprocess_batch(images, context, augment, self.aug_gen)

    def noise_(self, t: torch.Tensor, eps: float) -> None:
        """U(-eps, eps), drawn on the CPU generator for reproducibility."""
        t.copy_((torch.rand(t.shape, generator=self.noise_gen) * 2 - 1).mul_(eps))


class BackdoorBenchANPStream:
    """torch's global random stream as BackdoorBench's ``defense/anp.py`` consumes it after ``fix_random(seed)``
    in ``mitigation()``, replayed on one CPU generator seeded with ``seed`` (:mod:`.bb_stream`; the global generator
    is never touched). In its order:

    1. building its ANP network: PyTorch's default init of every conv / linear layer (:func:`burn_default_init`
       over ``model``, the same architecture);
    2. per block of ``print_every`` steps (its clean ``DataLoader(num_workers=0)`` over a
       ``RandomSampler(replacement=True, num_samples=print_every * batch_size)``, iterated once per block): the
       iterator's base seed, the sampler's seed, then the sampler's indices from its private generator;
    3. per step: the training transform of each image of the batch in turn (``RandomCrop(padding)``: row, column;
       a flip draw where the dataset flips; ``preprocess_batch(per_image=True)``), then ``reset(rand_init=True)``:
       ``uniform_(-eps, eps)`` of each noisy BN's weight noise, then its bias noise, in module order;
    4. between blocks: its clean and poisoned test loaders (``shuffle=True``) iterated once each: two seed draws
       each (base seed, sampler seed; the same with or without worker processes).

    On a CUDA (or other non-CPU) device the noise is drawn on a generator of that device seeded with ``seed``, as
    BackdoorBench's ``uniform_`` on its device's parameters draws from that device's stream (``fix_random`` seeds
    it too); everything else is drawn on the CPU, as there."""

    def __init__(self, seed: int, model: nn.Module, n: int, batch_size: int, print_every: int,
                 device: torch.device) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        device = torch.device(device)
        self.noise_gen = self.gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
        self.init_values = burn_default_init(model, self.gen)
        self.n, self.batch_size, self.print_every = n, batch_size, print_every
        self.step = 0
        self.block: torch.Tensor | None = None
        self.drawn: list[dict[str, Any]] = []  # per block: the seeds drawn (diagnostics)

    def batch(self, n: int, batch_size: int) -> torch.Tensor:
        if n != self.n or batch_size != self.batch_size:
            raise ValueError(f"the stream was set up for {self.n} images at batch {self.batch_size}, "
                             f"asked for {n} at {batch_size}")
        k = self.step % self.print_every
        if k == 0:
            if self.step > 0:  # its clean and poisoned test loaders, iterated after each block
                tests = [loader_seed(self.gen) for _ in range(4)]
                self.drawn[-1]["test_loader_seeds"] = tests
            base, sampler = loader_seed(self.gen), loader_seed(self.gen)
            self.block = replacement_sampler_indices(sampler, n, self.print_every * batch_size)
            self.drawn.append({"step": self.step, "base_seed": base, "sampler_seed": sampler})
        self.step += 1
        return self.block[k * batch_size:(k + 1) * batch_size]

    def inputs(self, images: torch.Tensor, context: DefenseContext, augment: bool) -> torch.Tensor:
        return preprocess_batch(images, context, augment, self.gen, per_image=True)

    def noise_(self, t: torch.Tensor, eps: float) -> None:
        """``uniform_(-eps, eps)`` in place, as ``torch.nn.init.uniform_`` draws it."""
        t.uniform_(-eps, eps, generator=self.noise_gen)


def optimize_masks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, context: DefenseContext,
                   cfg: ANPConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Learn ANP neuron masks on a perturbation-wrapped copy of ``model`` (which it modifies). Returns the
    masks by BN name and a short loss history."""
    layers = attach_perturbations(model)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = [l.mask for l in layers.values()]
    noises = [t for l in layers.values() for t in (l.noise_weight, l.noise_bias)]
    for t in masks + noises:
        t.requires_grad_(True)
    mask_opt = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=cfg.momentum)
    noise_opt = torch.optim.SGD(noises, lr=cfg.eps / cfg.anp_steps)
    if cfg.random_stream == "backdoorbench":
        stream = BackdoorBenchANPStream(context.seed, model, images.shape[0], cfg.batch_size, cfg.bb_print_every,
                                        context.device)
    else:
        stream = PluginStream(context)
    labels = labels.long()
    history: list[dict] = []
    model.train()

    def set_perturbed(flag: bool) -> None:
        for l in layers.values():
            l.perturbed = flag

    running = {"loss": 0.0, "acc": 0.0, "n": 0}
    every = max(1, cfg.iterations // 10)
    for it in context.progress_bar(range(cfg.iterations), desc="anp masks", total=cfg.iterations):
        idx = stream.batch(images.shape[0], cfg.batch_size)
        x = stream.inputs(images[idx], context, cfg.augment)
        y = labels[idx].to(context.device)
        if cfg.eps > 0:
            with torch.no_grad():
                for t in noises:
                    if cfg.rand_init:  # U(-eps, eps)
                        stream.noise_(t, cfg.eps)
                    else:
                        t.zero_()
            for _ in range(cfg.anp_steps):
                noise_opt.zero_grad(set_to_none=True)
                set_perturbed(True)
                loss_noise = -F.cross_entropy(model(x), y)
                loss_noise.backward()
                for t in noises:
                    t.grad = torch.sign(t.grad)
                noise_opt.step()
                if cfg.clip_noise:
                    with torch.no_grad():
                        for t in noises:
                            t.clamp_(-cfg.eps, cfg.eps)
        mask_opt.zero_grad(set_to_none=True)
        if cfg.eps > 0:
            set_perturbed(True)
            loss_rob = F.cross_entropy(model(x), y)
        else:
            loss_rob = torch.zeros((), device=context.device)
        set_perturbed(False)
        out = model(x)
        loss_nat = F.cross_entropy(out, y)
        loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)
        running["loss"] += float(loss.detach())
        running["acc"] += float((out.detach().argmax(1) == y).float().mean())
        running["n"] += 1
        if (it + 1) % every == 0 or it + 1 == cfg.iterations:
            history.append({"iteration": it + 1, "loss": running["loss"] / running["n"],
                            "train_acc": running["acc"] / running["n"]})
            running = {"loss": 0.0, "acc": 0.0, "n": 0}
    for t in noises:
        t.grad = None
    return {name: l.mask.detach().clone() for name, l in layers.items()}, history


def mask_table(masks: dict[str, torch.Tensor], precision: str = "full") -> pd.DataFrame:
    """One row per BN neuron: layer, channel, mask value (``precision`` "round4": as BackdoorBench compares them,
    written with 4 decimals and read back as float64)."""
    def value(v: float) -> float:
        return float(f"{v:.4f}") if precision == "round4" else float(v)

    rows = [{"layer": name, "channel": k, "mask": value(v)} for name, m in masks.items() for k, v in enumerate(m.tolist())]
    return pd.DataFrame(rows, columns=["layer", "channel", "mask"])


def select_neurons(masks: dict[str, torch.Tensor], pruning_by: str, threshold: float = 0.2, number: int = 0,
                   fraction: float = 0.0, precision: str = "full") -> list[tuple[str, int]]:
    """The (layer, channel) neurons to prune: mask <= threshold, or the ``number`` / ``fraction`` smallest
    masks (stable: ties in layer order, then channel order)."""
    table = mask_table(masks, precision)
    if pruning_by == "threshold":
        # full masks are float32: compare against the float32 threshold, so a mask of exactly 0.2 counts as
        # <= 0.2; rounded masks are float64, compared as BackdoorBench does
        t = float(torch.tensor(threshold, dtype=torch.float32)) if precision == "full" else float(threshold)
        chosen = table[table["mask"] <= t]
    else:
        count = number if pruning_by == "number" else int(round(fraction * len(table)))
        if count > len(table):
            raise ValueError(f"cannot prune {count} neurons: the model has {len(table)} BN neurons")
        chosen = table.sort_values("mask", kind="stable").head(count)
    return [(str(r.layer), int(r.channel)) for r in chosen.itertuples()]


def bb_candidates(table: pd.DataFrame, pruning_by: str, pruning_max: float, pruning_step: float
                  ) -> list[dict[str, Any]]:
    """BackdoorBench's scan over the mask ``table`` (see :func:`mask_table`): one candidate per step, each
    ``{"threshold" | "number", "value", "neurons"}`` with the neurons pruned so far (cumulative).

    threshold: ``numpy.arange(0, pruning_max + pruning_step, pruning_step)``, pruning every neuron with
    mask <= t (``value``: the mask of the first neuron left, or of the last one); number: for start in
    ``range(0, ceil(pruning_max) + 1, ceil(pruning_step))`` the ``start + ceil(pruning_step)`` smallest masks
    (BackdoorBench prunes a step's neurons before scoring it; ``value``: the last pruned mask)."""
    ordered = table.sort_values("mask", kind="stable").reset_index(drop=True)
    names = [(str(r.layer), int(r.channel)) for r in ordered.itertuples()]
    values = [float(v) for v in ordered["mask"]]
    out: list[dict[str, Any]] = []
    if pruning_by == "threshold":
        for t in np.arange(0, pruning_max + pruning_step, pruning_step):
            n = sum(1 for v in values if v <= float(t))
            value = values[min(n, len(values) - 1)]
            out.append({"threshold": float(t), "value": value, "neurons": names[:n]})
    elif pruning_by == "number":
        step = int(math.ceil(pruning_step))
        for start in range(0, int(math.ceil(pruning_max)) + 1, step):
            n = min(start + step, len(values))
            out.append({"number": start, "value": values[n - 1], "neurons": names[:n]})
    else:
        raise ValueError(f"BackdoorBench scans by 'threshold' or 'number', got {pruning_by!r}")
    return out


def bb_choice(scores: list[dict[str, float]], acc_ori: float, asr_ori: float | None, acc_ratio: float) -> int | None:
    """BackdoorBench's choice among scored candidates (``{"acc", "asr"}``, in scan order): the lowest ASR among
    those whose relative accuracy change stays below ``acc_ratio`` (strict, two-sided), starting from the
    unpruned model's ASR (strictly lower wins, so ties keep the earlier one; None: no candidate beats the
    unpruned model). Without ASR (``asr_ori`` None: scored on clean held-out data, where no poisoned sample
    exists) the most-pruned candidate within the same tolerance, i.e. the last one in scan order."""
    best, best_asr = None, asr_ori
    for i, row in enumerate(scores):
        if not bb_tolerance_ok(row["acc"], acc_ori, acc_ratio):
            continue
        if asr_ori is None:
            best = i
        elif row["asr"] < best_asr:
            best, best_asr = i, row["asr"]
    return best


@torch.no_grad()
def prune_neurons(model: nn.Module, neurons: list[tuple[str, int]]) -> None:
    """Zero the BN weight of each (layer, channel) in place (the reference's pruning)."""
    mods = dict(model.named_modules())
    for layer, k in neurons:
        bn = mods.get(layer)
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"{layer!r} is not a BatchNorm2d layer of the model")
        bn.weight[k] = 0


@register_defense
class ANP(Defense):
    name = "anp"
    config_class = ANPConfig
    needs_clean_data = True
    description = "Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): prune BN neurons sensitive to perturbation"

    def clean_subset_sampling(self) -> str:
        return self.config.subset_sampling

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        oracle = self.require_oracle(context)
        timer = StageTimer()
        fit, hold = clean, None
        if cfg.select_threshold or (cfg.bb_selection and oracle is None):
            fit, hold = split_holdout(clean, cfg.holdout_ratio, context.seed)
        with timer("mask_optimization"):
            work = self.copy_model(model, context.device)
            masks, history = optimize_masks(work, fit.images, fit.labels, context, cfg)
            del work
        threshold = cfg.threshold
        selection = []
        scan = None
        with timer("pruning"):
            if cfg.bb_selection:
                neurons, scan, threshold = self._bb_select(model, masks, context, hold, oracle)
            else:
                if cfg.select_threshold:  # pick the threshold on the held-out clean part
                    base = clean_accuracy(self.copy_model(model, context.device), hold, context, cfg.batch_size_eval)
                    threshold = 0.0
                    for t in sorted(cfg.threshold_grid):
                        cand = self.copy_model(model, context.device)
                        neurons = select_neurons(masks, "threshold", threshold=t, precision=cfg.mask_precision)
                        prune_neurons(cand, neurons)
                        acc = clean_accuracy(cand, hold, context, cfg.batch_size_eval)
                        ok = acc >= base * (1 - cfg.max_acc_drop) - 1e-12
                        selection.append({"threshold": t, "pruned": len(neurons), "holdout_acc": acc, "within": ok})
                        if ok:
                            threshold = max(threshold, t)
                neurons = select_neurons(masks, cfg.pruning_by, threshold, cfg.prune_number, cfg.prune_fraction,
                                         cfg.mask_precision)
            defended = self.copy_model(model, context.device)
            prune_neurons(defended, neurons)
        table = mask_table(masks, cfg.mask_precision)
        pruned_set = set(neurons)
        table["pruned"] = [(l, c) in pruned_set for l, c in zip(table["layer"], table["channel"])]
        per_layer = {name: int(sum(1 for l, _ in neurons if l == name)) for name in masks}
        values = torch.cat([m.flatten() for m in masks.values()])
        diagnostics = {
            "setting": cfg.setting,
            "random_stream": cfg.random_stream,
            "oracle": ORACLE_LABEL if oracle is not None else False,
            "pruning_by": cfg.pruning_by,
            "threshold": threshold if cfg.pruning_by == "threshold" else None,
            "threshold_selected_on_clean_holdout": cfg.select_threshold or (cfg.bb_selection and oracle is None),
            "pruned_neurons": len(neurons),
            "total_neurons": int(values.numel()),
            "pruned_per_layer": per_layer,
            "mask_stats": {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max()),
                           "below_0.2": int((values <= 0.2).sum()), "zero": int((values == 0).sum())},
            "mask_samples": len(fit),
            "holdout_samples": len(hold) if hold is not None else 0,
            "history": history,
            "threshold_selection": selection,
        }
        tables = {"masks": table}
        if selection:
            tables["threshold_selection"] = pd.DataFrame(selection)
        if scan is not None:  # BackdoorBench's threshold_df.csv / number_df.csv
            tables[f"{cfg.pruning_by}_df"] = scan
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, tables=tables,
                              stage_seconds=timer.seconds, data_used=context.data_used(), units_removed=len(neurons))

    def _bb_select(self, model: nn.Module, masks: dict[str, torch.Tensor], context: DefenseContext,
                   hold: CleanData | None, oracle) -> tuple[list[tuple[str, int]], pd.DataFrame, float | None]:
        """BackdoorBench's scan and choice (:func:`bb_candidates`, :func:`bb_choice`): scored by the oracle (test
        ACC and ASR) or on the held-out clean part (ACC only). Returns the neurons, the scan table and the
        chosen threshold (None when pruning by number; 0 pruned when no candidate is chosen)."""
        cfg = self.config
        cands = bb_candidates(mask_table(masks, cfg.mask_precision), cfg.pruning_by, cfg.pruning_max, cfg.pruning_step)

        def score(m: nn.Module) -> dict[str, float]:
            if oracle is not None:
                got = oracle(m)
                return {"acc": got.acc, "asr": got.asr, "ra": got.ra}
            return {"acc": clean_accuracy(m, hold, context, cfg.batch_size_eval)}

        base = score(self.copy_model(model, context.device))
        scores = []
        for cand in cands:
            m = self.copy_model(model, context.device)
            prune_neurons(m, cand["neurons"])
            scores.append(score(m))
        chosen = bb_choice(scores, base["acc"], base.get("asr"), cfg.max_acc_drop)
        key = cfg.pruning_by
        prefix = "test" if oracle is not None else "holdout"
        rows = []
        for i, (cand, sc) in enumerate(zip(cands, scores)):
            row = {key: cand[key], "value": cand["value"], "pruned": len(cand["neurons"])}
            row.update({f"{prefix}_{k}": v for k, v in sc.items()})
            row["within_tolerance"] = bb_tolerance_ok(sc["acc"], base["acc"], cfg.max_acc_drop)
            row["chosen"] = i == chosen
            if oracle is not None:
                row["diagnostic"] = ORACLE_LABEL
            rows.append(row)
        neurons = cands[chosen]["neurons"] if chosen is not None else []
        threshold = (cands[chosen]["threshold"] if chosen is not None else None) if key == "threshold" else None
        return neurons, pd.DataFrame(rows), threshold
