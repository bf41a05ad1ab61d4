"""Put this folder on PYTHONPATH for BackdoorBench's OWN scripts only (the crosscheck does so). Two workarounds for
BackdoorBench f02e353, nothing else:

1. ``np.infty``: BackdoorBench still uses it (utils/trainer_cls.py, general_plot_for_epoch, called by
   defense/clp.py, fp.py, anp.py, ...), an alias that numpy 2 removed; restored when missing.
2. ``defense.dde``: utils/defense_utils/dde/dde_model/conv_dde.py runs ``from defense.dde import dde_model``, a
   module its tree does not hold, so every script that imports ``utils.defense_utils.dde.dde_model``
   (defense/ep.py) fails at import with ``ModuleNotFoundError: No module named 'defense.dde'``. A stand-in
   ``defense.dde`` is registered whose ``dde_model`` is ``utils.defense_utils.dde.dde_model``, the package that
   holds the DDE layers conv_dde.py asks for (``LayerNorm_DDE``, ``LayerNorm2D_DDE``; used only by its ConvNeXt).
"""

import importlib as _importlib
import sys as _sys
import types as _types

import numpy as _np

if not hasattr(_np, "infty"):
    _np.infty = _np.inf


def _dde_getattr(name: str):
    if name == "dde_model":
        return _importlib.import_module("utils.defense_utils.dde.dde_model")
    raise AttributeError(f"module 'defense.dde' (otbr-plugin's stand-in) has no attribute {name!r}")


if "defense.dde" not in _sys.modules:
    _shim = _types.ModuleType("defense.dde", "otbr-plugin's stand-in for the defense.dde that BackdoorBench f02e353's "
                                             "conv_dde.py imports; see scripts/backdoorbench_compat/sitecustomize.py")
    _shim.__getattr__ = _dde_getattr
    _sys.modules["defense.dde"] = _shim
