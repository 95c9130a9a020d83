"""The command line: the typer app (`app.py`), its declarations→typer adapter, and the demo. Only this package imports
typer."""

from ltcache.cli.app import app, main

__all__ = ["app", "main"]
