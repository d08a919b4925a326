"""A training recipe: a run's DiffCR settings and training settings in one JSON file, so that a published recipe
(the paper authors' PixArt-Sigma 512 run, `configs/recipes/`) is one flag: `diffcr compress --recipe FILE`.

The file is data like every config here: `_type` / `_version`, unknown keys refused, every value checked by the
dataclass it fills (`DiffCRConfig`, `TrainConfig`). A recipe sets the starting values; a flag given on the
command line overrides the recipe's value for that setting, so `--recipe R --steps 100` is R, shorter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from diffcr.config import DiffCRConfig
from diffcr.train.config import TrainConfig

RECIPE_TYPE = "DiffCRRecipe"
RECIPE_VERSION = 1
RECIPE_KEYS = ("_type", "_version", "about", "diffcr", "train")


@dataclass(frozen=True)
class Recipe:
    """What a recipe file holds.

    Attributes:
        diffcr: the DiffCR settings (routers, ratios, gate, ratio loss).
        train: `TrainConfig` fields the recipe sets (the others keep their defaults); already validated.
        about: where the recipe comes from, for a person reading it.
    """

    diffcr: DiffCRConfig
    train: dict = field(default_factory=dict)
    about: str = ""

    @classmethod
    def from_dict(cls, payload, source: str = "the recipe") -> Recipe:
        """Check and read a recipe's JSON object.

        Raises:
            ValueError: not a recipe, a newer version, an unknown key, or a value its dataclass refuses.
        """
        if not isinstance(payload, dict):
            raise ValueError(f"{source} holds a JSON {type(payload).__name__}, not a {RECIPE_TYPE} object")
        if payload.get("_type") != RECIPE_TYPE:
            raise ValueError(
                f"{source} is not a training recipe (_type {payload.get('_type')!r}, expected {RECIPE_TYPE!r}); a "
                "DiffCRConfig alone goes to --config, a recipe (DiffCR and training settings) to --recipe"
            )
        version = payload.get("_version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise ValueError(f"{source}: recipe version {version!r} is newer than this diffcr reads; upgrade diffcr")
        unknown = sorted(set(payload) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown recipe keys {unknown}; a recipe holds {list(RECIPE_KEYS)}")
        if "diffcr" not in payload:
            raise ValueError(f"{source}: a recipe needs a 'diffcr' object (a DiffCRConfig, as in configs/*.json)")
        try:
            diffcr_config = DiffCRConfig.from_dict(payload["diffcr"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: its 'diffcr' settings are invalid: {err}") from err
        train = payload.get("train", {})
        if not isinstance(train, dict):
            raise ValueError(f"{source}: 'train' must be an object of TrainConfig keys, not {type(train).__name__}")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training keys {unknown}; valid keys: {sorted(known)}")
        try:
            TrainConfig(**train)  # every value checked now, not when the run starts
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: its 'train' settings are invalid: {err}") from err
        return cls(diffcr=diffcr_config, train=dict(train), about=str(payload.get("about", "")))

    @classmethod
    def from_json(cls, path: str | Path) -> Recipe:
        """Read a recipe file (e.g. `configs/recipes/pixart_sigma_512_authors.json`).

        Raises:
            FileNotFoundError: no file there.
            ValueError: not valid JSON, or not a valid recipe (see `from_dict`).
        """
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"--recipe {path} {what}; pass a recipe JSON file, e.g. configs/recipes/*.json")
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--recipe {path} is not valid JSON ({err})") from err
        return cls.from_dict(payload, source=f"--recipe {path}")

    def train_settings(self, flags: dict, given: set[str]) -> dict:
        """`TrainConfig` keyword arguments: the flags' defaults, then the recipe, then the flags a person gave.

        Args:
            flags: every training setting the command line has, by `TrainConfig` field name.
            given: the fields whose flag was given on the command line (those win over the recipe).
        """
        return {**flags, **self.train, **{name: flags[name] for name in given if name in flags}}

    def diffcr_config(self, overrides: dict) -> DiffCRConfig:
        """The recipe's DiffCR settings with the fields of `overrides` (flags given on the command line)."""
        return self.diffcr.replace(**overrides) if overrides else self.diffcr
