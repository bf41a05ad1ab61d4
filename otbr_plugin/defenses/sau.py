"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha and Wu, "Shared Adversarial Unlearning: Backdoor Mitigation
by Unlearning Shared Adversarial Examples", NeurIPS 2023). Needs the clean defense subset.

The model h is fine-tuned on the clean subset while a frozen copy h0 of the backdoored model stays as reference.
Per batch (x, y), for ``rounds`` passes over the subset:

1. Shared adversarial examples (:func:`shared_pgd`): a per-sample perturbation in pixel space ([0, 1] images,
   before normalization), started at +``trigger_norm`` (``pgd_init: max``), ``adv_steps`` signed-gradient
   *descent* steps of size ``adv_lr`` on ``beta_1 * L_adv + beta_2 * L_share``, projected onto the L_inf ball of
   radius ``trigger_norm`` (or the L2 / L1 ball per sample), stopping early once every sample is shared.
   ``L_adv = -(sum of CE(h(x+d), y) over samples h does not yet flip + the same for h0) / (2 N)`` and
   ``L_share`` = sum over samples that are not yet shared of the Jensen-Shannon divergence between h's and
   h0's softmax on x+d, over N. A sample is *flipped* by a model when its prediction on x+d differs from its
   prediction on x, and *shared* when both models flip it to the same class.
2. Unlearning step (:func:`sau_loss`): ``lmd_1 * CE(h(x), y) + lmd_2 * CE(h(x+d), y) + lmd_3 * L_sau``
   with ``L_sau = (1/N) sum_{i in P} -1/2 [log(1e-6 + min(1 - p_i, 0.999)) + log(1 + 1e-6 - max(p_i, 0.001))]``,
   where p_i is h's probability on x_i + d_i of h0's adversarial class ŷ0_i, and P the samples whose ŷ0_i
   differs from both y_i and h0's clean prediction (potential poisoned examples); both logs are -log(1 - p_i)
   up to the clamps. Adam (``lr``, ``weight_decay``), h in eval mode (``train_mode``: training mode for the
   forward of h).

Perturbed images are not clipped to [0, 1] (``clip_images: true`` clips them), as the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.transforms import Normalizer, random_crop, random_hflip, to_float
from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .batches import shuffled_batches
from .common import context_spec
from .registry import register_defense

__all__ = ["SAUConfig", "SAU", "shared_pgd", "sau_loss", "shared_mask", "project"]


@dataclass
class SAUConfig(DefenseConfig):
    """SAU settings; defaults are the official code's (BackdoorBench's sau.py and config/defense/sau/cifar10.yaml,
    written by the paper's first author): 100 rounds of Adam lr 1e-4 (no weight decay) on batches of 256; PGD
    L_inf radius 0.2, step 0.2, 5 steps, init max, beta_1 0.01, beta_2 1; lmd_1 1, lmd_2 0, lmd_3 1."""

    rounds: int = 100
    batch_size: int = 256
    lr: float = 0.0001
    weight_decay: float = 0.0
    outer_steps: int = 1
    norm_type: Literal["L_inf", "L2", "L1"] = "L_inf"
    trigger_norm: float = 0.2
    adv_lr: float = 0.2
    adv_steps: int = 5
    pgd_init: Literal["max", "min", "zero", "random"] = "max"
    beta_1: float = 0.01
    beta_2: float = 1.0
    lmd_1: float = 1.0
    lmd_2: float = 0.0
    lmd_3: float = 1.0
    train_mode: bool = False
    augment: bool = False
    clip_images: bool = False

    def validate(self) -> None:
        for name, low in (("rounds", 0), ("batch_size", 1), ("outer_steps", 1), ("adv_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("lr", "trigger_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "adv_lr", "beta_1", "beta_2", "lmd_1", "lmd_2", "lmd_3"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.norm_type not in ("L_inf", "L2", "L1"):
            raise ValueError(f"norm_type must be 'L_inf', 'L2' or 'L1', got {self.norm_type!r}")
        if self.pgd_init not in ("max", "min", "zero", "random"):
            raise ValueError(f"pgd_init must be 'max', 'min', 'zero' or 'random', got {self.pgd_init!r}")
        for name in ("train_mode", "augment", "clip_images"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


def project(pert: Tensor, norm_type: str, bound: float) -> Tensor:
    """``pert`` projected onto the ball of radius ``bound``: clamped (L_inf) or, per sample, scaled down to
    norm ``bound`` when its L2 / L1 norm exceeds it."""
    if norm_type == "L_inf":
        return pert.clamp(-bound, bound)
    flat = pert.flatten(1)
    norm = flat.norm(p=2 if norm_type == "L2" else 1, dim=1)
    scale = torch.where(norm > bound, bound / norm.clamp_min(1e-12), torch.ones_like(norm))
    return pert * scale.view(-1, *([1] * (pert.dim() - 1)))


def shared_mask(pred_h: Tensor, pred_h0: Tensor, clean_h: Tensor, clean_h0: Tensor) -> Tensor:
    """Samples that both models flip (prediction on x + d differs from the one on x), to the same class."""
    return (pred_h != clean_h) & (pred_h0 != clean_h0) & (pred_h == pred_h0)


def _js(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Per-sample Jensen-Shannon divergence of the two softmax outputs (probabilities clamped at 1e-8)."""
    p, q = F.softmax(logits_a, 1).clamp_min(1e-8), F.softmax(logits_b, 1).clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def shared_pgd(model: nn.Module, ref: nn.Module, x: Tensor, y: Tensor, normalizer: Normalizer, cfg: SAUConfig,
               generator: torch.Generator | None = None) -> Tensor:
    """SAU's shared adversarial perturbation of the pixel batch ``x`` ([0, 1] floats) for the models h
    (``model``) and h0 (``ref``); see the module docstring. Returns the perturbation (detached)."""
    def forward(m: nn.Module, images: Tensor) -> Tensor:
        if cfg.clip_images:
            images = images.clamp(0, 1)
        return m(normalizer(images))

    with torch.no_grad():
        clean_h, clean_h0 = forward(model, x).argmax(1), forward(ref, x).argmax(1)
    if cfg.pgd_init == "max":
        pert = torch.full_like(x, cfg.trigger_norm)
    elif cfg.pgd_init == "min":
        pert = torch.full_like(x, -cfg.trigger_norm)
    elif cfg.pgd_init == "random":  # as the official code: U[0, 1), then projected
        pert = torch.rand(x.shape, generator=generator).to(x.device)
    else:
        pert = torch.zeros_like(x)
    pert = project(pert, cfg.norm_type, cfg.trigger_norm)
    n = x.shape[0]
    for _ in range(cfg.adv_steps):
        pert.requires_grad_(True)
        out_h, out_h0 = forward(model, x + pert), forward(ref, x + pert)
        pred_h, pred_h0 = out_h.argmax(1), out_h0.argmax(1)
        flip_h, flip_h0 = pred_h != clean_h, pred_h0 != clean_h0
        shared = shared_mask(pred_h, pred_h0, clean_h, clean_h0)
        ce_h = F.cross_entropy(out_h, y, reduction="none")
        ce_h0 = F.cross_entropy(out_h0, y, reduction="none")
        loss_adv = -((ce_h * ~flip_h).sum() + (ce_h0 * ~flip_h0).sum()) / (2 * n)
        loss_share = (_js(out_h, out_h0) * ~shared).sum() / n
        (grad,) = torch.autograd.grad(cfg.beta_1 * loss_adv + cfg.beta_2 * loss_share, [pert])
        with torch.no_grad():
            pert = project(pert - cfg.adv_lr * grad.sign(), cfg.norm_type, cfg.trigger_norm)
        if bool(shared.all()):
            break
    return pert.detach()


def sau_loss(logits: Tensor, adv_logits: Tensor, ref_logits: Tensor, ref_adv_logits: Tensor, y: Tensor,
             cfg: SAUConfig) -> tuple[Tensor, dict[str, float]]:
    """SAU's unlearning loss for one batch: ``lmd_1 * CE(h(x), y) + lmd_2 * CE(h(x + d), y) + lmd_3 * L_sau``
    (module docstring). ``logits`` / ``adv_logits``: h on x / x + d; ``ref_*``: h0 on them. Returns the loss and
    its parts."""
    n = y.shape[0]
    loss_clean = F.cross_entropy(logits, y)
    loss_adv = F.cross_entropy(adv_logits, y)
    adv_label_h0 = ref_adv_logits.argmax(1)
    potential = (adv_label_h0 != y) & (adv_label_h0 != ref_logits.argmax(1))
    if bool(potential.any()):
        p = F.softmax(adv_logits, 1).gather(1, adv_label_h0[:, None]).squeeze(1)[potential]
        loss_shared = (-torch.log(1e-6 + (1 - p).clamp(max=0.999)).sum()
                       - torch.log(1 + 1e-6 - p.clamp(min=0.001)).sum()) / 2 / n
    else:
        loss_shared = torch.zeros((), device=logits.device)
    loss = cfg.lmd_1 * loss_clean + cfg.lmd_2 * loss_adv + cfg.lmd_3 * loss_shared
    return loss, {"clean": float(loss_clean.detach()), "adv": float(loss_adv.detach()), "shared": float(loss_shared.detach()),
                  "potential": int(potential.sum())}


@register_defense
class SAU(Defense):
    name = "sau"
    config_class = SAUConfig
    needs_clean_data = True
    description = "SAU (Wei et al., NeurIPS 2023): unlearn shared adversarial examples of the model and its frozen copy"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        timer = StageTimer()
        work = self.copy_model(model, context.device)
        ref = self.copy_model(model, context.device)
        for p in ref.parameters():
            p.requires_grad_(False)
        opt = torch.optim.Adam(work.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        norm = context.normalizer.on(context.device)
        spec = context_spec(context)
        order_gen, aug_gen, init_gen = (context.generator(offset=k) for k in (1, 2, 3))
        labels = clean.labels.long()
        history: list[dict] = []
        for r in context.progress_bar(range(cfg.rounds), desc="sau rounds", total=cfg.rounds):
            sums = {"clean": 0.0, "adv": 0.0, "shared": 0.0, "potential": 0}
            batches = 0
            for idx in shuffled_batches(len(clean), cfg.batch_size, order_gen):
                x = to_float(clean.images[idx].to(context.device))
                if cfg.augment:
                    x = random_crop(x, spec.crop_padding, aug_gen)
                    if spec.hflip:
                        x = random_hflip(x, 0.5, aug_gen)
                y = labels[idx].to(context.device)
                work.eval()
                with timer("shared_adversarial"):
                    pert = shared_pgd(work, ref, x, y, norm, cfg, init_gen)
                with timer("unlearning"):
                    adv = x + pert
                    if cfg.clip_images:
                        adv = adv.clamp(0, 1)
                    for _ in range(cfg.outer_steps):
                        if cfg.train_mode:
                            work.train()
                        both = work(norm(torch.cat([x, adv])))
                        logits, adv_logits = both[: len(idx)], both[len(idx):]
                        work.eval()
                        with torch.no_grad():
                            ref_logits, ref_adv_logits = ref(norm(x)), ref(norm(adv))
                        loss, parts = sau_loss(logits, adv_logits, ref_logits, ref_adv_logits, y, cfg)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                for k in sums:
                    sums[k] += parts[k]
                batches += 1
            history.append({"round": r + 1, **{k: (v / batches if k != "potential" else v) for k, v in sums.items()}})
        work.eval()
        diagnostics = {"rounds": cfg.rounds, "samples": len(clean), "history": history}
        return DefenseOutcome(model=work, diagnostics=diagnostics, stage_seconds=timer.seconds,
                              data_used=context.data_used(), units_removed=0)
