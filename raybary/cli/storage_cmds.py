"""CLI commands of the storage layer (generate, convert, show)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add the storage commands to ``group``."""
