"""CLI commands of the solver (solve-tutorial, bench)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add the solver commands to ``group``."""
