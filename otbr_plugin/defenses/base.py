"""The defense interface every defense implements, and the context the harness hands it.

A defense is a class with a ``name``, a typed config dataclass (every hyperparameter explicit, validated on
construction) and a ``needs_clean_data`` flag. ``mitigate(model, context)`` returns a :class:`DefenseOutcome`
holding the defended model (a new object: the input model is left untouched) and diagnostics.

The context never holds test data. Clean data (the defense subset of the *training* set) is attached only
for defenses that declare they need it: :func:`build_context` enforces this. The one exception is explicit:
a defense whose config says ``oracle: true`` (FP's and ANP's BackdoorBench selection, which BackdoorBench makes
on the test set) gets an *oracle scorer* -- a function from a model to its test ACC/ASR/RA, never the data --
only from an entry point that asks for it (``allow_oracle``); its run is labelled :data:`ORACLE_LABEL` and kept
apart from reported results.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, TypeVar

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import dataclass_from_dict
from ..data.subsets import CleanData
from ..data.transforms import Normalizer
from ..metrics import BackdoorMetrics

__all__ = [
    "DefenseConfig",
    "CleanData",
    "DefenseContext",
    "DefenseOutcome",
    "Defense",
    "StageTimer",
    "build_context",
    "ORACLE_LABEL",
    "OracleScorer",
]

ORACLE_LABEL = "oracle diagnostic (test set)"
OracleScorer = Callable[[nn.Module], BackdoorMetrics]

C = TypeVar("C", bound="DefenseConfig")


@dataclass
class DefenseConfig:
    """Base of every defense config. Subclasses add fields with the paper's defaults and override
    :meth:`validate`, which runs on construction and raises ``ValueError`` naming the bad field."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        return dataclass_from_dict(cls, data, what=f"{cls.__name__}")

    def replace(self: C, **changes: Any) -> C:
        return self.from_dict({**self.to_dict(), **changes})


@dataclass
class DefenseContext:
    """What a defense may know besides the model. No test data, ever."""

    num_classes: int
    input_shape: tuple[int, int, int]
    normalizer: Normalizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool = True
    clean_data: CleanData | None = None
    dataset: str | None = None
    oracle: OracleScorer | None = None  # test-set scorer, only for an explicit oracle run (see the module docstring)

    def progress_bar(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterator:
        return iter(tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False))

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the context seed (plus ``offset`` for independent streams)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def data_used(self) -> str:
        used = "none" if self.clean_data is None else self.clean_data.describe()
        return used + f"; selection scored on the TEST set ({ORACLE_LABEL})" if self.oracle is not None else used


@dataclass
class DefenseOutcome:
    """The defended model plus what the defense wants to report.

    ``diagnostics``: JSON-serializable summary (pruned neurons, transport costs, thresholds, ...).
    ``tables``: named data frames written as CSV (e.g. ``"nwc"``: one row per neuron).
    ``stage_seconds``: wall time per stage of the method.
    ``seconds``: wall time of the whole defense (set by the harness that ran it).
    ``units_removed``: how many units (neurons / channels) the defense pruned or zeroed; every defense fills it
    (0 for one that removes nothing), so harness code such as sweeps never reads a defense's diagnostics.
    """

    model: nn.Module
    diagnostics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    data_used: str = "none"
    units_removed: int | None = None
    seconds: float | None = None  # wall time of mitigate(), set by the harness
    # the state dict a foreign format should hold instead of ``model.state_dict()`` (FP's BackdoorBench setting:
    # torch's pruning reparametrisation ``weight_orig`` / ``weight_mask`` of the classifier, as BackdoorBench saves)
    export_state: dict[str, torch.Tensor] | None = None


class StageTimer:
    """Collects seconds per named stage: ``with timer("unlearning"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class Defense(ABC):
    """Base class: subclasses set ``name``, ``config_class``, ``needs_clean_data`` and implement
    :meth:`mitigate`. Construct with a config object, a mapping, or keyword overrides."""

    name: ClassVar[str]
    config_class: ClassVar[type[DefenseConfig]]
    needs_clean_data: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, config: DefenseConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        if config is None:
            config = self.config_class()
        elif isinstance(config, Mapping):
            config = self.config_class.from_dict(config)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config.replace(**overrides) if overrides else config

    @abstractmethod
    def mitigate(self, model: nn.Module, context: DefenseContext) -> DefenseOutcome:
        """Return a defended copy of ``model``; ``model`` itself is not modified."""

    def check_context(self, context: DefenseContext) -> None:
        """Called by subclasses first: refuses a context that lacks data the defense needs."""
        if self.needs_clean_data and context.clean_data is None:
            raise ValueError(f"defense {self.name!r} needs a clean defense subset, but the context holds none")

    def require_clean_data(self, context: DefenseContext) -> CleanData:
        """The clean defense subset of ``context``; a ``ValueError`` when it holds none (for defenses that
        declare ``needs_clean_data``)."""
        self.check_context(context)
        if context.clean_data is None:
            raise ValueError(f"defense {self.name!r} needs a clean defense subset, but the context holds none")
        return context.clean_data

    def wants_oracle(self) -> bool:
        """Whether this run selects on the test set (``oracle: true`` in a config that has the field)."""
        return bool(getattr(self.config, "oracle", False))

    def require_oracle(self, context: DefenseContext) -> OracleScorer | None:
        """The context's oracle scorer when the config asks for it (a ValueError when it is missing), else None;
        a scorer the config did not ask for is refused too."""
        if self.wants_oracle() and context.oracle is None:
            raise ValueError(f"defense {self.name!r}: oracle: true selects on the TEST set, but this entry point "
                             "gives no oracle scorer (only the BackdoorBench drop-in's --oracle true runs it)")
        if not self.wants_oracle() and context.oracle is not None:
            raise ValueError(f"defense {self.name!r} got a test-set scorer without oracle: true in its config")
        return context.oracle

    def clean_subset_sampling(self) -> str:
        """How the harness draws the clean defense subset: "stratified" (default: the same share of each class),
        "uniform" (a plain random sample, as BackdoorBench's choose_index) or "backdoorbench_stream"
        (BackdoorBench's own draw at the run's seed; which call of its choose_index is ``backdoorbench_draw``)."""
        return "stratified"

    #: which call of BackdoorBench's ``choose_index`` after its ``fix_random`` draws the subset this defense's
    #: BackdoorBench script uses (subset_sampling: backdoorbench_stream); 1 unless the script draws twice
    backdoorbench_draw: ClassVar[int] = 1

    def share_work_with(self, other: "Defense") -> None:
        """Hook: opt in to reusing expensive work of ``other`` (and vice versa), e.g. across the runs of a sweep
        over a config field. A defense overrides it only where the reused work gives exactly the result of a
        fresh run (OTBR shares its unlearning/NWC stage when the model, the context and the unlearning fields
        match). The default shares nothing."""

    @staticmethod
    def copy_model(model: nn.Module, device: torch.device) -> nn.Module:
        """A deep copy in eval mode on ``device``: defenses never modify the caller's model."""
        return copy.deepcopy(model).to(device).eval()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def build_context(
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
) -> DefenseContext:
    """The context for ``defense``: clean data is attached only if the defense declares it needs it; an oracle
    scorer only if the defense's config asks for one (``oracle: true``), and then it must be given."""
    if defense.needs_clean_data and clean_data is None:
        raise ValueError(f"defense {defense.name!r} needs clean data: build the clean defense subset first")
    if oracle is not None and not defense.wants_oracle():
        raise ValueError(f"defense {defense.name!r}: a test-set scorer is given only to a config with oracle: true")
    if oracle is None and defense.wants_oracle():
        raise ValueError(f"defense {defense.name!r}: oracle: true selects on the TEST set; this entry point does not "
                         "run oracle selections (use the BackdoorBench drop-in with --oracle true: its results go to "
                         "defense/<name>_oracle/, labelled oracle)")
    return DefenseContext(
        num_classes=num_classes,
        input_shape=tuple(input_shape),  # type: ignore[arg-type]
        normalizer=normalizer,
        device=device,
        seed=seed,
        progress=progress,
        clean_data=clean_data if defense.needs_clean_data else None,
        dataset=dataset,
        oracle=oracle,
    )
