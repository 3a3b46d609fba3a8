"""mixtune: how much generalist instruction data to mix into a specialist task's tuning data."""

__version__ = "0.1.0"
