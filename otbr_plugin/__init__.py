"""otbr-plugin: OTBR and baseline backdoor defenses in a BackdoorBench-style harness."""

__version__ = "0.1.0"
