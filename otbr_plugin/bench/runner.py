"""Run one defense on one backdoored checkpoint and evaluate it: the harness's single code path.

The defense gets a :class:`DefenseContext` (never test data; the clean defense subset only if it declares
it needs data). Evaluation on the clean and poisoned test sets happens here, after the defense returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from benchmark_adapters.bundle import save_bundle

from ..bundle import Bundle, non_finite_weights
from ..data import ImageDataset, Normalizer, default_data_root, find_dataset, load_dataset, tensor_identity
from ..data.specs import get_dataset_spec
from ..data.subsets import CleanData, clean_defense_subset
from ..defenses.base import Defense, DefenseOutcome, OracleScorer, build_context
from ..runtime import resolve_device, seed_everything
from ..metrics import (BackdoorMetrics, NonFiniteOutputError, SampleCorrectness, defense_effectiveness_rating,
                       evaluate_backdoor)
from ..io import json_default, write_csv, write_json
from ..aggregate.bootstrap import per_sample_payload
from ..aggregate.records import RunRecord, run_fingerprint, training_summary

__all__ = ["DefenseRun", "defend_model", "evaluate_model", "evaluate_model_samples", "run_defense",
           "write_defense_outputs"]


@dataclass
class DefenseRun:
    """A defense applied to a checkpoint, with metrics before and after."""

    bundle: Bundle
    defense: Defense
    outcome: DefenseOutcome
    before: BackdoorMetrics
    after: BackdoorMetrics
    seed: int
    device: torch.device
    seconds: dict[str, float]
    config_source: str = ""
    data: dict | None = None  # the data root used and the identity of the clean test set (and train set if used)
    before_samples: SampleCorrectness | None = None  # per-sample outcomes (None: not known, e.g. before passed in)
    after_samples: SampleCorrectness | None = None

    @property
    def der(self) -> float:
        return defense_effectiveness_rating(self.before, self.after)

    def record(self) -> RunRecord:
        return RunRecord(
            dataset=self.bundle.dataset,
            model=self.bundle.model_config.to_dict(),
            attack=dict(self.bundle.attack),
            defense=self.defense.name,
            defense_config=self.defense.config.to_dict(),
            seed=self.seed,
            checkpoint_sha256=self.bundle.model_sha256 or "",
            metrics_before=self.before.to_dict(),
            metrics_after=self.after.to_dict(),
            der=self.der,
            data_used=self.outcome.data_used,
            seconds=self.seconds,
            diagnostics=self.outcome.diagnostics,
            device=str(self.device),
            config_source=self.config_source,
            data=self.data,
            training=training_summary(self.bundle.training),
            per_sample=(per_sample_payload(self.before_samples, self.after_samples)
                        if self.before_samples is not None and self.after_samples is not None else None),
            fingerprint=run_fingerprint(self.bundle.attack, {"name": self.defense.name,
                                                             "config": self.defense.config.to_dict()},
                                        self.bundle.model_sha256 or "",
                                        {"data": {k: v for k, v in (self.data or {}).items() if k != "root"}}),
        )


def evaluate_model(model: nn.Module, bundle: Bundle, clean_test: ImageDataset,
                   device: torch.device) -> BackdoorMetrics:
    """ACC/ASR/RA of ``model`` on the clean test set and the bundle's poisoned test set, computed on ``device``
    (the run's; the model is not moved)."""
    return evaluate_model_samples(model, bundle, clean_test, device)[0]


def evaluate_model_samples(model: nn.Module, bundle: Bundle, clean_test: ImageDataset,
                           device: torch.device) -> tuple[BackdoorMetrics, SampleCorrectness]:
    """:func:`evaluate_model` and its per-sample outcomes (clean test set order, the bundle's poisoned set order)."""
    bd = bundle.bd_test
    try:
        return evaluate_backdoor(model, clean_test.images, clean_test.labels, bd.images, bd.targets,  # type: ignore[return-value]
                                 bd.original_labels, bundle.normalizer, device=device, return_samples=True)
    except NonFiniteOutputError as err:
        raise NonFiniteOutputError(f"{_checkpoint_name(bundle)}: {err}") from None


def _checkpoint_name(bundle: Bundle) -> str:
    """How an error names the checkpoint: its path, else its sha256."""
    if bundle.path is not None:
        return str(bundle.path)
    return f"checkpoint sha256 {bundle.model_sha256[:12]}" if bundle.model_sha256 else "the checkpoint"


def defend_model(
    model: nn.Module,
    defense: Defense,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    normalizer: Normalizer,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    clean_data: CleanData | None = None,
    dataset: str | None = None,
    oracle: OracleScorer | None = None,
) -> DefenseOutcome:
    """Run ``defense`` on ``model``: build its context (clean data only for a defense that declares it needs
    it; a data-free defense given clean data is refused), seed, mitigate, time it. The one path from a model
    to a defended model, under ``otbr-bench defend``, the grid, the BackdoorBench face and
    :func:`otbr_plugin.defend`. ``outcome.seconds`` is the wall time of the defense. ``oracle``: a test-set scorer,
    accepted only by a defense whose config says ``oracle: true`` (see :mod:`otbr_plugin.defenses.base`)."""
    if clean_data is not None and not defense.needs_clean_data:
        raise ValueError(f"defense {defense.name!r} is data-free: it takes no clean data (got {len(clean_data)} "
                         "samples); pass clean_data only to a defense that needs it (fp, anp)")
    context = build_context(defense, num_classes=num_classes, input_shape=input_shape, normalizer=normalizer,
                            device=device, seed=seed, progress=progress, clean_data=clean_data, dataset=dataset,
                            oracle=oracle)
    seed_everything(seed)
    start = time.perf_counter()
    outcome = defense.mitigate(model, context)
    outcome.seconds = time.perf_counter() - start
    return outcome


def run_defense(
    bundle: Bundle,
    defense: Defense,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    clean_ratio: float = 0.05,
    progress: bool = True,
    clean_test: ImageDataset | None = None,
    before: BackdoorMetrics | None = None,
    config_source: str = "",
    allow_oracle: bool = False,
    before_samples: SampleCorrectness | None = None,
    clean_indices: Sequence[int] | None = None,
) -> DefenseRun:
    """Evaluate the backdoored model, run ``defense``, evaluate the defended model.

    ``clean_test`` and ``before`` (with ``before_samples``, its per-sample outcomes; without them the record keeps no
    per-sample data) may be passed in to avoid recomputing them across defenses; ``config_source``
    (from :func:`~otbr_plugin.config.resolve_config`) is written to the record. ``allow_oracle``: an entry point
    that keeps oracle runs apart (the BackdoorBench drop-in) lets a defense with ``oracle: true`` score its
    selection on the test set; elsewhere such a config is refused. ``clean_indices``: the clean defense subset
    given as training-split indices (BackdoorBench's ``--index FILE``) instead of drawn by ratio and seed.
    """
    dev = resolve_device(device)
    spec = get_dataset_spec(bundle.dataset)
    if data_root is None and bundle.extra.get("data_root"):  # where a foreign checkpoint's reader found the data
        data_root = bundle.extra["data_root"]
    if clean_test is None:
        clean_test = load_dataset(spec.name, "test", data_root)
    root = Path(data_root) if data_root is not None else default_data_root()
    data: dict = {"root": str(find_dataset(spec.name, root) or root), "test": tensor_identity(clean_test)}
    model = bundle.build_model().to(dev)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if before is None:
        before, before_samples = evaluate_model_samples(model, bundle, clean_test, dev)
    clean_data = None
    if defense.needs_clean_data:
        train = load_dataset(spec.name, "train", data_root)
        data["train"], data["clean_ratio"] = tensor_identity(train), clean_ratio
        if clean_indices is not None:
            data["clean_indices"] = [int(i) for i in clean_indices]  # the given subset, kept with the record
        clean_data = clean_defense_subset(train, clean_ratio, seed, defense.clean_subset_sampling(),
                                          draw=defense.backdoorbench_draw, indices=clean_indices)
    oracle = None
    if defense.wants_oracle() and allow_oracle:
        def oracle(m: nn.Module) -> BackdoorMetrics:  # scores only: the defense never holds the test data
            return evaluate_model(m, bundle, clean_test, dev)
    t1 = time.perf_counter()
    outcome = defend_model(model, defense, num_classes=bundle.model_config.num_classes, input_shape=spec.input_shape,
                           normalizer=Normalizer(tuple(bundle.normalizer.mean), tuple(bundle.normalizer.std)),
                           device=dev, seed=seed, progress=progress, clean_data=clean_data, dataset=spec.name,
                           oracle=oracle)
    seconds["defense_total"] = outcome.seconds
    seconds.update({f"stage_{k}": v for k, v in outcome.stage_seconds.items()})
    t2 = time.perf_counter()
    bad = non_finite_weights(outcome.model.state_dict())
    if bad:
        raise NonFiniteOutputError(f"{_checkpoint_name(bundle)}: defense {defense.name} left NaN or infinite "
                                   f"weights in {', '.join(bad[:5])}")
    after, after_samples = evaluate_model_samples(outcome.model, bundle, clean_test, dev)
    seconds["evaluation"] = time.perf_counter() - t2 + (t1 - t0)
    return DefenseRun(bundle, defense, outcome, before, after, seed, dev, seconds, config_source, data,
                      before_samples, after_samples)


def write_defense_outputs(run: DefenseRun, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the defended model as a bundle (``model/``), each outcome table as CSV and ``record.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = run.bundle
    state = {k: v.detach().cpu() for k, v in run.outcome.model.state_dict().items()}
    defended = Bundle(
        model_config=b.model_config, state_dict=state, dataset=b.dataset, normalizer=b.normalizer,
        bd_test=b.bd_test, attack=b.attack, metrics=run.after.to_dict(), training=b.training,
        defense={"name": run.defense.name, "config": run.defense.config.to_dict(), "config_source": run.config_source,
                 "data_used": run.outcome.data_used,
                 "seed": run.seed, "source_checkpoint_sha256": b.model_sha256},
        extra={"metrics_before_defense": run.before.to_dict()},
    )
    if not overwrite and (out / "record.json").exists():
        raise FileExistsError(f"{out / 'record.json'} already exists (pass overwrite=True / --overwrite to replace it)")
    record = run.record().to_dict()  # built (and checked) before anything is written
    RunRecord.from_dict(json.loads(json.dumps(record, default=json_default)))
    paths: dict[str, Path] = {"model": save_bundle(defended, out / "model", overwrite=overwrite)}
    for name, table in run.outcome.tables.items():
        paths[name] = write_csv(out / f"{name}.csv", table)
    paths["record"] = write_json(out / "record.json", record)
    return paths


def summarize(run: DefenseRun) -> str:
    """Human-readable before/after lines."""
    b, a = run.before, run.after
    lines = [
        f"defense {run.defense.name} on {run.bundle.attack.get('name', '?')} / {run.bundle.dataset} "
        f"(data used: {run.outcome.data_used}, device {run.device})",
        f"  before: ACC {b.acc * 100:6.2f}%  ASR {b.asr * 100:6.2f}%  RA {b.ra * 100:6.2f}%",
        f"  after:  ACC {a.acc * 100:6.2f}%  ASR {a.asr * 100:6.2f}%  RA {a.ra * 100:6.2f}%   DER {run.der * 100:.2f}%",
        "  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in run.seconds.items()),
    ]
    return "\n".join(lines)

