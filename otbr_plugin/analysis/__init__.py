"""OTBR's own analyses on a checkpoint (``otbr-bench diagnose``; the paper's Fig. 1/4/5): :mod:`.diagnose`.

It sits above the method (:mod:`otbr_plugin.otbr`, whose pure functions it calls), the defenses and the data it loads,
and below the commands; nothing in the harness imports it.
"""
