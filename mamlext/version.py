"""The package version, in one place (``mamlext.__version__``; pyproject.toml reads it)."""

__version__ = "0.1.0"
