"""The package version, in a leaf module: bundles and records stamp it without importing the package face."""

__version__ = "0.1.0"
