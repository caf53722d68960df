"""The package version (read by the package root and by what writes it into checkpoints)."""
__version__ = "0.1.0"
