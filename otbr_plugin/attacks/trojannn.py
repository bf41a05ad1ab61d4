"""TrojanNN (Liu et al., NDSS 2018), dirty label.

The trigger is a pattern inside a fixed mask region, optimised on a clean model so that it drives a few
selected internal neurons to a high value; the model is then retrained with poisoned samples.

* Neurons: the inputs of the model's last linear layer (the penultimate features, BackdoorBench's
  ``selected_layer_name: linear``), ranked by the sum of their absolute outgoing weights (the paper picks the
  neurons most strongly connected to the next layer); the top ``num_neurons`` (BackdoorBench: 2).
* Pattern: pixels under the mask, starting from seeded uniform noise on a blank image, optimised with Adam to
  minimise the squared distance of the selected activations to ``neuron_target`` (BackdoorBench: 100, with
  ``mask_update_iters`` 1000), clamped to [0, 1] after every step.
* Mask: a square of side ``mask_size`` (null: ``round(H / 4)``, 7 at 28 px, 8 at 32 px: about 6% of the image)
  in a corner; BackdoorBench uses an apple-shaped mask image, the paper squares and logos.
* Retraining: ``retrain_from: clean`` continues training the clean model on the poisoned set (the paper's
  retraining); ``scratch`` trains a fresh model on it (BackdoorBench's pipeline).

The clean model is trained here for ``clean_epochs`` epochs or read from ``clean_model`` (see :mod:`.clean`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from ..data.transforms import Normalizer
from .base import Attack, AttackConfig, AttackContext
from .clean import clean_model, last_linear
from .registry import register_attack
from .triggers import CORNERS, check_images, patch_mask, stamp

__all__ = ["TrojanNNConfig", "TrojanNN", "select_neurons", "optimize_trojan_pattern", "default_mask_size"]


def default_mask_size(image_size: int) -> int:
    """``round(image_size / 4)``, at least 1."""
    return max(1, int(round(image_size / 4)))


@dataclass
class TrojanNNConfig(AttackConfig):
    """mask_size / corner / margin: the square mask region; num_neurons, neuron_target, trigger_iters,
    trigger_lr: the pattern search; retrain_from: ``clean`` (paper) or ``scratch`` (BackdoorBench);
    clean_epochs / clean_model: the clean model."""

    mask_size: int | None = None
    corner: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = "bottom_right"
    margin: int = 0
    num_neurons: int = 2
    neuron_target: float = 100.0
    trigger_iters: int = 1000
    trigger_lr: float = 0.1
    retrain_from: Literal["clean", "scratch"] = "clean"
    clean_epochs: int = 2
    clean_model: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.mask_size is not None and (isinstance(self.mask_size, bool) or not isinstance(self.mask_size, int)
                                           or self.mask_size < 1):
            raise ValueError(f"mask_size must be an integer >= 1 or null, got {self.mask_size!r}")
        if self.corner not in CORNERS:
            raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {self.corner!r}")
        for name, low in (("margin", 0), ("num_neurons", 1), ("trigger_iters", 1), ("clean_epochs", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("neuron_target", "trigger_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if self.retrain_from not in ("clean", "scratch"):
            raise ValueError(f"retrain_from must be 'clean' or 'scratch', got {self.retrain_from!r}")
        if self.clean_model is not None and (not isinstance(self.clean_model, str) or not self.clean_model):
            raise ValueError(f"clean_model must be a path to a safetensors file or null, got {self.clean_model!r}")


def select_neurons(head: nn.Linear, count: int) -> torch.Tensor:
    """Indices (int64, best first) of the ``count`` input neurons of ``head`` with the largest sum of absolute
    outgoing weights; ties go to the lower index."""
    if count > head.in_features:
        raise ValueError(f"num_neurons {count} exceeds the {head.in_features} neurons feeding the last layer")
    score = head.weight.detach().abs().sum(0).cpu()
    return torch.sort(score, descending=True, stable=True).indices[:count].clone()


def optimize_trojan_pattern(model: nn.Module, mask: torch.Tensor, neurons: torch.Tensor, normalizer: Normalizer,
                            *, channels: int, target: float, iters: int, lr: float, seed: int,
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """The pattern (C, H, W) in [0, 1], zero outside the boolean (H, W) ``mask``, that drives the ``neurons``
    (inputs of the model's last linear layer) of ``model`` (eval mode) towards ``target`` on a blank image."""
    if mask.dtype != torch.bool or mask.dim() != 2 or not mask.any():
        raise ValueError("mask must be a non-empty boolean (H, W) tensor")
    dev = torch.device(device)
    model = model.to(dev).eval()
    head = last_linear(model)
    feats: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda mod, args: feats.append(args[0]))
    h, w = mask.shape
    gen = torch.Generator().manual_seed(int(seed))
    m = mask.to(dev, torch.float32)
    pattern = (torch.rand(channels, h, w, generator=gen).to(dev) * m).requires_grad_(True)
    opt = torch.optim.Adam([pattern], lr=lr)
    idx = neurons.to(dev)
    for p in model.parameters():
        p.requires_grad_(False)

    def activations() -> torch.Tensor:
        feats.clear()
        model(normalizer((pattern * m).unsqueeze(0)))
        return feats[-1].flatten(1)[0, idx]

    try:
        with torch.no_grad():
            start = activations().cpu()
        for _ in range(iters):
            loss = (activations() - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                pattern.clamp_(0, 1).mul_(m)
        with torch.no_grad():
            final = activations().cpu()
    finally:
        hook.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    info = {"neurons": neurons.tolist(), "activation_start": start.tolist(), "activation_final": final.tolist()}
    return pattern.detach().cpu(), info


@register_attack
class TrojanNN(Attack):
    name = "trojannn"
    config_cls = TrojanNNConfig
    description = "mask pattern optimised to excite selected neurons, then retraining (Liu et al. 2018)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pattern: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.neurons: torch.Tensor | None = None
        self._clean_state: dict[str, torch.Tensor] | None = None

    def mask_for(self, height: int, width: int) -> torch.Tensor:
        """The boolean (H, W) mask region of the config."""
        cfg: TrojanNNConfig = self.config  # type: ignore[assignment]
        size = cfg.mask_size if cfg.mask_size is not None else default_mask_size(min(height, width))
        return patch_mask(height, width, size, cfg.corner, cfg.margin)

    def prepare(self, context: AttackContext) -> None:
        """Train (or read) the clean model, select its neurons and optimise the pattern in the mask."""
        cfg: TrojanNNConfig = self.config  # type: ignore[assignment]
        model, clean_info = clean_model(context, cfg.clean_epochs, cfg.clean_model)
        c, h, w = context.images.shape[1:]
        mask = self.mask_for(h, w)
        neurons = select_neurons(last_linear(model), cfg.num_neurons)
        context.log(f"trojannn: optimising a {int(mask.sum())}-pixel pattern for neurons {neurons.tolist()}")
        pattern, info = optimize_trojan_pattern(
            model, mask, neurons, Normalizer.for_dataset(context.spec), channels=c, target=float(cfg.neuron_target),
            iters=cfg.trigger_iters, lr=float(cfg.trigger_lr), seed=cfg.seed + 1, device=context.device)
        self.pattern, self.mask, self.neurons = pattern, mask, neurons
        self._clean_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.info = {"clean_model": clean_info, "trigger": info}
        context.log(f"trojannn: activations {info['activation_start']} -> {info['activation_final']}")

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        if self.config.retrain_from == "scratch":  # type: ignore[attr-defined]
            return None
        if self._clean_state is None:
            raise ValueError("trojannn: retrain_from 'clean' needs prepare() to have built the clean model")
        return self._clean_state

    def _require(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pattern is None or self.mask is None:
            raise ValueError("trojannn: the trigger is not computed yet; run prepare() (it needs a clean model) or "
                             "load_state() with a bundle's attack tensors")
        return self.pattern, self.mask

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        pattern, mask = self._require()
        return stamp(images, pattern, mask)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        pattern, mask = self._require()
        out = {"pattern": pattern.clone(), "mask": mask.clone()}
        if self.neurons is not None:
            out["neurons"] = self.neurons.clone()
        return out

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(tensors) - {"pattern", "mask", "neurons"})
        if "pattern" not in tensors or "mask" not in tensors or unknown:
            raise ValueError("trojannn: state must hold 'pattern' and 'mask' (and optionally 'neurons'), got "
                             f"{', '.join(sorted(tensors)) or 'nothing'}")
        pattern, mask = tensors["pattern"], tensors["mask"]
        if pattern.dim() != 3 or not pattern.is_floating_point() or mask.dtype != torch.bool \
                or tuple(mask.shape) != tuple(pattern.shape[1:]):
            raise ValueError(f"trojannn: pattern must be float (C, H, W) and mask boolean (H, W); got "
                             f"{pattern.dtype} {tuple(pattern.shape)} and {mask.dtype} {tuple(mask.shape)}")
        if float(pattern.min()) < 0 or float(pattern.max()) > 1:
            raise ValueError("trojannn: pattern values must lie in [0, 1]")
        self.pattern, self.mask = pattern.float().clone(), mask.clone()
        self.neurons = tensors["neurons"].clone() if "neurons" in tensors else None
