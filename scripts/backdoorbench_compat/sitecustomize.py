"""Put this folder on PYTHONPATH for BackdoorBench's OWN scripts only (the crosscheck does so): BackdoorBench
f02e353 still uses ``np.infty`` (utils/trainer_cls.py, general_plot_for_epoch, called by defense/clp.py, fp.py,
anp.py), an alias that numpy 2 removed. This restores the alias and changes nothing else."""

import numpy as _np

if not hasattr(_np, "infty"):
    _np.infty = _np.inf
