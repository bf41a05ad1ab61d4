"""torch's global random stream as a BackdoorBench defense script consumes it, replayed on a private generator.

BackdoorBench's scripts call ``fix_random(seed)`` (``torch.manual_seed(seed)`` among others) and then draw every
random number from torch's global stream: the default init of the network they build, the seeds of their data
loaders and samplers, the training transforms, their own noise. A defense here that is to draw exactly what such a
script draws at the same seed replays those draws, in the same order, on one ``torch.Generator`` seeded with the
same seed, never touching torch's global generator. The pieces, described from torch's and torchvision's own
behaviour (BackdoorBench's code is read, never copied: it is CC BY-NC):

- :func:`burn_default_init`: the draws of building a network of the model's architecture with PyTorch's default
  init (each conv / linear layer's ``reset_parameters``: a ``uniform_`` over the weight, then over the bias);
- :func:`loader_seed` : one ``int64`` ``random_`` draw, as a ``DataLoader`` iterator makes for its base seed (its
  ``__init__``) and a ``RandomSampler`` without a generator makes for its own private generator (at its first index);
- :func:`replacement_sampler_indices`: a ``RandomSampler(replacement=True, num_samples=...)``'s indices from its
  private generator (chunks of 32 ``randint``, then the remainder).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["burn_default_init", "loader_seed", "replacement_sampler_indices"]


def burn_default_init(model: nn.Module, generator: torch.Generator) -> int:
    """Consume on the CPU ``generator`` what building ``model``'s architecture with PyTorch's default init consumes
    from torch's stream: for every ``Conv*d`` / ``Linear`` in ``named_modules`` order (the construction order of the
    usual ``__init__``), a float32 ``uniform_`` over a throwaway tensor of its weight's shape, then of its bias's
    (when it has one): the draws of ``kaiming_uniform_`` and the bias ``uniform_`` (the bounds change the values,
    not the draws). Normalization layers draw nothing (ones / zeros). Returns the number of values burnt.

    A network whose constructor re-initializes its layers (e.g. a VGG with ``kaiming_normal_``) draws more; that is
    not replayed here."""
    burnt = 0
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):  # noqa: SLF001 (all Conv1d/2d/3d)
            for param in (module.weight, module.bias):
                if param is not None:
                    torch.empty(param.shape, dtype=torch.float32).uniform_(generator=generator)
                    burnt += param.numel()
    return burnt


def loader_seed(generator: torch.Generator) -> int:
    """One ``int64`` ``random_`` draw on ``generator``: a ``DataLoader`` iterator's base seed, or the seed a
    ``RandomSampler`` without a generator draws for its private one."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def replacement_sampler_indices(seed: int, n: int, num_samples: int) -> torch.Tensor:
    """The indices ``RandomSampler(range(n), replacement=True, num_samples=num_samples)`` yields after drawing
    ``seed`` for its private generator: ``torch.randint(0, n, (32,))`` chunks, then one of ``num_samples % 32``."""
    if n < 1 or num_samples < 0:
        raise ValueError(f"a sampler needs n >= 1 and num_samples >= 0, got n={n}, num_samples={num_samples}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    chunks = [torch.randint(0, n, (32,), dtype=torch.int64, generator=gen) for _ in range(num_samples // 32)]
    chunks.append(torch.randint(0, n, (num_samples % 32,), dtype=torch.int64, generator=gen))
    return torch.cat(chunks)
