"""Digit scenes: captioned 64x64 images built from the bundled MNIST-5k digits, for the text-to-image default.

A scene is a black 64x64 canvas with two slots, left (columns 0-31) and right (columns 32-63). Each slot is
empty or holds one digit, centred in its slot with at most 2 px of jitter, `large` (28 px) or `small` (20 px).
The caption says what is where, in varied wording ("a 3 on the left and a 7 on the right", "a small five on
the right", "left: two, right: nine"), so a judge can score an image from its prompt alone (`diffcr.scene_judge`).
A caption with two digits names the left slot's first (`names_right_slot_first`); the judge reads either order.

Training scenes use the training digits and never pair the `HELDOUT_PAIRS` compositions; evaluation scenes
use the held-out digits. Everything is deterministic for (split, seed, index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CANVAS = 64
SLOT_WIDTH = 32
SIZES = {"large": 28, "small": 20}
JITTER = 2
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIDES = ("left", "right")
# (left, right) digit pairs that no training scene holds: each digit once on each side, never twice the same
HELDOUT_PAIRS = tuple((left, (3 * left + 7) % 10) for left in range(10))
# the composition mix of training scenes
P_TWO_DIGITS = 0.6
P_SIZE_MENTIONED = 0.5


@dataclass(frozen=True)
class SceneSpec:
    """What a scene holds: a digit (0-9) or None per slot, and each digit's size ("large" or "small")."""

    left: int | None
    right: int | None
    left_size: str = "large"
    right_size: str = "large"

    def __post_init__(self):
        if self.left is None and self.right is None:
            raise ValueError("a scene holds at least one digit")
        for digit in (self.left, self.right):
            if digit is not None and digit not in range(10):
                raise ValueError(f"digit {digit!r} must be 0-9 or None (an empty slot)")
        for size in (self.left_size, self.right_size):
            if size not in SIZES:
                raise ValueError(f"size {size!r} must be one of {sorted(SIZES)}")

    @property
    def digits(self) -> tuple[int | None, int | None]:
        return (self.left, self.right)

    @property
    def is_heldout_composition(self) -> bool:
        return (self.left, self.right) in HELDOUT_PAIRS


def _digit_phrase(digit: int, size: str | None, as_word: bool) -> str:
    name = DIGIT_WORDS[digit] if as_word else str(digit)
    words = [size, name] if size else [name]
    phrase = " ".join(words)
    article = "an" if phrase[0] in "8e" or phrase.startswith(("eight", "8")) else "a"
    return f"{article} {phrase}"


def caption_for(spec: SceneSpec, gen: torch.Generator) -> str:
    """A caption for `spec` in one of the grammar's wordings, drawn with `gen`."""

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    def phrase(digit: int, size: str) -> str:
        mention_size = torch.rand(1, generator=gen).item() < P_SIZE_MENTIONED
        shown_size = ("big" if size == "large" and draw(2) else size) if mention_size else None
        return _digit_phrase(digit, shown_size, as_word=bool(draw(2)))

    if spec.left is not None and spec.right is not None:
        left, right = phrase(spec.left, spec.left_size), phrase(spec.right, spec.right_size)
        bare_left, bare_right = left.split(" ", 1)[1], right.split(" ", 1)[1]
        # the left slot is named first: this base binds a caption's digits to the slots by their order, and
        # captions naming the right slot first taught it nothing (docs/RESULTS.md, "Which digit goes where")
        templates = (
            f"{left} on the left and {right} on the right",
            f"{bare_left} on the left, {bare_right} on the right",
            f"left: {bare_left}, right: {bare_right}",
        )
        return templates[draw(len(templates))]
    side = "left" if spec.left is not None else "right"
    other = "right" if side == "left" else "left"
    digit, size = (spec.left, spec.left_size) if side == "left" else (spec.right, spec.right_size)
    one = phrase(digit, size)
    templates = (
        f"{one} on the {side}",
        f"{one.split(' ', 1)[1]} on the {side}",
        f"{one} on the {side} and nothing on the {other}",
        f"{one} on the {side}, the {other} empty",
    )
    return templates[draw(len(templates))]


_WORD_TO_DIGIT = {word: d for d, word in enumerate(DIGIT_WORDS)} | {str(d): d for d in range(10)}
_SLOT_PATTERN = re.compile(r"(?:(small|large|big)\s+)?\b(\d|" + "|".join(DIGIT_WORDS) + r")\b[^,]*?\b(left|right)\b")
_LABELLED_PATTERN = re.compile(r"\b(left|right):\s*(?:(small|large|big)\s+)?(\d|" + "|".join(DIGIT_WORDS) + r")\b")


def parse_caption(caption: str) -> SceneSpec:
    """The scene a caption of the grammar asks for (sizes not mentioned read as "large").

    Raises:
        ValueError: the caption names no digit at a side, or two digits at one side.
    """
    text = caption.lower().strip()
    found: dict[str, tuple[int, str]] = {}
    matches = [(m.group(1), m.group(2), m.group(3)) for m in _LABELLED_PATTERN.finditer(text)]
    if not matches:
        for part in re.split(r",| and ", text):
            m = _SLOT_PATTERN.search(part)
            if m:
                matches.append((m.group(3), m.group(1), m.group(2)))
    for side, size, digit_text in matches:
        if side in found:
            raise ValueError(f"caption {caption!r} names two digits on the {side}")
        size = "large" if size in (None, "big") else size
        found[side] = (_WORD_TO_DIGIT[digit_text], size)
    if not found:
        raise ValueError(
            f"caption {caption!r} is not in the digit-scene grammar: say which digit is on the left and/or the "
            "right, e.g. 'a 4 on the left and a 1 on the right' or 'a small five on the right'"
        )
    left, right = found.get("left", (None, "large")), found.get("right", (None, "large"))
    return SceneSpec(left[0], right[0], left[1], right[1])


def names_right_slot_first(caption: str) -> bool:
    """Whether `caption` asks for two digits and names the right slot's first ("a 7 on the right and a 3 on the
    left", "right: seven, left: three").

    Training captions name the left slot first, and the shipped base binds a caption's digits to the slots by their
    order: it draws such a caption swapped most of the time (docs/RESULTS.md, "Which digit goes where"). A caption
    outside the grammar is not such a caption.
    """
    try:
        spec = parse_caption(caption)
    except ValueError:
        return False
    if None in spec.digits:
        return False
    text = caption.lower()
    return text.index("right") < text.index("left")


class DigitScenes:
    """Scenes from one split of the bundled digits.

    Args:
        split: "train" (the training digits; no scene pairs a `HELDOUT_PAIRS` composition) or "heldout" (the
            held-out digits; any composition).
        seed: what every scene's draw starts from.

    Example:
        >>> scenes = DigitScenes("train")
        >>> images, captions, specs, masks = scenes.batch(torch.arange(2))
        >>> tuple(images.shape), tuple(masks.shape)
        ((2, 1, 64, 64), (2, 64, 64))
    """

    def __init__(self, split: str = "train", seed: int = 0):
        from diffcr.data.mnist import load_mnist5k, split_train_heldout

        if split not in ("train", "heldout"):
            raise ValueError(f"split {split!r} must be 'train' or 'heldout'")
        self.split = split
        self.seed = seed
        train, heldout = split_train_heldout(load_mnist5k())
        digits = train if split == "train" else heldout
        # back from 32x32 in [-1, 1] to the 28x28 originals in [0, 1]
        self.digit_images = ((digits.images[:, :, 2:30, 2:30] + 1) / 2).clamp(0, 1)  # (n, 1, 28, 28)
        self.digit_labels = digits.labels
        self._by_class = [torch.nonzero(digits.labels == d).flatten() for d in range(10)]
        self._resized = {size: self._resize(px) for size, px in SIZES.items()}

    def _resize(self, pixels: int) -> torch.Tensor:
        if pixels == 28:
            return self.digit_images
        return F.interpolate(self.digit_images, size=(pixels, pixels), mode="bilinear", antialias=True)

    def _generator(self, index: int) -> torch.Generator:
        offset = 0 if self.split == "train" else 500_009
        return torch.Generator().manual_seed((self.seed * 1_000_003 + offset + index) % (2**63))

    def spec(self, index: int) -> SceneSpec:
        """The scene at `index`: its composition and sizes."""
        gen = self._generator(index)
        return self._draw_spec(gen)

    def _draw_spec(self, gen: torch.Generator) -> SceneSpec:
        sizes = [("large", "small")[int(torch.randint(2, (1,), generator=gen))] for _ in range(2)]
        if torch.rand(1, generator=gen).item() < P_TWO_DIGITS:
            while True:
                left, right = (int(d) for d in torch.randint(10, (2,), generator=gen))
                if self.split == "heldout" or (left, right) not in HELDOUT_PAIRS:
                    return SceneSpec(left, right, sizes[0], sizes[1])
        digit = int(torch.randint(10, (1,), generator=gen))
        if torch.rand(1, generator=gen).item() < 0.5:
            return SceneSpec(digit, None, sizes[0], "large")
        return SceneSpec(None, digit, "large", sizes[1])

    def scene(self, index: int) -> tuple[torch.Tensor, str, SceneSpec, torch.Tensor]:
        """(image (1, 64, 64) in [-1, 1], caption, spec, digit mask (64, 64) bool) of scene `index`."""
        gen = self._generator(index)
        spec = self._draw_spec(gen)
        caption = caption_for(spec, gen)
        image, mask = self.render(spec, gen)
        return image, caption, spec, mask

    def render(self, spec: SceneSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `spec` with digits and jitter from `gen`: (image (1, 64, 64) in [-1, 1], mask (64, 64) bool)."""
        canvas = torch.zeros(CANVAS, CANVAS)
        for slot, (digit, size) in enumerate(((spec.left, spec.left_size), (spec.right, spec.right_size))):
            if digit is None:
                continue
            pool = self._by_class[digit]
            pick = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            glyph = self._resized[size][pick, 0]  # (s, s)
            side = glyph.shape[0]
            dy, dx = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=gen))
            top = (CANVAS - side) // 2 + dy
            left = slot * SLOT_WIDTH + (SLOT_WIDTH - side) // 2 + dx
            top, left = (
                max(0, min(CANVAS - side, top)),
                max(slot * SLOT_WIDTH, min(slot * SLOT_WIDTH + SLOT_WIDTH - side, left)),
            )
            region = canvas[top : top + side, left : left + side]
            canvas[top : top + side, left : left + side] = torch.maximum(region, glyph)
        mask = canvas > 0.5
        return (canvas * 2 - 1).unsqueeze(0), mask

    def batch(self, indices) -> tuple[torch.Tensor, list[str], list[SceneSpec], torch.Tensor]:
        """Scenes at `indices`: images (b, 1, 64, 64) in [-1, 1], captions, specs, masks (b, 64, 64)."""
        scenes = [self.scene(int(i)) for i in indices]
        images = torch.stack([s[0] for s in scenes])
        masks = torch.stack([s[3] for s in scenes])
        return images, [s[1] for s in scenes], [s[2] for s in scenes], masks


def evaluation_prompts() -> list[tuple[str, str]]:
    """The fixed evaluation prompts as (prompt, kind), kind "heldout" (a composition no training scene holds),
    "seen" (a two-digit composition that training scenes hold) or "single" (one digit, the other slot empty).

    Every digit appears on each side in each kind, in several wordings.
    """
    prompts = []

    def numeral(digit: int) -> str:  # "a 3", "an 8", as training captions write them
        return _digit_phrase(digit, None, as_word=False)

    for left, right in HELDOUT_PAIRS:
        prompts.append((f"{numeral(left)} on the left and {numeral(right)} on the right", "heldout"))
        prompts.append((f"{DIGIT_WORDS[left]} on the left, {DIGIT_WORDS[right]} on the right", "heldout"))
    for left in range(10):
        right = (left + 2) % 10  # never a held-out pair: 3l + 7 = l + 2 (mod 10) has no solution
        prompts.append((f"{numeral(left)} on the left and {numeral(right)} on the right", "seen"))
        prompts.append((f"left: {DIGIT_WORDS[left]}, right: {DIGIT_WORDS[right]}", "seen"))
    for digit in range(10):
        side = SIDES[digit % 2]
        prompts.append(
            (
                _digit_phrase(digit, "small" if digit < 5 else None, as_word=bool(digit % 3)) + f" on the {side}",
                "single",
            )
        )
    return prompts
