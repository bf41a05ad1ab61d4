"""The attack interface: a typed config, label mappings, poison-index selection and the poisoned sets.

An attack is a class with a ``name``, a config dataclass (target class, label mode, poison ratio, seed and
its trigger parameters, validated on construction) and two methods the harness uses:

* :meth:`Attack.poison_train` -> :class:`PoisonedTrainSet` (the training set with the poisoned samples
  replaced, and the poisoned indices recorded);
* :meth:`Attack.poison_test` -> :class:`~otbr_plugin.data.PoisonedTestSet` (every test sample whose true
  label differs from its attack target, trigger applied, true labels and indices kept).

Attacks whose trigger is *learned* (LF, TrojanNN: from a clean model; InputAware: generators trained with the
classifier) also implement the optional hooks, all no-ops for the fixed-trigger attacks:

* :meth:`Attack.prepare` computes the trigger from the clean training set before poisoning;
* :meth:`Attack.initial_state` gives the weights training starts from (TrojanNN retrains its clean model);
* :meth:`Attack.train_model` trains the classifier (InputAware trains its trigger generator along with it;
  such an attack sets ``dynamic = True`` so the harness rebuilds the poisoned sets after training);
* :meth:`Attack.state_tensors` / :meth:`Attack.load_state` hold everything needed to rebuild the trigger
  (stored in the bundle's ``extra.safetensors`` under ``attack.``), so a bundle's poisoned samples can be
  recomputed without pickle.

Poison-index selection follows BackdoorBench (``utils/aggregate_block/bd_attack_generate`` +
``generate_single_target_attack_train_poison_index``): ``round(poison_ratio * N)`` indices drawn without
replacement, for dirty-label all2one attacks from *all* training samples (BackdoorBench deliberately does not
avoid the target class in training; a target-class sample gets the trigger and keeps its label) and for
clean-label attacks (SIG) from the target-class samples only. ``exclude_target=True`` draws dirty-label
poison from the non-target samples instead. Draws use a CPU ``torch.Generator`` seeded with ``seed``, so the
same seed gives the same indices on every machine.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, TypeVar

import torch
from torch import nn

from ..config import dataclass_from_dict
from ..data.poisoned import PoisonedTestSet
from ..data.specs import DatasetSpec
from ..models import ModelConfig
from ..train import TrainConfig, TrainHistory, train_classifier
from .triggers import check_images

__all__ = [
    "AttackConfig",
    "Attack",
    "AttackContext",
    "STATE_PREFIX",
    "PoisonedTrainSet",
    "attack_targets",
    "select_poison_indices",
    "LABEL_MODES",
]

LABEL_MODES = ("all2one", "all2all")
STATE_PREFIX = "attack."  # key prefix of an attack's state tensors in a bundle's extra.safetensors
C = TypeVar("C", bound="AttackConfig")


@dataclass
class AttackConfig:
    """Settings every attack has. Subclasses add trigger parameters (with the paper's / BackdoorBench's
    defaults) and extend :meth:`validate`, which runs on construction and names the bad field.

    Attributes:
        target_class: the all2one target label (ignored by all2all, which maps y -> (y + 1) % K).
        label_mode: ``"all2one"`` or ``"all2all"``.
        poison_ratio: share of the *whole* training set that is poisoned (BackdoorBench's ``pratio``).
        seed: seeds the poison-index draw (and any per-sample randomness of the attack).
        exclude_target: draw dirty-label all2one poison only from non-target samples (BackdoorBench: False).
    """

    target_class: int = 0
    label_mode: Literal["all2one", "all2all"] = "all2one"
    poison_ratio: float = 0.1
    seed: int = 0
    exclude_target: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if isinstance(self.target_class, bool) or not isinstance(self.target_class, int) or self.target_class < 0:
            raise ValueError(f"target_class must be a non-negative integer, got {self.target_class!r}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}")
        if isinstance(self.poison_ratio, bool) or not isinstance(self.poison_ratio, (int, float)) \
                or not 0.0 < float(self.poison_ratio) <= 1.0:
            raise ValueError(f"poison_ratio must be a number in (0, 1], got {self.poison_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping; unknown keys and wrongly typed values are errors naming the key."""
        return dataclass_from_dict(cls, data, what=f"{cls.__name__}")


@dataclass
class PoisonedTrainSet:
    """A poisoned training set.

    ``images``/``labels`` are what the model is trained on; ``original_labels`` the true labels;
    ``poison_indices`` (sorted, int64) the samples that carry the trigger; ``cross_indices`` the samples
    changed without a label change for the attack's own purposes (WaNet's noise mode), empty otherwise.
    """

    images: torch.Tensor
    labels: torch.Tensor
    original_labels: torch.Tensor
    poison_indices: torch.Tensor
    cross_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        check_images(self.images, "poisoned training images")
        for name in ("labels", "original_labels"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(f"{name} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
        for name in ("poison_indices", "cross_indices"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-d int64 tensor")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def poison_count(self) -> int:
        return int(self.poison_indices.numel())

    @property
    def realized_ratio(self) -> float:
        return self.poison_count / max(1, len(self))


@dataclass
class AttackContext:
    """What an attack with a learned trigger may use: the *clean training set* (uint8 images, int64 labels),
    the dataset spec, the model it attacks, the run's training settings and where/how to run. Never test data."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec
    model_config: ModelConfig
    train: TrainConfig
    device: torch.device
    progress: bool = False
    log: Callable[[str], None] = lambda message: None


def attack_targets(labels: torch.Tensor, label_mode: str, target_class: int, num_classes: int) -> torch.Tensor:
    """The label an attack wants for each true label: all2one -> ``target_class``; all2all -> (y + 1) % K."""
    if label_mode == "all2one":
        if not 0 <= target_class < num_classes:
            raise ValueError(f"target_class {target_class} is out of range for {num_classes} classes")
        return torch.full_like(labels, target_class)
    if label_mode == "all2all":
        return (labels + 1) % num_classes
    raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}")


def select_poison_indices(labels: torch.Tensor, count: int, seed: int,
                          candidates: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` distinct indices drawn uniformly from ``candidates`` (default: all of ``labels``) with a
    generator seeded by ``seed``; returned sorted (int64)."""
    pool = torch.arange(labels.shape[0]) if candidates is None else candidates.long()
    if count < 0 or count > pool.numel():
        raise ValueError(f"cannot draw {count} poison samples from {pool.numel()} candidates")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = pool[torch.randperm(pool.numel(), generator=gen)[:count]]
    return torch.sort(chosen).values


class Attack(ABC):
    """Base class of every attack. Subclasses set ``name``, ``config_cls`` and ``clean_label`` and implement
    :meth:`apply_trigger` (the test-time trigger, deterministic and pure)."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AttackConfig]] = AttackConfig
    clean_label: ClassVar[bool] = False
    description: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False  # the trigger changes while the classifier trains (InputAware)

    def __init__(self, config: AttackConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        if config is None:
            config = {}
        if isinstance(config, Mapping):
            cfg = self.config_cls.from_dict({**dict(config), **overrides})
        elif isinstance(config, self.config_cls):
            cfg = self.config_cls.from_dict({**config.to_dict(), **overrides}) if overrides else config
        else:
            raise TypeError(f"{type(self).__name__} expects a {self.config_cls.__name__} or a mapping, "
                            f"got {type(config).__name__}")
        self.config = cfg
        self.info: dict[str, Any] = {}  # facts from prepare()/training, for meta.json (JSON values only)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # -- the trigger -------------------------------------------------------------------------------------
    @abstractmethod
    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of uint8 images (N, C, H, W); deterministic for the config."""

    def poison_train_images(self, images: torch.Tensor) -> torch.Tensor:
        """The trigger used on training samples (the test-time trigger unless an attack differs)."""
        return self.apply_trigger(images)

    # -- learned triggers (no-ops for fixed triggers) -----------------------------------------------------
    def prepare(self, context: AttackContext) -> None:
        """Compute whatever the trigger needs from the clean training set (before poisoning)."""

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """The classifier weights training starts from (None: a fresh, seeded initialisation)."""
        return None

    def train_model(self, model: nn.Module, poisoned: PoisonedTrainSet, context: AttackContext,
                    eval_fn: Callable[[nn.Module], dict] | None = None) -> TrainHistory:
        """Train ``model`` in place on the poisoned training set (the shared loop unless an attack differs)."""
        return train_classifier(model, poisoned.images, poisoned.labels, context.spec, context.train,
                                eval_fn=eval_fn, device=context.device, progress=context.progress)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild the trigger (without the ``attack.`` prefix); empty for fixed triggers."""
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore the trigger from :meth:`state_tensors`' output."""
        if tensors:
            raise ValueError(f"{self.name} has a fixed trigger and takes no state tensors, got {', '.join(tensors)}")

    # -- labels and indices ------------------------------------------------------------------------------
    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The attack's target label for each true label."""
        return attack_targets(labels, self.config.label_mode, self.config.target_class, num_classes)

    def poison_count(self, num_samples: int) -> int:
        """``round(poison_ratio * N)`` (BackdoorBench's rule)."""
        return int(round(self.config.poison_ratio * num_samples))

    def candidate_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """The training indices poison may be drawn from."""
        cfg = self.config
        if self.clean_label:
            return torch.nonzero(labels == cfg.target_class).flatten()
        if cfg.label_mode == "all2one" and cfg.exclude_target:
            return torch.nonzero(labels != cfg.target_class).flatten()
        return torch.arange(labels.shape[0])

    def select_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """The sorted training indices to poison; a clear error if the ratio asks for more than exist."""
        count = self.poison_count(labels.shape[0])
        if count == 0:
            raise ValueError(f"poison_ratio {self.config.poison_ratio} of {labels.shape[0]} samples rounds to 0 "
                             "poisoned samples; raise poison_ratio")
        cands = self.candidate_indices(labels)
        if count > cands.numel():
            kind = f"training samples of class {self.config.target_class}" if self.clean_label else "candidates"
            raise ValueError(
                f"{self.name}: poison_ratio {self.config.poison_ratio} asks for {count} poisoned samples but only "
                f"{cands.numel()} {kind} exist (at most poison_ratio "
                f"{cands.numel() / labels.shape[0]:.4g})"
            )
        return select_poison_indices(labels, count, self.config.seed, cands)

    def _check(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        check_images(images)
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must be in 0..{num_classes - 1}")
        if self.config.label_mode == "all2one" and self.config.target_class >= num_classes:
            raise ValueError(f"target_class {self.config.target_class} is out of range for {num_classes} classes")

    # -- the poisoned sets -------------------------------------------------------------------------------
    def poison_train(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> PoisonedTrainSet:
        """The poisoned training set: selected samples get the trigger and (dirty-label) their target label."""
        self._check(images, labels, num_classes)
        idx = self.select_indices(labels)
        out_images = images.clone()
        out_labels = labels.clone()
        if idx.numel():
            out_images[idx] = self.poison_train_images(images[idx])
            if not self.clean_label:
                out_labels[idx] = self.targets(labels[idx], num_classes)
        return PoisonedTrainSet(out_images, out_labels, labels.clone(), idx)

    def poison_test(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> PoisonedTestSet:
        """Every test sample whose true label differs from its target, trigger applied, true labels and
        positions in the clean test set kept."""
        self._check(images, labels, num_classes)
        targets = self.targets(labels, num_classes)
        keep = torch.nonzero(targets != labels).flatten()
        return PoisonedTestSet(
            images=self.apply_trigger(images[keep]) if keep.numel() else images[keep].clone(),
            targets=targets[keep].clone(),
            original_labels=labels[keep].clone(),
            original_indices=keep.long(),
        )

    def params(self) -> dict[str, Any]:
        """The attack's name and every parameter (for meta.json and run records)."""
        return {"name": self.name, **self.config.to_dict()}
