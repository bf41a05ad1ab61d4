"""Train a backdoored model from a run config and package it as a bundle (what ``otbr-bench attack`` runs).

A run config is a mapping with four sections (all validated, unknown keys rejected)::

    attack:  {name: badnets, target_class: 0, poison_ratio: 0.1, ...}   # the attack's config fields
    dataset: fashion_mnist                                              # or {name: fashion_mnist}
    model:   {name: preactresnet18, width: 0.25}
    train:   {epochs: 8, batch_size: 128, lr: 0.01, ...}                # TrainConfig fields
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..bundle import Bundle
from ..config import dataclass_from_dict
from ..data import Normalizer, get_dataset_spec, load_dataset, tensor_identity
from ..metrics import accuracy, evaluate_backdoor, predict
from ..models import ModelConfig, list_models, model_options
from ..runtime import resolve_device
from ..train import TrainConfig
from .base import STATE_PREFIX, Attack, AttackContext
from .registry import create_attack

__all__ = ["ModelSection", "AttackRun", "parse_attack_run", "run_attack", "RUN_SECTIONS"]

RUN_SECTIONS = ("attack", "dataset", "model", "train")


@dataclass
class ModelSection:
    """The model to train: a zoo name, its channel multiplier and its own options (``args``, e.g.
    ``{stem: cifar}`` for resnet18)."""

    name: str = "preactresnet18"
    width: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in list_models():
            raise ValueError(f"model.name {self.name!r} is not in the zoo; available: {', '.join(list_models())}")
        if not 0 < self.width <= 4:
            raise ValueError(f"model.width must be in (0, 4], got {self.width!r}")
        if not isinstance(self.args, dict):
            raise ValueError(f"model.args must be a mapping of option: value, got {self.args!r}")
        known = model_options(self.name)
        unknown = sorted(set(self.args) - set(known))
        if unknown:
            raise ValueError(f"model.args: {self.name} has no option(s) {', '.join(unknown)}; its options: "
                             f"{', '.join(known) or '(none)'}")

    def to_dict(self) -> dict[str, Any]:
        """name and width, plus args when any (so configs without options keep their fingerprint)."""
        out: dict[str, Any] = {"name": self.name, "width": self.width}
        if self.args:
            out["args"] = dict(self.args)
        return out


@dataclass
class AttackRun:
    """A validated attack run: attack, dataset name, model and training settings."""

    attack: Attack
    dataset: str
    model: ModelSection
    train: TrainConfig

    def model_config(self) -> ModelConfig:
        spec = get_dataset_spec(self.dataset)
        return ModelConfig(self.model.name, spec.num_classes, spec.in_channels, spec.image_size, float(self.model.width),
                           dict(self.model.args))

    def resolved(self) -> dict[str, Any]:
        """The full resolved config (defaults filled in), as plain data."""
        return {"attack": self.attack.params(), "dataset": self.dataset, "model": self.model.to_dict(),
                "train": self.train.to_dict()}


def parse_attack_run(config: Mapping[str, Any]) -> AttackRun:
    """Validate a run config mapping and build the attack, model section and training config."""
    if not isinstance(config, Mapping):
        raise ValueError(f"an attack config must be a mapping with sections {', '.join(RUN_SECTIONS)}")
    unknown = sorted(set(config) - set(RUN_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {', '.join(unknown)}; valid sections: {', '.join(RUN_SECTIONS)}")
    attack_cfg = config.get("attack")
    if not isinstance(attack_cfg, Mapping) or not attack_cfg.get("name"):
        raise ValueError("the config needs an 'attack' section with a 'name' (e.g. attack: {name: badnets})")
    params = {k: v for k, v in attack_cfg.items() if k != "name"}
    attack = create_attack(str(attack_cfg["name"]), params)

    dataset = config.get("dataset")
    if isinstance(dataset, Mapping):
        extra = sorted(set(dataset) - {"name"})
        if extra:
            raise ValueError(f"dataset: unknown key(s) {', '.join(extra)}; valid keys: name")
        dataset = dataset.get("name")
    if not isinstance(dataset, str) or not dataset:
        raise ValueError("the config needs a 'dataset' (a name such as fashion_mnist or cifar10)")
    spec = get_dataset_spec(dataset)
    if attack.config.label_mode == "all2one" and attack.config.target_class >= spec.num_classes:
        raise ValueError(f"attack.target_class {attack.config.target_class} is out of range for {spec.name} "
                         f"({spec.num_classes} classes)")

    model_cfg = config.get("model", {}) or {}
    if not isinstance(model_cfg, Mapping):
        raise ValueError("'model' must be a mapping such as {name: preactresnet18, width: 0.25}")
    model = dataclass_from_dict(ModelSection, model_cfg, what="model")

    train_cfg = config.get("train", {}) or {}
    if not isinstance(train_cfg, Mapping):
        raise ValueError("'train' must be a mapping of TrainConfig fields such as {epochs: 8}")
    train = dataclass_from_dict(TrainConfig, train_cfg, what="train")
    return AttackRun(attack=attack, dataset=spec.name, model=model, train=train)


def run_attack(run: AttackRun, data_root: str | Path | None = None,
               log: Callable[[str], None] = print, *, device: torch.device | None = None,
               progress: bool | None = None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Bundle:
    """Compute a learned trigger (``attack.prepare``: clean training set only), poison the training set, train
    the model (``attack.train_model``), evaluate ACC/ASR/RA and return the bundle (not yet saved). A learned
    trigger's tensors go into the bundle's extra tensors under ``attack.``; ``minutes`` include its search.

    The per-epoch ACC/ASR/RA in the training curve are reported only; nothing is chosen from them. The curve
    also holds ``poison_train_fit`` (share of poisoned training samples predicted as their training label),
    the training-side signal a config may be adjusted on.

    ``device`` / ``progress``: the command's or grid's (:class:`~otbr_plugin.runtime.RunSettings`); they decide
    where training and evaluation run and whether bars are shown, in place of ``run.train.device`` /
    ``run.train.progress`` (used only when not given). The recorded config (``extra.resolved_config``,
    ``training.config``) is the run's as declared; ``training.device`` records where it actually ran.
    ``on_epoch``: called after each epoch's evaluation with ``epoch``, ``epochs``, ``seconds`` (since this call
    began), ``steps`` (optimizer steps so far), ``train_samples`` and the epoch's ``metrics`` (a grid's progress
    lines and ETA).
    """
    start = time.perf_counter()
    cpu_start = time.process_time()
    train = load_dataset(run.dataset, "train", data_root)
    test = load_dataset(run.dataset, "test", data_root)
    spec = train.spec
    attack = run.attack
    device = resolve_device(run.train.device) if device is None else device
    show = run.train.progress if progress is None else progress
    model_config = run.model_config()
    context = AttackContext(images=train.images, labels=train.labels, spec=spec, model_config=model_config,
                            train=run.train, device=device, progress=show, log=log)
    attack.prepare(context)  # learned triggers (LF, TrojanNN, InputAware); nothing for fixed ones
    poisoned = attack.poison_train(train.images, train.labels, spec.num_classes)
    bd_test = attack.poison_test(test.images, test.labels, spec.num_classes)
    log(f"{attack.name}: poisoned {poisoned.poison_count} of {len(poisoned)} training samples "
        f"(ratio {poisoned.realized_ratio:.4f}"
        + (f", {poisoned.cross_indices.numel()} noise-mode/cross samples" if poisoned.cross_indices.numel() else "")
        + f"); poisoned test set: {len(bd_test)} samples")

    torch.manual_seed(run.train.seed)  # weight init is part of "same seed, same result"
    model = model_config.build()
    init = attack.initial_state()
    if init is not None:
        model.load_state_dict(init, strict=True)
    normalizer = Normalizer.for_dataset(spec)

    fit_idx = poisoned.poison_indices

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        # a dynamic attack's trigger changes while the model trains: rebuild its poisoned samples each time
        bd = attack.poison_test(test.images, test.labels, spec.num_classes) if attack.dynamic else bd_test
        metrics = evaluate_backdoor(m, test.images, test.labels, bd.images, bd.targets,
                                    bd.original_labels, normalizer, device=device).to_dict()
        # training behaviour (the only thing a config may be adjusted on): how well the model fits its
        # poisoned training samples, without augmentation
        fit_images = attack.poison_train_images(train.images[fit_idx]) if attack.dynamic else poisoned.images[fit_idx]
        preds = predict(m, fit_images, normalizer, device=device)
        metrics["poison_train_fit"] = accuracy(preds, poisoned.labels[fit_idx])
        return metrics

    epochs_done = [0]
    steps_per_epoch = math.ceil(len(poisoned) / run.train.batch_size)

    def eval_and_log(m: torch.nn.Module) -> dict[str, float]:
        out = evaluate(m)
        log(f"  epoch done: ACC {out['acc'] * 100:.2f}%  ASR {out['asr'] * 100:.2f}%  RA {out['ra'] * 100:.2f}%  "
            f"(poisoned training samples fitted: {out['poison_train_fit'] * 100:.2f}%)")
        epochs_done[0] += 1
        if on_epoch is not None:
            on_epoch({"epoch": epochs_done[0], "epochs": run.train.epochs, "seconds": time.perf_counter() - start,
                      "steps": epochs_done[0] * steps_per_epoch, "train_samples": len(poisoned), "metrics": out})
        return out

    log(f"training {model_config.name} (width {model_config.width}) on poisoned {spec.name}: "
        f"{run.train.epochs} epoch(s), device {device}")
    history = attack.train_model(model, poisoned, context, eval_fn=eval_and_log)
    if attack.dynamic:  # the final trigger
        poisoned = attack.poison_train(train.images, train.labels, spec.num_classes)
        bd_test = attack.poison_test(test.images, test.labels, spec.num_classes)
    final = history.epochs[-1]
    metrics = {"acc": final["acc"], "asr": final["asr"], "ra": final["ra"]}
    minutes = (time.perf_counter() - start) / 60.0
    cpu_minutes = (time.process_time() - cpu_start) / 60.0  # all threads of this process; shows contention
    for rec in history.epochs:
        log(f"  epoch {rec['epoch']}: loss {rec['loss']:.4f} train_acc {rec['train_acc']:.4f} "
            f"ACC {rec['acc']:.4f} ASR {rec['asr']:.4f} RA {rec['ra']:.4f} ({rec['seconds']:.0f} s)")

    attack_meta = {
        **attack.params(),
        "clean_label": attack.clean_label,
        "poison_count": poisoned.poison_count,
        "poison_ratio_realized": poisoned.realized_ratio,
        "cross_count": int(poisoned.cross_indices.numel()),
        "poison_indices": "extra.safetensors:poison_indices",
    }
    tensors = {"poison_indices": poisoned.poison_indices.clone()}
    if poisoned.cross_indices.numel():
        tensors["cross_indices"] = poisoned.cross_indices.clone()
        attack_meta["cross_indices"] = "extra.safetensors:cross_indices"
    state = attack.state_tensors()
    if state:  # what rebuilds a learned trigger (restore_attack reads it back)
        tensors.update({STATE_PREFIX + k: v.detach().cpu().clone() for k, v in state.items()})
        attack_meta["state"] = f"extra.safetensors:{STATE_PREFIX}*"
    if attack.info:
        attack_meta["trigger_search"] = attack.info
    if init is not None:
        attack_meta["initialized_from"] = "clean model of the trigger search"
    return Bundle(
        model_config=model_config,
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        dataset=spec.name,
        normalizer=normalizer,
        bd_test=bd_test,
        attack=attack_meta,
        metrics=metrics,
        training={
            "config": run.train.to_dict(),
            "curve": history.epochs,
            "train_seconds": history.seconds,
            "minutes": minutes,
            "cpu_minutes": cpu_minutes,
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "torch_version": torch.__version__,
        },
        extra={
            "resolved_config": run.resolved(),
            "clean_test": {"dataset": spec.name, "split": "test", "num_samples": len(test)},
            "train_set": {"dataset": spec.name, "split": "train", "num_samples": len(train)},
            "data": {"train": tensor_identity(train), "test": tensor_identity(test)},  # what it was trained on
        },
        tensors=tensors,
    )
