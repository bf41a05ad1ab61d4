"""Checkpoint formats in and out: the project's own bundle, and BackdoorBench's records."""
