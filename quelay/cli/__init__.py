"""The outer edge: the Typer CLI, configuration, progress display, logs, demo."""

from .app import app, main

__all__ = ["app", "main"]
