"""Data-free repair after OTBR (beyond the paper): surrogate inputs from the model itself, then distillation.

Pruning enough neurons to remove a backdoor also costs clean accuracy (the paper's Fig. 5 trade-off). Without
data, the clean behaviour can still be read from the backdoored model: its BatchNorm layers store the mean and
variance of every feature channel over the training set. :func:`bn_inversion` (DeepInversion, Yin et al. 2020)
optimizes noise images until the model's per-channel batch statistics match those running statistics, and
:func:`distill` fine-tunes the defended model to reproduce the original model's soft predictions on them. The
synthesized images carry no trigger unless the inversion rebuilds one, so the distillation teaches the clean
function back; the neurons OTBR pruned stay at zero during the distillation (``frozen``) so that the units
found to carry the backdoor cannot be re-grown.

Pure functions: models in, new tensors/models out; inputs are never modified. No dataset is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Normalizer

__all__ = ["bn_inversion", "distill", "recalibrate_bn", "agreement", "DistillResult"]

Progress = Callable[..., object] | None


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random jitter (roll by up to ``max_shift`` pixels) and horizontal flip, batched; keeps values."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x


def bn_inversion(
    model: nn.Module,
    *,
    num_images: int,
    input_shape: Sequence[int],
    normalizer: Normalizer,
    num_classes: int,
    steps: int = 200,
    batch_size: int = 128,
    lr: float = 0.1,
    bn_weight: float = 1.0,
    tv_weight: float = 1e-4,
    ce_weight: float = 0.0,
    guide: nn.Module | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> torch.Tensor:
    """Synthesize ``num_images`` pixel-space images in [0, 1] whose batch statistics match ``model``'s BN
    running statistics (sum over BN layers of ``||mu - running_mean|| + ||var - running_var||``, times
    ``bn_weight``), plus a total-variation prior. ``ce_weight > 0`` adds a cross-entropy towards uniformly drawn
    labels on ``guide`` (default ``model``); with the defended model as the guide the labels steer away from
    the pruned backdoor path. The images are parameterized as ``sigmoid(z)`` and optimized with Adam.
    """
    if num_images < 1 or steps < 1 or batch_size < 1:
        raise ValueError("bn_inversion needs num_images, steps and batch_size >= 1")
    generator = generator or torch.Generator().manual_seed(0)
    device = torch.device(device)
    net = copy.deepcopy(model).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    bns = _bn_layers(net)
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers with running statistics to invert")
    guide_net = None
    if ce_weight > 0 and guide is not None:
        guide_net = copy.deepcopy(guide).to(device).eval()
        for p in guide_net.parameters():
            p.requires_grad_(False)
    stats: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        stats.append(torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    mean = torch.tensor(normalizer.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(normalizer.std, device=device).view(1, -1, 1, 1)
    out = []
    try:
        batches = [min(batch_size, num_images - i) for i in range(0, num_images, batch_size)]
        total = len(batches) * steps
        bar = progress(range(total), "OTBR repair: BN inversion", total) if progress else None
        it = iter(bar) if bar is not None else None
        for b in batches:
            z = (torch.randn((b, *input_shape), generator=generator) * 0.5).to(device).requires_grad_(True)
            labels = torch.randint(0, num_classes, (b,), generator=generator).to(device)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                if it is not None:
                    next(it, None)
                stats.clear()
                x = torch.sigmoid(z)
                xa = _augment(x, generator)
                xn = (xa - mean) / std
                logits = net(xn)
                loss = bn_weight * torch.stack(stats).sum()
                if tv_weight > 0:
                    tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
                    loss = loss + tv_weight * tv * x[0].numel()
                if ce_weight > 0:
                    guided = logits if guide_net is None else guide_net(xn)
                    loss = loss + ce_weight * F.cross_entropy(guided, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            out.append(torch.sigmoid(z).detach().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


@dataclass
class DistillResult:
    """The repaired model and the distillation loss per step."""

    model: nn.Module
    losses: list[float]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    normalizer: Normalizer,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    temperature: float = 4.0,
    frozen: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> DistillResult:
    """Fine-tune a copy of ``student`` to match ``teacher``'s softened predictions (KL at ``temperature``) on
    pixel-space ``images`` (augmented by jitter and flips), with SGD. BatchNorm stays in inference mode (the
    running statistics are the training set's; surrogate images must not overwrite them). ``frozen[layer]``:
    boolean rows of ``layer.weight`` held at zero after every step (OTBR's pruned neurons).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("distill needs steps and batch_size >= 1")
    generator = generator or torch.Generator().manual_seed(0)
    device = torch.device(device)
    s = copy.deepcopy(student).to(device).eval()
    t = copy.deepcopy(teacher).to(device).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    for p in s.parameters():
        p.requires_grad_(True)
    modules = dict(s.named_modules())
    frozen = {k: v.to(device) for k, v in (frozen or {}).items() if bool(v.any())}
    for name in frozen:
        if name not in modules:
            raise KeyError(f"frozen layer {name!r} is not in the model")
    opt = torch.optim.SGD(s.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mean = torch.tensor(normalizer.mean).view(1, -1, 1, 1).to(device)
    std = torch.tensor(normalizer.std).view(1, -1, 1, 1).to(device)
    n = images.shape[0]
    losses = []
    it = range(steps) if progress is None else progress(range(steps), "OTBR repair: distillation", steps)

    def zero_frozen() -> None:
        with torch.no_grad():
            for name, mask in frozen.items():
                modules[name].weight[mask] = 0.0

    zero_frozen()
    for _ in it:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        x = _augment(images[idx].to(device), generator)
        xn = (x - mean) / std
        with torch.no_grad():
            soft = F.softmax(t(xn) / temperature, dim=1)
        logp = F.log_softmax(s(xn) / temperature, dim=1)
        loss = F.kl_div(logp, soft, reduction="batchmean") * temperature**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        zero_frozen()
        losses.append(float(loss.detach()))
    for p in s.parameters():
        p.requires_grad_(False)
    return DistillResult(s.eval(), losses)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> nn.Module:
    """A copy of ``model`` whose BN running statistics are re-estimated (cumulative average over the batches of
    ``batch_size``) on ``images`` (pixel space); its weights and its BNs' momentum are those of ``model``."""
    m = copy.deepcopy(model).to(device)
    bns = _bn_layers(m)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    for i in range(0, images.shape[0], batch_size):
        m(normalizer(images[i:i + batch_size].to(device)))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return m.eval()


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, images: torch.Tensor, normalizer: Normalizer, batch_size: int = 512,
              device: torch.device | str = "cpu") -> float:
    """Share of ``images`` (pixel space) on which models ``a`` and ``b`` (both on ``device``, in inference
    mode) predict the same class. The models are neither moved nor switched to another mode."""
    same = 0
    for i in range(0, images.shape[0], batch_size):
        x = normalizer(images[i:i + batch_size].to(device))
        same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
    return same / max(1, images.shape[0])
