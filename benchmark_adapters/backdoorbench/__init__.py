"""BackdoorBench's formats: read ``record/<name>/attack_result.pt`` safely, write records and defense results.

Importing this package registers a checkpoint reader, so ``otbr-bench defend record/<name>`` (and
:func:`benchmark_adapters.checkpoints.load_checkpoint`) accept a BackdoorBench record folder wherever they
accept a bundle (options ``data_root`` and ``trust``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundle import Bundle
from ..checkpoints import register_reader
from .clean_test import check_clean_labels, load_clean_test, resolve_data_root
from .record import (
    ATTACK_RESULT,
    MODEL_NAMES,
    is_record,
    load_attack_result,
    poisoned_test_set,
    poisoned_train_set,
    read_attack_result,
    record_folder,
    state_dict_for_zoo,
)
from .ssba import export_ssba_images, read_ssba_images, ssba_file_name, ssba_poisoned_test_set, write_ssba_images
from .writer import write_attack_result, write_defense_result, write_defense_summary
from .safe_load import ALLOWED_GLOBAL_NAMES, AttackResultError, UnsafeCheckpointError, numpy_safe_globals, safe_torch_load

__all__ = [
    "ATTACK_RESULT", "MODEL_NAMES", "ALLOWED_GLOBAL_NAMES", "AttackResultError", "UnsafeCheckpointError",
    "check_clean_labels", "is_record", "load_attack_result", "load_clean_test", "numpy_safe_globals",
    "poisoned_test_set", "poisoned_train_set", "read_attack_result", "record_folder", "resolve_data_root", "safe_torch_load",
    "state_dict_for_zoo", "write_attack_result", "write_defense_result", "write_defense_summary",
    "export_ssba_images", "read_ssba_images", "ssba_file_name", "ssba_poisoned_test_set", "write_ssba_images",
]


def _read(path: Path, data_root: Any = None, trust: bool = False, **_: Any) -> Bundle:
    return load_attack_result(path, trust=bool(trust), data_root=data_root)


register_reader("backdoorbench", is_record, _read)
