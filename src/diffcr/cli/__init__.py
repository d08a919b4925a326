"""The `diffcr` command: a thin typer layer over the library, one file per command."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="diffcr: learned token routing that makes Diffusion Transformers faster (DiffCR).",
)


def _register() -> None:
    from diffcr.cli import (  # noqa: F401
        bench,
        classifier,
        compress,
        demo,
        evaluate,
        prepare,
        pretrain,
        report,
        sample,
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register()
    try:
        app()
    finally:
        from diffcr.train.loop import end_distributed

        end_distributed()


_register()
