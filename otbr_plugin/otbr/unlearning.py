"""OTBR stage 1-2: random unlearning on noise, and the neuron weight change (NWC) it causes.

Random unlearning (Lin et al. 2025, Sec. "Random-unlearning NWC pruning") takes a copy of the backdoored
model and runs a few SGD steps that *increase* the cross-entropy on uniform noise with uniformly random
labels. The per-neuron L1 weight change it causes correlates with the change caused by unlearning the
poisoned data, so neurons that move most are backdoor-related -- no data is needed to find them.

Everything here is a pure function of tensors/modules: the input model is never modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Normalizer

__all__ = [
    "NoiseSpace",
    "LabelRange",
    "UnlearningResult",
    "sample_unlearning_batch",
    "random_unlearning",
    "gradient_ascent",
    "target_layer_names",
    "neuron_weight_change",
    "nwc_scores",
]

NoiseSpace = Literal["pixel", "normalized"]
LabelRange = Literal["all", "k_minus_1"]
NWCPrecision = Literal["full", "round4"]
NWCNorm = Literal["none", "fan_in"]

_SHORTCUT_MARKERS = ("shortcut", "downsample")


def sample_unlearning_batch(
    batch_size: int,
    input_shape: Sequence[int],
    num_classes: int,
    generator: torch.Generator,
    normalizer: Normalizer | None = None,
    noise_space: NoiseSpace = "pixel",
    label_range: LabelRange = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random-unlearning input: uniform noise of shape ``(batch_size, *input_shape)`` and labels.

    ``noise_space="pixel"``: noise is uniform in [0, 1] *pixel* space and then normalized with ``normalizer``,
    so it lives where real images live in the model's input space (needs ``normalizer``).
    ``noise_space="normalized"``: uniform [0, 1] fed to the model directly, i.e. in normalized space (the
    published code's behaviour).
    ``label_range="all"``: labels uniform over all ``num_classes`` classes.  ``"k_minus_1"``: uniform over
    ``0 .. K-2`` (the published code calls ``randint(0, K-1)``, whose upper bound is exclusive, so the last
    class is never drawn).

    Sampled on the CPU from ``generator`` so that the same seed gives the same batch on every device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    x = torch.rand((batch_size, *input_shape), generator=generator)
    if noise_space == "pixel":
        if normalizer is None:
            raise ValueError("noise_space='pixel' needs the model's normalizer")
        x = normalizer(x)
    elif noise_space != "normalized":
        raise ValueError(f"noise_space must be 'pixel' or 'normalized', got {noise_space!r}")
    if label_range == "all":
        high = num_classes
    elif label_range == "k_minus_1":
        high = num_classes - 1
    else:
        raise ValueError(f"label_range must be 'all' or 'k_minus_1', got {label_range!r}")
    y = torch.randint(0, high, (batch_size,), generator=generator)
    return x, y


@dataclass
class UnlearningResult:
    """The unlearned copy, the cross-entropy per step (it should rise) and how often each label was drawn."""

    model: nn.Module
    losses: list[float]
    label_counts: torch.Tensor


def random_unlearning(
    model: nn.Module,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    normalizer: Normalizer | None,
    steps: int = 20,
    batch_size: int = 256,
    lr: float = 1e-4,
    momentum: float = 0.9,
    noise_space: NoiseSpace = "pixel",
    label_range: LabelRange = "all",
    bn_mode: Literal["train", "eval"] = "train",
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    progress=None,
) -> UnlearningResult:
    """Gradient *ascent* on the cross-entropy of random noise with random labels, on a copy of ``model``.

    ``bn_mode="train"`` (the published behaviour) runs the copy in training mode, so batch norm normalizes
    with the noise batch's own statistics while gradients are taken; the copy's running statistics drift, but
    the copy is only used to measure weight changes and is then thrown away, so the defended model keeps the
    original running statistics. ``"eval"`` keeps BN (and dropout) in inference mode instead.
    ``progress``: optional ``callable(iterable, desc, total)`` returning an iterator (e.g. a tqdm wrapper).
    """
    generator = generator or torch.Generator().manual_seed(0)
    counts = torch.zeros(num_classes, dtype=torch.long)

    def batches():
        while True:
            x, y = sample_unlearning_batch(batch_size, input_shape, num_classes, generator, normalizer,
                                           noise_space, label_range)
            counts.add_(torch.bincount(y, minlength=num_classes))
            yield x, y

    unlearned, losses = gradient_ascent(model, batches(), steps=steps, lr=lr, momentum=momentum, bn_mode=bn_mode,
                                        device=device, progress=progress, desc="OTBR random unlearning")
    return UnlearningResult(model=unlearned, losses=losses, label_counts=counts)


def gradient_ascent(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    momentum: float,
    bn_mode: Literal["train", "eval"] = "train",
    device: torch.device | None = None,
    progress=None,
    desc: str = "unlearning",
) -> tuple[nn.Module, list[float]]:
    """The unlearning loop shared by random unlearning and the diagnostics' data unlearning: on a copy of
    ``model``, ``steps`` SGD steps (``lr``, ``momentum``) that *increase* the cross-entropy of the batches
    ``(x, y)`` drawn in turn from ``batches`` (inputs already in the model's input space). Returns the copy
    (in eval mode) and the loss of each step; ``model`` itself is not modified."""
    if steps < 1:
        raise ValueError(f"unlearning steps must be >= 1, got {steps}")
    device = device or next(model.parameters()).device
    unlearned = copy.deepcopy(model).to(device)
    unlearned.train(bn_mode == "train")
    for p in unlearned.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(unlearned.parameters(), lr=lr, momentum=momentum)
    losses: list[float] = []
    source = iter(batches)
    it = range(steps) if progress is None else progress(range(steps), desc, steps)
    for _ in it:
        try:
            x, y = next(source)
        except StopIteration:
            raise ValueError(f"{desc}: the batches ran out after {len(losses)} of {steps} steps") from None
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(unlearned(x.to(device)), y.to(device))
        (-loss).backward()  # ascent: increase the loss
        optimizer.step()
        losses.append(float(loss.detach()))
    unlearned.eval()
    return unlearned, losses


def target_layer_names(model: nn.Module, include_shortcut: bool = False, include_linear: bool = False) -> list[str]:
    """Module names whose output neurons OTBR ranks, in module (forward) order.

    Default: every ``Conv2d`` that is not in a shortcut/downsample branch (as in the paper and its code).
    ``include_shortcut`` adds the 1x1 shortcut convs, ``include_linear`` adds ``Linear`` layers.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if include_shortcut or not any(m in name for m in _SHORTCUT_MARKERS):
                names.append(name)
        elif include_linear and isinstance(module, nn.Linear):
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d layers for OTBR to rank")
    return names


def _weights(model_or_state: nn.Module | Mapping[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        modules = dict(model_or_state.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise KeyError(f"layers not in the model: {', '.join(missing)}")
        return {n: modules[n].weight.detach() for n in layers}
    return {n: model_or_state[f"{n}.weight"].detach() for n in layers}


def neuron_weight_change(
    original: nn.Module | Mapping[str, torch.Tensor],
    unlearned: nn.Module | Mapping[str, torch.Tensor],
    layers: Sequence[str],
    accumulate: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """NWC of every output neuron of each layer: ``sum |w_unlearned[k] - w_original[k]|`` over the neuron's
    incoming weights, on the CPU, returned as float64. ``accumulate``: the dtype of the difference and sum
    (float64; the published code works in the weights' float32). Models or state dicts (keys
    ``<layer>.weight``) are accepted."""
    w0, w1 = _weights(original, layers), _weights(unlearned, layers)
    out = {}
    for name in layers:
        a, b = w0[name].to("cpu", accumulate), w1[name].to("cpu", accumulate)
        if a.shape != b.shape:
            raise ValueError(f"{name}: weight shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
        out[name] = (b - a).abs().flatten(1).sum(dim=1).to(torch.float64)
    return out


def nwc_scores(
    nwc: Mapping[str, torch.Tensor],
    fan_in: Mapping[str, int] | None = None,
    norm: NWCNorm = "none",
    precision: NWCPrecision = "full",
) -> dict[str, torch.Tensor]:
    """The values OTBR ranks neurons by and uses as transport mass.

    ``norm="fan_in"`` divides each layer's NWCs by the number of weights per neuron, so wide-input layers do
    not dominate the global ranking just by having more weights. ``precision="round4"`` rounds to 4 decimals
    as the published code does (it writes NWCs to a text file with ``{:.4f}`` and reads them back).
    """
    out = {}
    for name, v in nwc.items():
        s = v.to(torch.float64)
        if norm == "fan_in":
            if fan_in is None or name not in fan_in:
                raise ValueError(f"nwc_norm='fan_in' needs the fan-in of layer {name}")
            s = s / float(fan_in[name])
        elif norm != "none":
            raise ValueError(f"nwc_norm must be 'none' or 'fan_in', got {norm!r}")
        if precision == "round4":  # exactly what "{:.4f}" then float() gives (torch.round can differ by an ulp)
            s = torch.tensor([float(f"{x:.4f}") for x in s.tolist()], dtype=torch.float64).reshape(s.shape)
        elif precision != "full":
            raise ValueError(f"nwc_precision must be 'full' or 'round4', got {precision!r}")
        out[name] = s
    return out
