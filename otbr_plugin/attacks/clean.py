"""The clean model that LF and TrojanNN compute their trigger against.

Either trained here (``clean_epochs`` epochs of the run's own training settings on the clean training set,
seeded like the run) or read from a safetensors state_dict file (``clean_model``) that fits the run's model
exactly (strict load), e.g. one written by ``otbr-bench train --save FILE``, so several attacks can share one
clean training.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import sha256_file
from ..train import train_classifier
from .base import AttackContext

__all__ = ["clean_model", "load_state_file", "last_linear"]


def load_state_file(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a safetensors state_dict into ``model`` strictly; a clear error names the file and what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"clean model {p} does not exist (a safetensors state_dict of the attacked model, "
                                "e.g. from `otbr-bench train --save FILE`)")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"clean model {p}: not a readable safetensors file ({err})") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"clean model {p} does not fit the attacked model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, other shapes {shapes[:5]}")
    model.load_state_dict(state, strict=True)
    return model


def clean_model(context: AttackContext, epochs: int, path: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """A clean model of ``context.model_config`` (eval mode, on the context's device) and facts about it."""
    torch.manual_seed(context.train.seed)
    model = context.model_config.build()
    start = time.perf_counter()
    if path:
        load_state_file(path, model)
        info: dict[str, Any] = {"source": "file", "path": str(path), "sha256": sha256_file(path)}
        model.to(context.device)
    else:
        context.log(f"training a clean {context.model_config.name} for {epochs} epoch(s) (trigger search)")
        cfg = dataclasses.replace(context.train, epochs=int(epochs))
        hist = train_classifier(model, context.images, context.labels, context.spec, cfg, device=context.device,
                                progress=context.progress)
        info = {"source": "trained", "epochs": int(epochs), "train_acc": hist.epochs[-1]["train_acc"]}
    info["seconds"] = time.perf_counter() - start
    return model.eval(), info


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (the classifier head); its input features are the penultimate neurons."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to select neurons from")
    return linears[-1]
