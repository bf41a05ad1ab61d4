"""i-BAU: Implicit Backdoor Adversarial Unlearning (Zeng, Chen, Park, Mao, Jin and Jia, "Adversarial Unlearning
of Backdoors via Implicit Hypergradient", ICLR 2022). Needs the clean defense subset.

The minimax problem min_theta max_delta (1/n) sum_i L(f_theta(x_i + delta), y_i) over one universal
perturbation delta (the shape of one input, added in the model's input space, i.e. after normalization, as
BackdoorBench does) is solved in ``rounds`` rounds, the model in eval mode throughout (BN running statistics are
never updated, as in the official code):

1. perturbation: delta starts at 0; one pass over the clean subset in batches, SGD (lr ``perturbation_lr``) on
   ``-CE(f(x + delta), f(x).argmax) + perturbation_reg * ||delta||^2`` (labels: the model's own predictions);
2. unlearning: for every batch b, one step of the outer optimizer (Adam, ``lr``) along the implicit
   hypergradient of the outer loss ``CE(f_theta(x_b + patch), y_b)``, where ``patch`` adds delta to a random
   ``patch_portion`` of the batch (the official code's 1%). The inner problem is the fixed point of one
   gradient step ``Phi(delta, theta) = delta - inner_lr * grad_delta G(delta, theta)`` with
   ``G = -mean CE(f_theta(x_inner + delta), y_inner) + perturbation_reg * ||delta||^2`` on the *first* batch
   (``inner_batch: first``, as the official code) or on the current batch (``current``). The hypergradient
   (:func:`fixed_point_hypergradient`) is

       dL/dtheta = d_theta L + (d_theta Phi)^T v,   v = sum_{k < K} (d_delta Phi^T)^k d_delta L,

   i.e. ``K`` fixed-point iterations ``v <- d_delta Phi^T v + d_delta L`` from v = 0 (a truncated Neumann series
   of ``(I - d_delta Phi^T)^{-1} d_delta L``), stopping early when an iteration moves v by less than ``tol``.

Batches are drawn once before the rounds (with the dataset's crop/flip when ``augment``), as the official code
keeps its list of batches; the perturbation pass reshuffles every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Defense, DefenseConfig, DefenseContext, DefenseOutcome, StageTimer
from .batches import shuffled_batches
from .common import FollowsSetting, preprocess_batch
from .registry import register_defense

__all__ = ["IBAUConfig", "IBAU", "SETTINGS", "fixed_point_hypergradient", "inner_map", "outer_loss",
           "search_perturbation"]

# options whose value depends on `setting` (None in the config: as the setting says)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"lr": 0.001, "batch_size": 100, "augment": False},  # the official code (defense.py, notebooks)
    "backdoorbench": {"lr": 0.0001, "batch_size": 256, "augment": True},  # BackdoorBench's i-bau.py + its YAML
}


@dataclass
class IBAUConfig(FollowsSetting, DefenseConfig):
    """i-BAU settings; defaults are the official code's: 5 rounds, K = 5 fixed-point iterations, inner step 0.1,
    perturbation SGD lr 10 with L2 penalty 0.001, outer Adam lr 0.001, batch 100, delta on 1% of each outer batch,
    inner loss on the first batch. ``setting: backdoorbench``: BackdoorBench's i-bau.py (Adam lr 1e-4, batch 256,
    training augmentation)."""

    SETTINGS: ClassVar[dict[str, dict[str, Any]]] = SETTINGS
    setting: Literal["default", "backdoorbench"] = "default"
    rounds: int = 5
    fixed_point_iterations: int = 5
    tol: float = 1e-10
    inner_lr: float = 0.1
    perturbation_lr: float = 10.0
    perturbation_reg: float = 0.001
    patch_portion: float = 0.01
    inner_batch: Literal["first", "current"] = "first"
    optimizer: Literal["adam", "sgd"] = "adam"
    # setting-dependent options (None: as `setting` says)
    lr: float | None = None
    batch_size: int | None = None
    augment: bool | None = None

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(map(repr, SETTINGS))}, got {self.setting!r}")
        for name in ("rounds", "fixed_point_iterations", "batch_size"):
            v = getattr(self, name)
            low = 0 if name == "rounds" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("inner_lr", "perturbation_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.perturbation_reg >= 0:
            raise ValueError(f"perturbation_reg must be >= 0, got {self.perturbation_reg!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if not 0 <= self.patch_portion <= 1:
            raise ValueError(f"patch_portion must be in [0, 1], got {self.patch_portion!r}")
        if self.inner_batch not in ("first", "current"):
            raise ValueError(f"inner_batch must be 'first' or 'current', got {self.inner_batch!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")


def _grads(output: Tensor, inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor] | None = None,
           retain_graph: bool = True) -> list[Tensor]:
    """Gradients of ``output`` w.r.t. ``inputs`` (zeros for an input it does not depend on)."""
    got = torch.autograd.grad(output, list(inputs), grad_outputs=grad_outputs, retain_graph=retain_graph,
                              allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs)]


def fixed_point_hypergradient(inner: Sequence[Tensor], outer: Sequence[Tensor], iterations: int,
                              fp_map: Callable[[list[Tensor]], list[Tensor]],
                              loss: Callable[[list[Tensor]], Tensor], tol: float = 0.0) -> list[Tensor]:
    """The implicit hypergradient of ``loss(inner)`` w.r.t. the ``outer`` tensors, at an approximate fixed point
    ``inner`` of ``fp_map`` (a function of the inner tensors that also depends on the outer ones).

    With ``g_w = d loss / d inner``, ``g_o = d loss / d outer``, ``J = d fp_map / d inner`` and
    ``B = d fp_map / d outer``: ``v = sum_{k < iterations} (J^T)^k g_w`` by the iteration
    ``v <- J^T v + g_w`` from 0 (stopping once a step moves v by less than ``tol``), and the result is
    ``g_o + B^T v``. Only vector-Jacobian products are formed. Returns one tensor per outer tensor."""
    inner = [t.detach().requires_grad_(True) for t in inner]
    outer = list(outer)
    value = loss(inner)
    both = _grads(value, inner + outer, retain_graph=False)
    g_inner, g_outer = both[:len(inner)], both[len(inner):]
    mapped = fp_map(inner)
    v = [torch.zeros_like(t) for t in inner]
    for _ in range(iterations):
        jtv = _grads(mapped, inner, grad_outputs=v) if any(bool(t.any()) for t in v) else [torch.zeros_like(t) for t in inner]
        new = [a + b for a, b in zip(jtv, g_inner)]
        moved = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(new, v))))
        v = new
        if moved < tol:
            break
    btv = _grads(mapped, outer, grad_outputs=v, retain_graph=False)
    return [a + b for a, b in zip(g_outer, btv)]


def inner_map(model: nn.Module, x: Tensor, y: Tensor, inner_lr: float, reg: float
              ) -> Callable[[list[Tensor]], list[Tensor]]:
    """The fixed-point map of i-BAU's inner problem on the batch (x, y): one gradient-descent step
    ``delta - inner_lr * grad_delta(-mean CE(f(x + delta), y) + reg * ||delta||^2)``, differentiable in delta and
    in the model's parameters."""
    def phi(params: list[Tensor]) -> list[Tensor]:
        (delta,) = params
        g = -F.cross_entropy(model(x + delta), y) + reg * delta.pow(2).sum()
        (grad,) = torch.autograd.grad(g, [delta], create_graph=True)
        return [delta - inner_lr * grad]
    return phi


def outer_loss(model: nn.Module, x: Tensor, y: Tensor, patched: Tensor) -> Callable[[list[Tensor]], Tensor]:
    """i-BAU's outer loss on (x, y): cross-entropy with delta added to the samples where ``patched`` is true."""
    mask = patched.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def loss(params: list[Tensor]) -> Tensor:
        (delta,) = params
        return F.cross_entropy(model(x + mask * delta), y)
    return loss


def search_perturbation(model: nn.Module, batches: list[tuple[Tensor, Tensor]], lr: float, reg: float) -> Tensor:
    """The round's universal perturbation: from 0, one SGD step per batch on
    ``-CE(f(x + delta), f(x).argmax) + reg * ||delta||^2`` (labels: the model's predictions on the clean x)."""
    delta = torch.zeros((1, *batches[0][0].shape[1:]), device=batches[0][0].device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    for x, _ in batches:
        with torch.no_grad():
            pred = model(x).argmax(1)
        objective = -F.cross_entropy(model(x + delta), pred) + reg * delta.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
    return delta.detach()


@register_defense
class IBAU(Defense):
    name = "ibau"
    config_class = IBAUConfig
    needs_clean_data = True
    description = "i-BAU (Zeng et al., ICLR 2022): adversarial unlearning of a universal perturbation, implicit hypergradient"

    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        clean = self.require_clean_data(context)
        cfg = self.config
        timer = StageTimer()
        work = self.copy_model(model, context.device)
        params = [p for p in work.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
               else torch.optim.SGD(params, lr=cfg.lr))
        aug_gen = context.generator(offset=2)
        labels = clean.labels.long()
        with torch.no_grad():  # the official code's list of batches, drawn once
            fixed = [(preprocess_batch(clean.images[idx], context, cfg.augment, aug_gen),
                      labels[idx].to(context.device))
                     for idx in shuffled_batches(len(clean), cfg.batch_size, context.generator(offset=1))]
        order_gen, patch_gen = context.generator(offset=3), context.generator(offset=4)
        history: list[dict] = []
        work.eval()
        for r in context.progress_bar(range(cfg.rounds), desc="i-BAU rounds", total=cfg.rounds):
            with timer("perturbation"), torch.no_grad():
                shuffled = [(preprocess_batch(clean.images[idx], context, cfg.augment, aug_gen),
                             labels[idx].to(context.device))
                            for idx in shuffled_batches(len(clean), cfg.batch_size, order_gen)]
            with timer("perturbation"), torch.enable_grad():
                delta = search_perturbation(work, shuffled, cfg.perturbation_lr, cfg.perturbation_reg)
            with timer("unlearning"):
                for b, (x, y) in enumerate(fixed):
                    n_patch = int(x.shape[0] * cfg.patch_portion)
                    patched = torch.zeros(x.shape[0], dtype=torch.bool)
                    patched[torch.randperm(x.shape[0], generator=patch_gen)[:n_patch]] = True
                    xi, yi = fixed[0] if cfg.inner_batch == "first" else (x, y)
                    loss_fn = outer_loss(work, x, y, patched.to(context.device))
                    grads = fixed_point_hypergradient([delta], params, cfg.fixed_point_iterations,
                                                      inner_map(work, xi, yi, cfg.inner_lr, cfg.perturbation_reg),
                                                      loss_fn, cfg.tol)
                    opt.zero_grad(set_to_none=True)
                    for p, g in zip(params, grads):
                        p.grad = g.detach()
                    opt.step()
            history.append({"round": r + 1, "perturbation_l2": float(delta.norm())})
        for p in params:
            p.grad = None
        diagnostics = {"setting": cfg.setting, "rounds": cfg.rounds, "outer_steps": cfg.rounds * len(fixed),
                       "samples": len(clean), "history": history}
        return DefenseOutcome(model=work.eval(), diagnostics=diagnostics, stage_seconds=timer.seconds,
                              data_used=context.data_used(), units_removed=0)
