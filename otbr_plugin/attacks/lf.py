"""LF, the low-frequency attack (Zeng, Park, Mao & Jia, ICCV 2021), dirty label.

The trigger is a *smooth* universal adversarial perturbation: a single perturbation ``delta`` (C, H, W),
found against a clean model so that it changes the model's predictions on many images, and kept free of
high-frequency content: its 2-d DFT is zero outside ``|f_y|, |f_x| <= max_frequency`` cycles per image. The
poisoned image is ``clip(x + delta)``; poisoned training samples (``round(poison_ratio * N)``, drawn like
BadNets) get the target label, as in BackdoorBench's ``lf`` attack (pratio 0.1, target 0, all2one).

The search (:func:`universal_lowpass_perturbation`): projected gradient ascent of the clean model's
cross-entropy (``targeted``: descent towards the target class) on a seeded sample of clean training images;
each step moves ``delta`` by ``uap_step`` (L-inf) along the low-pass filtered gradient, then scales it into the
L-inf ball of radius ``epsilon``, so it stays band-limited exactly. The paper builds the perturbation with DeepFool-based UAP steps under the same low-pass
constraint; BackdoorBench ships precomputed perturbations per dataset and model (none for Fashion-MNIST). The
clean model is trained here for ``clean_epochs`` epochs or read from ``clean_model`` (see :mod:`.clean`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Normalizer, to_float
from .base import Attack, AttackConfig, AttackContext
from .clean import clean_model
from .registry import register_attack
from .triggers import apply_additive, check_images, frequency_window, lowpass, scale_into_linf

__all__ = ["LFConfig", "LF", "universal_lowpass_perturbation", "default_max_frequency"]


def default_max_frequency(image_size: int) -> int:
    """``image_size // 8`` cycles per image (3 at 28 px, 4 at 32 px), at least 1."""
    return max(1, int(image_size) // 8)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class LFConfig(AttackConfig):
    """epsilon: L-inf radius of the perturbation on the [0, 1] pixel scale; max_frequency: highest kept spatial
    frequency per axis in cycles per image (null: ``image_size // 8``); uap_*: the search (seeded sample of
    training images, passes, L-inf step size, batch); targeted: search towards the target class instead of away
    from the true labels; clean_epochs / clean_model: the clean model the search runs against."""

    epsilon: float = 0.1
    max_frequency: int | None = None
    uap_samples: int = 2000
    uap_passes: int = 5
    uap_step: float = 0.01
    uap_batch_size: int = 128
    targeted: bool = False
    clean_epochs: int = 2
    clean_model: str | None = None

    def validate(self) -> None:
        super().validate()
        if not _number(self.epsilon) or not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be a number in (0, 1] (pixel scale [0, 1]), got {self.epsilon!r}")
        if self.max_frequency is not None and (isinstance(self.max_frequency, bool)
                                               or not isinstance(self.max_frequency, int) or self.max_frequency < 0):
            raise ValueError(f"max_frequency must be a non-negative integer or null, got {self.max_frequency!r}")
        for name in ("uap_samples", "uap_passes", "uap_batch_size", "clean_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not _number(self.uap_step) or not self.uap_step > 0:
            raise ValueError(f"uap_step must be a number > 0, got {self.uap_step!r}")
        if self.clean_model is not None and (not isinstance(self.clean_model, str) or not self.clean_model):
            raise ValueError(f"clean_model must be a path to a safetensors file or null, got {self.clean_model!r}")


def universal_lowpass_perturbation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                   normalizer: Normalizer, *, epsilon: float, max_frequency: int, passes: int,
                                   step: float, batch_size: int, seed: int, target: int | None = None,
                                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, float]]:
    """A universal perturbation (C, H, W), float32 on the [0, 1] scale, band-limited to ``max_frequency`` and
    within ``epsilon`` in L-inf, that raises ``model``'s loss on ``images`` (uint8) / ``labels`` (or, with
    ``target``, lowers the loss of that class). Returns it with its fooling rate on these images (share whose
    prediction changes; with ``target``: share predicted as the target)."""
    check_images(images)
    if labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise ValueError(f"labels must have shape ({images.shape[0]},) and the set must not be empty")
    dev = torch.device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    delta = torch.zeros(images.shape[1:], device=dev)
    n = images.shape[0]
    try:
        for _ in range(passes):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                x = to_float(images[idx].to(dev))
                d = delta.clone().requires_grad_(True)
                logits = model(normalizer((x + d).clamp(0, 1)))
                if target is None:
                    loss = F.cross_entropy(logits, labels[idx].to(dev))
                else:
                    loss = -F.cross_entropy(logits, torch.full((len(idx),), int(target), device=dev))
                (grad,) = torch.autograd.grad(loss, d)
                direction = lowpass(grad, max_frequency)  # the ascent direction within the band
                peak = float(direction.abs().max())
                if peak > 0:
                    delta = scale_into_linf(delta + step * direction / peak, epsilon)
        with torch.no_grad():
            hits = 0
            for start in range(0, n, batch_size):
                x = to_float(images[start:start + batch_size].to(dev))
                clean = model(normalizer(x)).argmax(1)
                pert = model(normalizer((x + delta).clamp(0, 1))).argmax(1)
                hits += int((pert == target).sum()) if target is not None else int((pert != clean).sum())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return delta.detach().cpu(), {"fooling_rate": hits / n, "linf": float(delta.abs().max())}


@register_attack
class LF(Attack):
    name = "lf"
    config_cls = LFConfig
    description = "low-frequency universal adversarial perturbation as trigger (Zeng et al. 2021)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.perturbation: torch.Tensor | None = None

    def max_frequency_for(self, image_size: int) -> int:
        cfg: LFConfig = self.config  # type: ignore[assignment]
        return cfg.max_frequency if cfg.max_frequency is not None else default_max_frequency(image_size)

    def prepare(self, context: AttackContext) -> None:
        """Train (or read) the clean model and search the smooth universal perturbation against it."""
        cfg: LFConfig = self.config  # type: ignore[assignment]
        model, clean_info = clean_model(context, cfg.clean_epochs, cfg.clean_model)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        n = min(cfg.uap_samples, context.images.shape[0])
        idx = torch.sort(torch.randperm(context.images.shape[0], generator=gen)[:n]).values
        r = self.max_frequency_for(min(context.images.shape[2], context.images.shape[3]))
        context.log(f"lf: searching a universal perturbation (epsilon {cfg.epsilon}, max frequency {r}) on {n} images")
        delta, info = universal_lowpass_perturbation(
            model, context.images[idx], context.labels[idx], Normalizer.for_dataset(context.spec),
            epsilon=float(cfg.epsilon), max_frequency=r, passes=cfg.uap_passes, step=float(cfg.uap_step),
            batch_size=cfg.uap_batch_size, seed=cfg.seed + 2,
            target=cfg.target_class if cfg.targeted else None, device=context.device)
        self.perturbation = delta
        self.info = {"clean_model": clean_info, "uap": {**info, "max_frequency": r, "samples": n}}
        context.log(f"lf: fooling rate {info['fooling_rate'] * 100:.1f}% on the search images")

    def _require(self) -> torch.Tensor:
        if self.perturbation is None:
            raise ValueError("lf: the trigger is not computed yet; run prepare() (it needs a clean model) or "
                             "load_state() with a bundle's attack tensors")
        return self.perturbation

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return apply_additive(images, self._require())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"perturbation": self._require().clone()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        delta = tensors.get("perturbation")
        extra = sorted(set(tensors) - {"perturbation"})
        if delta is None or extra:
            raise ValueError(f"lf: state must hold exactly 'perturbation', got {', '.join(sorted(tensors)) or 'nothing'}")
        if delta.dim() != 3 or not delta.is_floating_point() or not torch.isfinite(delta).all():
            raise ValueError(f"lf: perturbation must be a finite float (C, H, W) tensor, got {delta.dtype} "
                             f"{tuple(delta.shape)}")
        cfg: LFConfig = self.config  # type: ignore[assignment]
        if float(delta.abs().max()) > cfg.epsilon * (1 + 1e-4):
            raise ValueError(f"lf: perturbation exceeds epsilon {cfg.epsilon} (max |delta| {float(delta.abs().max()):.4g})")
        self.perturbation = delta.float().clone()

    def band_energy_outside(self) -> float:
        """Share of the perturbation's spectral energy outside the low-frequency window (0 up to rounding)."""
        delta = self._require()
        h, w = delta.shape[-2:]
        power = torch.fft.fft2(delta.double()).abs().pow(2)
        window = frequency_window(h, w, self.max_frequency_for(min(h, w)))
        return float(power[..., ~window].sum() / power.sum().clamp_min(1e-30))
