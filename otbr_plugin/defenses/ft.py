"""FT: plain fine-tuning of the backdoored model on the clean defense subset -- the floor every post-training
defense paper reports (e.g. Liu et al., "Fine-Pruning", RAID 2018, Sec. 4; Li et al., "Neural Attention
Distillation", ICLR 2021, Table 1; BackdoorBench's ``ft.py``). Needs the clean defense subset.

Every weight of a copy of the model is trained with SGD (momentum, weight decay, cosine learning-rate schedule
stepped per iteration, training-style augmentation) on the clean defense subset, with
:func:`otbr_plugin.train.train_classifier`: nothing is pruned, added or re-initialised, and the architecture is the
input's. Defaults are BackdoorBench's ``config/defense/ft`` (100 epochs, batch 256, lr 0.01, momentum 0.9, weight
decay 5e-4, cosine); the CPU benchmark configs shorten the epochs (configs/defense/ft/fashion_mnist.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..train import TrainConfig, train_classifier
from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .common import clean_accuracy, context_spec
from .registry import register_defense

__all__ = ["FTConfig", "FT", "check_training_fields"]


def check_training_fields(cfg: object, names: dict[str, str]) -> None:
    """Validate SGD fields of ``cfg`` by kind (``names``: field -> "epochs" | "batch" | "lr" | "momentum" |
    "decay"); a ValueError naming the field and the expected range."""
    for name, kind in names.items():
        v = getattr(cfg, name)
        if kind in ("epochs", "batch"):
            low = 0 if kind == "epochs" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number, got {v!r}")
        elif kind == "lr" and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
        elif kind == "momentum" and not 0 <= v < 1:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        elif kind == "decay" and not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v!r}")


@dataclass
class FTConfig(DefenseConfig):
    """Fine-tuning settings (BackdoorBench's ft defaults): ``epochs`` over the clean subset (0: the model unchanged),
    ``batch_size``, SGD ``lr`` / ``momentum`` / ``weight_decay`` with a cosine schedule over all steps, ``augment``
    (random crop, and flip where the dataset allows it, as in training); ``batch_size_eval`` for the clean-subset
    accuracy reported in the diagnostics."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    batch_size_eval: int = 512

    def validate(self) -> None:
        check_training_fields(self, {"epochs": "epochs", "batch_size": "batch", "batch_size_eval": "batch",
                                     "lr": "lr", "momentum": "momentum", "weight_decay": "decay"})
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")


@register_defense
class FT(Defense):
    name = "ft"
    config_class = FTConfig
    needs_clean_data = True
    description = "Fine-tuning on the clean defense subset (the baseline floor; BackdoorBench's ft)"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        self.require_oracle(context)
        cfg = self.config
        timer = StageTimer()
        defended = self.copy_model(model, context.device)
        history: list[dict] = []
        with timer("finetune"):
            if cfg.epochs > 0:
                tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, seed=context.seed, device=str(context.device),
                                 augment=cfg.augment, progress=context.progress)
                history = train_classifier(defended, clean.images, clean.labels, context_spec(context), tc,
                                           device=context.device, progress=context.progress).epochs
        with timer("evaluate_subset"):
            acc = clean_accuracy(defended, clean, context, cfg.batch_size_eval)
        diagnostics = {"finetune_samples": len(clean), "epochs": cfg.epochs, "subset_acc_after": acc,
                       "finetune": history}
        return DefenseOutcome(model=defended.eval(), diagnostics=diagnostics, stage_seconds=timer.seconds,
                              data_used=context.data_used(), units_removed=0)
