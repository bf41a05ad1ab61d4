"""The harness that runs grids: what a grid is (:mod:`.grid`), how a task runs (:mod:`.jobs`), who runs the tasks
(:mod:`.executors`, :mod:`.slurm`), one defense on one bundle (:mod:`.runner`). Results aggregation (records, tables,
report, leaderboard, regress) is :mod:`otbr_plugin.aggregate`."""

from ..metrics import BackdoorMetrics, accuracy, defense_effectiveness_rating, evaluate_backdoor, predict

__all__ = ["BackdoorMetrics", "accuracy", "defense_effectiveness_rating", "evaluate_backdoor", "predict"]
