"""Results aggregation: the run record format (:mod:`.records`) and what is made from records -- comparison tables
(:mod:`.tables`), the HTML report (:mod:`.report`), leaderboard submissions (:mod:`.leaderboard`) and regression
checks against a baseline (:mod:`.regress`).

It reads and writes records and never runs a model: it imports no model, data, attack or defense code
(tests/test_architecture.py checks this).
"""
