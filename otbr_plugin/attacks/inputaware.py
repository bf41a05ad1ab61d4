"""InputAware, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), dirty label.

Two small encoder-decoder networks make an input-specific trigger: a pattern generator ``g`` and a mask
generator ``m``; the poisoned image is ``x + (g(x) - x) * m(x)``. Following the paper and BackdoorBench's
defaults (lambda_div 1, lambda_norm 100, mask_density 0.032, Adam lr 0.01 with betas (0.5, 0.9) for both
generators, cross samples as many as poisoned samples):

1. :meth:`InputAware.prepare` trains ``m`` alone on clean images for ``mask_epochs`` epochs (BackdoorBench's
   ``clean_train_epochs``, 25; its lr decays x0.1 at ``mask_lr_milestones``) with
   ``lambda_norm * mean(relu(m(x1) - density)) + lambda_div * diversity(x1, x2, m(x1), m(x2))``, then freezes it.
2. :meth:`InputAware.train_model` trains the classifier and ``g`` together: poisoned samples get their own
   trigger and the target label; *cross* samples get the trigger of another image and keep their label (so a
   trigger only works on the image it was made for); the loss is the cross-entropy plus
   ``lambda_div * diversity(x, x', g(x), g(x'))`` over pairs of triggered images.

Documented choices: as for WaNet here, the poisoned and cross samples are fixed once per seed
(``round(poison_ratio * N)`` poisoned, drawn like BadNets; ``round(cross_ratio * that)`` cross samples from the
rest) instead of the first share of every batch; a cross sample's partner image is redrawn every epoch. The
classifier uses the run's SGD with the cosine schedule. BackdoorBench decays the classifier's and ``g``'s lr
together (the same MultiStep milestones, at 100+ epochs); compressed to a short run, ``g``'s Adam lr here follows the
classifier's cosine schedule (``generator_schedule: classifier``). ``constant`` keeps it fixed: on the 7-epoch
Fashion-MNIST run the trigger then kept moving after the classifier's lr had reached 0 and the eval-mode trigger no
longer matched what the classifier had learned (poisoned training samples fit 0.86 -> 0.63, ASR 84 -> 57%). Triggered images are computed on
float images in [0, 1]; the bundle's poisoned test images are rounded to uint8. Augmentation is the project's
(random crop, plus flip where the dataset allows it), applied after poisoning as in the paper (BackdoorBench's
post-transform adds a 10-degree rotation). The generators' weights are
stored in the bundle (``extra.safetensors``, ``attack.generator.*`` / ``attack.mask_generator.*``).

Generators (sizes from BackdoorBench: 16 channels / 2 levels for 1-channel data, 32 / 3 otherwise): each level
halves the resolution with two 3x3 conv-BN-ReLU and a 2x2 max-pool; a middle conv block; each level back up is a
bilinear 2x upsample and two conv blocks; a final 3x3 convolution gives the raw output, squashed by
``(1 + tanh) / 2`` (pattern) or by that and :func:`~otbr_plugin.attacks.triggers.soft_threshold` (mask).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import Normalizer, random_crop, random_hflip, to_float
from ..runtime import autocast_context, seed_everything
from ..train import TrainHistory
from .base import Attack, AttackConfig, AttackContext, PoisonedTrainSet, select_poison_indices
from .registry import register_attack
from .triggers import check_images, diversity_loss, mask_norm_loss, mix, soft_threshold, to_uint8

__all__ = ["InputAwareConfig", "InputAware", "TriggerGenerator", "squash"]

EPSILON = 1e-7
GENERATOR_SCHEDULES = ("classifier", "constant")


def squash(raw: torch.Tensor) -> torch.Tensor:
    """``(1 + tanh(raw)) / 2``: a generator's raw output mapped into [0, 1]."""
    return 0.5 * (1.0 + torch.tanh(raw))


def _check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop a training whose loss is no longer a number (its model would silently predict one class)."""
    if not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(f"InputAware: the loss is {float(loss.detach())} at {where}; training diverged "
                                 "(lower lr_G / lr_M or lambda_norm, or check the input range)")


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05), nn.ReLU(inplace=True)]


class TriggerGenerator(nn.Module):
    """Encoder-decoder ``(N, in_channels, H, W) -> (N, out_channels, H, W)`` raw outputs; H and W must be
    divisible by ``2 ** depth``."""

    def __init__(self, in_channels: int, out_channels: int, channels: int = 16, depth: int = 2) -> None:
        super().__init__()
        if depth < 1 or channels < 1:
            raise ValueError(f"generator depth and channels must be >= 1, got {depth} and {channels}")
        self.depth = depth
        layers: list[nn.Module] = []
        c_in, c = in_channels, channels
        for level in range(depth):
            layers += _conv_block(c_in, c) + _conv_block(c, c) + [nn.MaxPool2d(2)]
            c_in = c
            if level < depth - 1:
                c *= 2
        layers += _conv_block(c, c)
        for level in range(depth):
            c_out = max(c // 2, channels)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            layers += _conv_block(c, c) + _conv_block(c, c_out)
            c = c_out
        layers += [nn.Conv2d(c, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = 2 ** self.depth
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"the generator needs H and W divisible by {step} (depth {self.depth}), got "
                             f"{tuple(x.shape[-2:])}; lower generator_depth")
        return self.net(x)


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class InputAwareConfig(AttackConfig):
    """cross_ratio: cross samples per poisoned sample; lambda_div / lambda_norm / mask_density: the losses;
    lr_G / lr_M: Adam learning rates of the pattern / mask generator; generator_schedule: ``classifier`` (``lr_G``
    follows the classifier's cosine schedule, as BackdoorBench decays both together) or ``constant``; mask_epochs and mask_lr_milestones: the
    mask generator's pre-training; generator_channels / generator_depth: generator size (null: 16 / 2 for
    1-channel images, 32 / 3 for colour, as BackdoorBench sizes them for MNIST and the others)."""

    cross_ratio: float = 1.0
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    lr_G: float = 0.01
    lr_M: float = 0.01
    generator_schedule: str = "classifier"
    mask_epochs: int = 25
    mask_lr_milestones: list[int] = field(default_factory=lambda: [10, 20])
    generator_channels: int | None = None
    generator_depth: int | None = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.cross_ratio, bool) or not isinstance(self.cross_ratio, (int, float)) or self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be a number >= 0, got {self.cross_ratio!r}")
        for name in ("lambda_norm", "lr_G", "lr_M"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        if isinstance(self.lambda_div, bool) or not isinstance(self.lambda_div, (int, float)) or self.lambda_div < 0:
            raise ValueError(f"lambda_div must be a number >= 0, got {self.lambda_div!r}")
        if self.generator_schedule not in GENERATOR_SCHEDULES:
            raise ValueError(f"generator_schedule must be one of {', '.join(GENERATOR_SCHEDULES)}, got "
                             f"{self.generator_schedule!r}")
        if not _positive_number(self.mask_density) or self.mask_density >= 1:
            raise ValueError(f"mask_density must be a number in (0, 1), got {self.mask_density!r}")
        if isinstance(self.mask_epochs, bool) or not isinstance(self.mask_epochs, int) or self.mask_epochs < 0:
            raise ValueError(f"mask_epochs must be an integer >= 0, got {self.mask_epochs!r}")
        if not isinstance(self.mask_lr_milestones, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.mask_lr_milestones):
            raise ValueError(f"mask_lr_milestones must be a list of integers >= 1, got {self.mask_lr_milestones!r}")
        for name in ("generator_channels", "generator_depth"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or null, got {v!r}")


@register_attack
class InputAware(Attack):
    name = "inputaware"
    config_cls = InputAwareConfig
    description = "input-specific generated triggers with mask, diversity loss and cross samples (Nguyen & Tran 2020)"
    dynamic = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generator: TriggerGenerator | None = None
        self.mask_generator: TriggerGenerator | None = None
        self.normalizer: Normalizer | None = None
        self.image_shape: tuple[int, int, int] | None = None

    # -- the networks --------------------------------------------------------------------------------------
    def sizes(self, in_channels: int) -> tuple[int, int]:
        """(channels, depth) of the generators for images with ``in_channels`` channels."""
        cfg: InputAwareConfig = self.config  # type: ignore[assignment]
        channels = cfg.generator_channels or (16 if in_channels == 1 else 32)
        depth = cfg.generator_depth or (2 if in_channels == 1 else 3)
        return channels, depth

    def build(self, image_shape: tuple[int, int, int], normalizer: Normalizer) -> None:
        """Fresh generators for images of ``image_shape`` (C, H, W), initialised from the config's seed."""
        c, h, w = (int(v) for v in image_shape)
        channels, depth = self.sizes(c)
        if h % 2 ** depth or w % 2 ** depth:
            raise ValueError(f"inputaware: {h}x{w} images need generator_depth with 2**depth dividing both sides "
                             f"(got depth {depth})")
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
            torch.manual_seed(self.config.seed)
            self.generator = TriggerGenerator(c, c, channels, depth)
            self.mask_generator = TriggerGenerator(c, 1, channels, depth)
        self.normalizer = normalizer
        self.image_shape = (c, h, w)

    def _nets(self) -> tuple[TriggerGenerator, TriggerGenerator, Normalizer]:
        if self.generator is None or self.mask_generator is None or self.normalizer is None:
            raise ValueError("inputaware: the generators are not built yet; run prepare() or load_state() with a "
                             "bundle's attack tensors")
        return self.generator, self.mask_generator, self.normalizer

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Patterns (N, C, H, W) in [0, 1] for float images ``x`` in [0, 1]."""
        g, _, norm = self._nets()
        return squash(g(norm(x)))

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """Masks (N, 1, H, W) in [0, 1] for float images ``x`` in [0, 1]."""
        _, m, norm = self._nets()
        return soft_threshold(squash(m(norm(x))))

    # -- the trigger ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def trigger_from(self, images: torch.Tensor, sources: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``images`` (uint8) with the trigger generated from ``sources`` (uint8, same shape): the poisoned image
        when ``sources`` is ``images``, a cross sample otherwise. Generators in eval mode; result uint8."""
        check_images(images)
        if sources.shape != images.shape:
            raise ValueError(f"sources must have the images' shape {tuple(images.shape)}, got {tuple(sources.shape)}")
        g, m, _ = self._nets()
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"inputaware: the generators were built for {self.image_shape} images, got "
                             f"{tuple(images.shape[1:])}")
        dev = next(g.parameters()).device
        modes = (g.training, m.training)
        g.eval()
        m.eval()
        out = torch.empty_like(images)
        try:
            for start in range(0, images.shape[0], batch_size):
                x = to_float(images[start:start + batch_size].to(dev))
                s = to_float(sources[start:start + batch_size].to(dev))
                out[start:start + batch_size] = to_uint8(255.0 * mix(x, self.patterns(s), self.masks(s))).to(images.device)
        finally:
            g.train(modes[0])
            m.train(modes[1])
        return out

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.trigger_from(images, images)

    # -- poisoned training set (bookkeeping; training triggers are generated on the fly) ---------------------
    def cross_count(self, poison_count: int) -> int:
        return int(round(self.config.cross_ratio * poison_count))  # type: ignore[attr-defined]

    def poison_train(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> PoisonedTrainSet:
        """Poisoned samples (own trigger, target label) and cross samples (a seeded partner's trigger, label
        kept), with the generator as it is now."""
        n_poison = self.poison_count(labels.shape[0])
        n_cross = self.cross_count(n_poison)
        if n_cross > labels.shape[0] - n_poison:
            raise ValueError(f"inputaware: cross_ratio {self.config.cross_ratio} asks for {n_cross} cross samples "  # type: ignore[attr-defined]
                             f"but only {labels.shape[0] - n_poison} unpoisoned samples remain; lower cross_ratio or "
                             "poison_ratio")
        base = super().poison_train(images, labels, num_classes)
        if n_cross == 0:
            return base
        rest = torch.ones(labels.shape[0], dtype=torch.bool)
        rest[base.poison_indices] = False
        pool = torch.nonzero(rest).flatten()
        cross = select_poison_indices(labels, n_cross, self.config.seed + 1, pool)
        partners = self._partners(cross, labels.shape[0], torch.Generator().manual_seed(self.config.seed + 2))
        base.images[cross] = self.trigger_from(images[cross], images[partners])
        base.cross_indices = cross
        return base

    @staticmethod
    def _partners(indices: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        """A random other sample for each index (never itself)."""
        if n < 2:
            raise ValueError("cross samples need at least two training images")
        offset = torch.randint(1, n, (indices.numel(),), generator=gen)
        return (indices + offset) % n

    # -- step 1: the mask generator ------------------------------------------------------------------------
    def prepare(self, context: AttackContext) -> None:
        """Build both generators (seeded) and pre-train the mask generator on the clean training set."""
        cfg: InputAwareConfig = self.config  # type: ignore[assignment]
        self.build(tuple(context.images.shape[1:]), Normalizer.for_dataset(context.spec))
        g, m, _ = self._nets()
        dev = context.device
        g.to(dev)
        m.to(dev)
        start = time.perf_counter()
        losses: list[dict[str, float]] = []
        if cfg.mask_epochs:
            context.log(f"inputaware: training the mask generator for {cfg.mask_epochs} epoch(s)")
            losses = self._train_mask(context)
        m.eval()
        m.requires_grad_(False)
        self.info = {"mask_training": {"epochs": cfg.mask_epochs, "seconds": time.perf_counter() - start,
                                       "curve": losses}}

    def _train_mask(self, context: AttackContext) -> list[dict[str, float]]:
        cfg: InputAwareConfig = self.config  # type: ignore[assignment]
        _, m, _ = self._nets()
        dev = context.device
        gen = torch.Generator().manual_seed(cfg.seed + 3)
        opt = torch.optim.Adam(m.parameters(), lr=cfg.lr_M, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.mask_lr_milestones), 0.1)
        n, bs = context.images.shape[0], context.train.batch_size
        curve = []
        m.train()
        for epoch in range(1, cfg.mask_epochs + 1):
            first, second = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
            totals = {"norm": 0.0, "diversity": 0.0, "density": 0.0}
            steps = math.ceil(n / bs)
            bar = tqdm(range(steps), desc=f"mask {epoch}/{cfg.mask_epochs}", disable=not context.progress, leave=False)
            for step in bar:
                sl = slice(step * bs, (step + 1) * bs)
                x1 = to_float(context.images[first[sl]].to(dev))
                x2 = to_float(context.images[second[sl]].to(dev))
                m1, m2 = self.masks(x1), self.masks(x2)
                norm = mask_norm_loss(m1, cfg.mask_density)
                div = diversity_loss(x1, x2, m1, m2, EPSILON)
                loss = cfg.lambda_norm * norm + cfg.lambda_div * div
                _check_finite(loss, f"mask pre-training epoch {epoch} step {step + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals["norm"] += float(norm.detach())
                totals["diversity"] += float(div.detach())
                totals["density"] += float(m1.detach().mean())
            sched.step()
            curve.append({"epoch": epoch, **{k: v / steps for k, v in totals.items()}})
            context.log(f"  mask epoch {epoch}: norm {curve[-1]['norm']:.4f} diversity {curve[-1]['diversity']:.3f} "
                        f"mean mask {curve[-1]['density']:.4f}")
        return curve

    # -- step 2: classifier and pattern generator together ---------------------------------------------------
    def train_model(self, model: nn.Module, poisoned: PoisonedTrainSet, context: AttackContext,
                    eval_fn: Callable[[nn.Module], dict] | None = None) -> TrainHistory:
        """Train ``model`` and the pattern generator together; poisoned and cross samples get fresh triggers
        from the current generator at every step (see the module docstring)."""
        cfg: InputAwareConfig = self.config  # type: ignore[assignment]
        g, m, norm = self._nets()
        tc, dev, spec = context.train, context.device, context.spec
        images = context.images
        n = images.shape[0]
        if poisoned.labels.shape != (n,):
            raise ValueError("the poisoned training set does not match the context's training images")
        gen = seed_everything(tc.seed)
        model.to(dev)
        g.to(dev)
        m.to(dev).eval()
        opt_c = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_G, betas=(0.5, 0.9))
        steps = math.ceil(n / tc.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_c, T_max=tc.epochs * steps)
        scheds = [sched]
        if cfg.generator_schedule == "classifier":
            scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=tc.epochs * steps))
        role = torch.zeros(n, dtype=torch.long)  # 0 clean, 1 poisoned, 2 cross
        role[poisoned.poison_indices] = 1
        role[poisoned.cross_indices] = 2
        labels = poisoned.labels.long()
        history = TrainHistory()
        for epoch in range(1, tc.epochs + 1):
            model.train()
            g.train()
            start = time.perf_counter()
            order = torch.randperm(n, generator=gen)
            partners = self._partners(torch.arange(n), n, gen)
            total, correct, seen, div_total = 0.0, 0, 0, 0.0
            bar = tqdm(range(steps), desc=f"epoch {epoch}/{tc.epochs}", disable=not context.progress, leave=False)
            for step in bar:
                idx = order[step * tc.batch_size:(step + 1) * tc.batch_size]
                x = to_float(images[idx].to(dev))
                y = labels[idx].to(dev)
                r = role[idx]
                bd_pos = torch.nonzero(r == 1).flatten()
                cross_pos = torch.nonzero(r == 2).flatten()
                pos = torch.cat([bd_pos, cross_pos]).to(dev)
                div = torch.zeros((), device=dev)
                with autocast_context(dev, bf16=tc.bf16, amp=False):
                    if pos.numel():
                        sources = torch.cat([x[bd_pos.to(dev)],
                                             to_float(images[partners[idx[cross_pos]]].to(dev))])
                        pattern = self.patterns(sources)
                        with torch.no_grad():
                            mask = self.masks(sources)
                        x = x.index_put((pos,), mix(x[pos], pattern, mask))
                        if sources.shape[0] >= 2 and cfg.lambda_div > 0:
                            div = diversity_loss(sources, sources.roll(1, 0), pattern, pattern.roll(1, 0), EPSILON)
                    if tc.augment:
                        x = random_crop(x, spec.crop_padding, gen)
                        if spec.hflip:
                            x = random_hflip(x, 0.5, gen)
                    logits = model(norm(x))
                    loss = F.cross_entropy(logits, y) + cfg.lambda_div * div
                _check_finite(loss, f"epoch {epoch} step {step + 1}")
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()
                for sc in scheds:
                    sc.step()
                total += float(loss.detach()) * len(idx)
                div_total += float(div.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(idx)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.3f}")
            record = {"epoch": epoch, "loss": total / seen, "train_acc": correct / seen, "diversity": div_total / seen,
                      "lr": opt_c.param_groups[0]["lr"], "lr_G": opt_g.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
            if eval_fn is not None:
                record.update(eval_fn(model))
            history.epochs.append(record)
        model.eval()
        g.eval()
        return history

    # -- state for the bundle --------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        g, m, _ = self._nets()
        out = {f"generator.{k}": v.detach().cpu().clone() for k, v in g.state_dict().items()}
        out.update({f"mask_generator.{k}": v.detach().cpu().clone() for k, v in m.state_dict().items()})
        out["image_shape"] = torch.tensor(self.image_shape, dtype=torch.int64)
        out["normalization"] = torch.tensor([list(self.normalizer.mean), list(self.normalizer.std)],  # type: ignore[union-attr]
                                            dtype=torch.float64)
        return out

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        shape = tensors.get("image_shape")
        stats = tensors.get("normalization")
        if shape is None or stats is None or shape.numel() != 3 or stats.dim() != 2 or stats.shape[0] != 2:
            raise ValueError("inputaware: state needs 'image_shape' (C, H, W), 'normalization' (2, C) and the "
                             "generator.* / mask_generator.* weights")
        c, h, w = (int(v) for v in shape.tolist())
        if stats.shape[1] != c:
            raise ValueError(f"inputaware: normalization has {stats.shape[1]} channels for {c}-channel images")
        self.build((c, h, w), Normalizer(tuple(stats[0].tolist()), tuple(stats[1].tolist())))
        g, m, _ = self._nets()
        for prefix, net in (("generator.", g), ("mask_generator.", m)):
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                net.load_state_dict(part, strict=True)
            except RuntimeError as err:
                raise ValueError(f"inputaware: the stored {prefix.rstrip('.')} weights do not fit the config's "
                                 f"generator size: {err}") from err
        unknown = sorted(k for k in tensors if not k.startswith(("generator.", "mask_generator."))
                         and k not in ("image_shape", "normalization"))
        if unknown:
            raise ValueError(f"inputaware: unknown state tensor(s) {', '.join(unknown)}")
        g.eval()
        m.eval().requires_grad_(False)
