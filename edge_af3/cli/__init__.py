"""The `edge-af3` command line: a thin typer layer over the public API."""

from .app import app, main

__all__ = ["app", "main"]
