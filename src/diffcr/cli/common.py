"""Helpers shared by the commands: error reporting and printing."""

from __future__ import annotations

import functools

import typer


def friendly_errors(fn):
    """Turn the library's clear errors into a one-line message and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from diffcr.training import TrainingDiverged

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, TypeError, TrainingDiverged) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from err

    return wrapper
