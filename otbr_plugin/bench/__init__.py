"""Evaluation, runs, records, tables, leaderboard and regression."""

from ..metrics import BackdoorMetrics, accuracy, defense_effectiveness_rating, evaluate_backdoor, predict

__all__ = ["BackdoorMetrics", "accuracy", "defense_effectiveness_rating", "evaluate_backdoor", "predict"]
