"""Reading the shipped artifacts' model cards in tests."""

from pathlib import Path


def card_schedule(card: Path) -> list[list[float]]:
    """The kept-ratio table a model card prints in its "learned schedule" row: rows separated by " / ", after the
    last ": " of the row."""
    row = next(line for line in card.read_text().splitlines() if line.startswith("| learned schedule |"))
    return [[float(v) for v in block.split()] for block in row.rsplit(": ", 1)[1].rstrip(" |").split(" / ")]
