"""Judge generated digit scenes (`diffcr.data.scenes`) against their prompts, with the shipped digit classifier.

Each 64x64 image has two slots, left (columns 0-31) and right (columns 32-63). A slot is read as empty when it
holds fewer than `EMPTY_INK_PIXELS` ink pixels (brightness > 0.5) once stray specks are dropped; otherwise its ink
is cut out, scaled so its longest side is 20 px and centred on a 32x32 black canvas — the MNIST normalisation the
classifier was trained on — and classified. `prompt_accuracy` pools the verdicts per prompt kind, `scene_fid` is
FID in the classifier's feature space of both slots, and `stroke_token_masks` says which transformer tokens
cover digit ink (for router-map agreement).

Image formats accepted everywhere (see `to_gray`): torch float (b, C, 64, 64) in [-1, 1] (the repo's tensors),
uint8 (b, 64, 64, 3) / (b, 3, 64, 64) in [0, 255] (the text-to-image pipeline's output, and what torchmetrics
passes), numpy float (b, 64, 64, C) in [0, 1] (diffusers' output_type="np").
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffcr.data.scenes import CANVAS, SLOT_WIDTH, parse_caption
from diffcr.models.classifier import FEATURE_DIM

# A slot is empty below this many stroke pixels. Empty slots of real scenes hold none; the faintest of the 5000
# bundled digits (thin "1"s drawn small, 20 px) hold 7, 7, 9, 10, 12 and the 1st percentile 19 (large digits: at
# least 23). 6 keeps every real digit, while specks are already gone (`SPECK_PIXELS`), so what reads as a digit is
# a connected mark of at least 6 bright pixels.
EMPTY_INK_PIXELS = 6
# Connected ink components (8-neighbourhood) smaller than this are specks, not strokes: dropped before counting ink
# and before taking the bounding box, so a stray dot cannot make an empty slot "full" or stretch a digit's box.
SPECK_PIXELS = 3
# A component also counts as a speck when it is under this fraction of the slot's largest, so a blob of noise
# beside a digit does not stretch its box. On the 5000 bundled digits at both sizes this drops a piece of under 1%
# of the digits (at most 10 px) and changes no verdict on 2000 held-out scenes.
SPECK_FRACTION = 0.1
MNIST_BOX = 20  # side of the box the ink of an MNIST digit fills inside its 28x28 (and padded 32x32) image
CLASSIFIER_SIZE = 32
SLOT_CROP_ROWS = (16, 48)  # the 32 rows around each slot's centre, where every scene digit lies (+-2 px jitter)


@lru_cache(maxsize=1)
def _shipped_classifier():
    from diffcr.models.classifier import load_classifier

    return load_classifier()


def _classifier_or_default(classifier):
    return classifier if classifier is not None else _shipped_classifier()


def to_gray(images) -> torch.Tensor:
    """Images in any accepted format as grayscale float (b, 1, 64, 64) in [-1, 1].

    Args:
        images: torch or numpy, (b, H, W), (b, C, H, W) or (b, H, W, C) with C in {1, 3, 4} (the channel axis is
            axis 1 when it has 1, 3 or 4 entries, else the last; a 4th channel, alpha, is ignored). uint8 is read
            as [0, 255]; a float torch tensor as [-1, 1]; a float numpy array as [0, 1] (diffusers' "np" output).
            Sides other than 64 are resized to 64 (bilinear, antialiased).

    Returns:
        (b, 1, 64, 64) float32 in [-1, 1]: the channel mean, so RGB renderings of gray scenes judge as gray.
    """
    from_numpy = isinstance(images, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(images)) if from_numpy else images.detach().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (b, 1, H, W)
    if x.dim() != 4:
        raise ValueError(f"images must be (b, H, W) or 4-d with a channel axis, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4):
        if x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"images of shape {tuple(x.shape)} have no channel axis of 1, 3 or 4")
        x = x.permute(0, 3, 1, 2)  # (b, C, H, W)
    x = x[:, :3]  # alpha says nothing about brightness
    if x.dtype == torch.uint8:
        gray = x.float().mean(1, keepdim=True) / 127.5 - 1  # (b, 1, H, W)
    elif x.is_floating_point():
        gray = x.float().mean(1, keepdim=True)
        gray = gray * 2 - 1 if from_numpy else gray  # numpy floats are [0, 1], torch floats [-1, 1]
    else:
        raise TypeError(f"images must be uint8 or float, got {x.dtype}")
    if gray.shape[-2:] != (CANVAS, CANVAS):
        gray = F.interpolate(gray, size=(CANVAS, CANVAS), mode="bilinear", antialias=True, align_corners=False)
    return gray.clamp(-1, 1).contiguous()


def _slots(gray: torch.Tensor) -> torch.Tensor:
    """(b, 1, 64, 64) -> (b * 2, 64, 32): the left and right slot of each image, left first."""
    b = gray.shape[0]
    slots = gray[:, 0].reshape(b, CANVAS, 2, SLOT_WIDTH)  # (b, 64, 2, 32)
    return slots.permute(0, 2, 1, 3).reshape(b * 2, CANVAS, SLOT_WIDTH)  # (b*2, 64, 32)


def _strokes(ink: torch.Tensor) -> torch.Tensor:
    """Ink pixels that belong to strokes, not specks: (S, H, W) bool -> (S, H, W) bool.

    Labels each slot's 8-connected ink components (scipy, a dependency of mlxtend) and drops those smaller than
    `SPECK_PIXELS` or than `SPECK_FRACTION` of the slot's largest component.
    """
    from scipy import ndimage

    s, h, w = ink.shape
    # 8-connected within a slot, never across slots: the structure's outer planes (slot axis) are empty
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, count = ndimage.label(ink.numpy(), structure=structure)  # (S, H, W) int, 0 off ink; ids across slots
    labels = torch.from_numpy(labels).long()
    sizes = torch.bincount(labels.flatten(), minlength=count + 1)  # (count + 1,)
    sizes[0] = 0  # the background is no component
    pixel_sizes = sizes[labels]  # (S, H, W): size of the component each pixel is in, 0 off ink
    largest = pixel_sizes.flatten(1).amax(1).view(s, 1, 1)  # (S, 1, 1)
    return ink & (pixel_sizes >= SPECK_PIXELS) & (pixel_sizes >= SPECK_FRACTION * largest)


def _normalise(brightness: torch.Tensor, strokes: torch.Tensor) -> torch.Tensor:
    """One slot's ink as an MNIST-style digit: brightness (H, W) in [0, 1] and its strokes (H, W) bool ->
    (32, 32) in [0, 1], the strokes' bounding box scaled to a longest side of 20 px and centred."""
    rows = torch.nonzero(strokes.any(1)).flatten()
    cols = torch.nonzero(strokes.any(0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # keep the anti-aliased grey edges of the strokes (the classifier saw them), but not the specks' pixels
    near = F.max_pool2d(strokes[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0  # (H, W)
    crop = (brightness * near)[top:bottom, left:right]  # (h, w)
    h, w = crop.shape
    scale = MNIST_BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(crop[None, None], size=(new_h, new_w), mode="bilinear", antialias=True)[0, 0]
    canvas = torch.zeros(CLASSIFIER_SIZE, CLASSIFIER_SIZE)
    y, x = (CLASSIFIER_SIZE - new_h) // 2, (CLASSIFIER_SIZE - new_w) // 2
    canvas[y : y + new_h, x : x + new_w] = resized.clamp(0, 1)
    return canvas


def slot_crops(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's digit, normalised the way the classifier saw MNIST, and how much ink the slot holds.

    Ink is brightness > 0.5 (value > 0 in [-1, 1]). Specks — 8-connected ink components under `SPECK_PIXELS`
    pixels or under `SPECK_FRACTION` of the slot's largest component — are dropped first, from both the count and
    the bounding box. The remaining ink's bounding box is cropped, resized (bilinear, antialiased) so its longest
    side is 20 px with the aspect kept, and pasted centred on a black 32x32 canvas; a slot without strokes gives
    the black canvas.

    Args:
        images: b digit-scene images in any format `to_gray` takes, e.g. float (b, 1, 64, 64) in [-1, 1] or
            uint8 (b, 64, 64, 3).

    Returns:
        digits: (b, 2, 1, 32, 32) float in [-1, 1], slot 0 left, slot 1 right;
        ink: (b, 2) int64, stroke pixels per slot (compare with `EMPTY_INK_PIXELS`).
    """
    gray = to_gray(images)  # (b, 1, 64, 64)
    b = gray.shape[0]
    slots = _slots(gray)  # (b*2, 64, 32) in [-1, 1]
    brightness = (slots + 1) / 2  # (b*2, 64, 32) in [0, 1]
    strokes = _strokes(slots > 0)  # (b*2, 64, 32) bool
    ink = strokes.flatten(1).sum(1)  # (b*2,)
    digits = torch.zeros(b * 2, CLASSIFIER_SIZE, CLASSIFIER_SIZE)  # (b*2, 32, 32) in [0, 1]
    for i in torch.nonzero(ink > 0).flatten().tolist():
        digits[i] = _normalise(brightness[i], strokes[i])
    digits = (digits * 2 - 1).view(b, 2, 1, CLASSIFIER_SIZE, CLASSIFIER_SIZE)  # (b, 2, 1, 32, 32)
    return digits, ink.view(b, 2)


@torch.no_grad()
def read_slots(images, classifier=None) -> tuple[list[list[int | None]], torch.Tensor]:
    """What each slot shows: a digit 0-9, or None when it holds fewer than `EMPTY_INK_PIXELS` stroke pixels.

    Args:
        images: b digit-scene images in any format `to_gray` takes.
        classifier: a `DigitClassifier` on (B, 1, 32, 32); default the shipped one.

    Returns:
        predicted: b lists [left, right] of a digit or None;
        ink: (b, 2) stroke pixels per slot.
    """
    classifier = _classifier_or_default(classifier).eval()
    digits, ink = slot_crops(images)  # (b, 2, 1, 32, 32), (b, 2)
    b = digits.shape[0]
    device = next(classifier.parameters()).device
    flat = digits.view(b * 2, 1, CLASSIFIER_SIZE, CLASSIFIER_SIZE)  # (b*2, 1, 32, 32)
    chunks = [classifier(chunk.to(device)).argmax(1).cpu() for chunk in flat.split(1000)]
    labels = torch.cat(chunks).view(b, 2) if chunks else torch.zeros(b, 2, dtype=torch.long)  # (b, 2)
    empty = ink < EMPTY_INK_PIXELS  # (b, 2)
    predicted = [[None if empty[i, s] else int(labels[i, s]) for s in range(2)] for i in range(b)]
    return predicted, ink


def judge_images(images, prompts: list[str], classifier=None) -> list[dict]:
    """Judge each image against its prompt, slot by slot.

    A digit the prompt mentions is correct when its slot is not empty and the classifier reads that digit; a slot
    the prompt leaves empty is correct when it is empty. Sizes in the prompt are not judged.

    Args:
        images: b digit-scene images in any format `to_gray` takes.
        prompts: b prompts in the scene grammar (`diffcr.data.scenes.parse_caption`).
        classifier: a `DigitClassifier`; default the shipped one.

    Returns:
        One dict per image: "prompt"; "expected" and "predicted", [left, right] with None for empty;
        "ink" [left, right] stroke pixels; "digits_correct", "digits_mentioned", "empties_correct",
        "empties_expected" (ints); "all_correct" (bool).

    Raises:
        ValueError: the counts differ, or a prompt is not in the scene grammar.
    """
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    expected = [list(parse_caption(p).digits) for p in prompts]  # parse first: a bad prompt fails before any work
    predicted, ink = read_slots(images, classifier)
    verdicts = []
    for prompt, want, got, slot_ink in zip(prompts, expected, predicted, ink.tolist()):
        digits_correct = sum(w is not None and g == w for w, g in zip(want, got))
        empties_correct = sum(w is None and g is None for w, g in zip(want, got))
        digits_mentioned = sum(w is not None for w in want)
        empties_expected = 2 - digits_mentioned
        verdicts.append(
            {
                "prompt": prompt,
                "expected": want,
                "predicted": got,
                "ink": slot_ink,
                "digits_correct": digits_correct,
                "digits_mentioned": digits_mentioned,
                "empties_correct": empties_correct,
                "empties_expected": empties_expected,
                "all_correct": digits_correct == digits_mentioned and empties_correct == empties_expected,
            }
        )
    return verdicts


def _pool(verdicts: list[dict]) -> dict:
    """Pooled accuracies of some verdicts; a fraction with nothing to count is None."""

    def fraction(hits: str, total: str) -> float | None:
        denominator = sum(v[total] for v in verdicts)
        return sum(v[hits] for v in verdicts) / denominator if denominator else None

    return {
        "digit_accuracy": fraction("digits_correct", "digits_mentioned"),
        "empty_accuracy": fraction("empties_correct", "empties_expected"),
        "image_accuracy": sum(v["all_correct"] for v in verdicts) / len(verdicts) if verdicts else None,
        "num_images": len(verdicts),
    }


def prompt_accuracy(images, prompts: list[str], kinds: list[str] | None = None, classifier=None) -> dict:
    """How often images show what their prompts ask for, pooled over all images and per prompt kind.

    Args:
        images: b digit-scene images in any format `to_gray` takes.
        prompts: b prompts in the scene grammar.
        kinds: b kinds parallel to `prompts` (e.g. "heldout", "seen", "single" from
            `diffcr.data.scenes.evaluation_prompts`); None gives an empty "by_kind".
        classifier: a `DigitClassifier`; default the shipped one.

    Returns:
        {"digit_accuracy": correct / mentioned digits, "empty_accuracy": correct / expected empty slots,
        "image_accuracy": fraction of images entirely right, "num_images": b, "by_kind": {kind: the same four}};
        a fraction with nothing to count (e.g. no prompt leaves a slot empty) is None.
    """
    if kinds is not None and len(kinds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(kinds)} kinds")
    verdicts = judge_images(images, prompts, classifier)
    groups: dict[str, list[dict]] = defaultdict(list)
    for kind, verdict in zip(kinds or [], verdicts):
        groups[kind].append(verdict)
    return {**_pool(verdicts), "by_kind": {kind: _pool(group) for kind, group in groups.items()}}


class SceneFeatures(nn.Module):
    """The classifier's embedding of both slots as a torchmetrics feature extractor (FID / KID): (B, 256).

    Takes what `to_gray` takes as torch tensors: float (B, 1 or 3, H, W) in [-1, 1], as `feature_fid` feeds the
    images, or uint8 (B, 3, H, W), as `t2i_assess.fid` feeds them (torchmetrics hands a custom extractor the
    images untouched). Each slot's raw centre crop (rows 16:48, not re-normalised, so a digit's size and place
    still count) is embedded by `classifier.features`; left and right are concatenated, so swapped digits land
    elsewhere.
    """

    num_features = 2 * FEATURE_DIM  # read by torchmetrics

    def __init__(self, classifier=None):
        super().__init__()
        self.classifier = _classifier_or_default(classifier).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        gray = to_gray(images).to(device)  # (B, 1, 64, 64)
        top, bottom = SLOT_CROP_ROWS
        left = gray[:, :, top:bottom, :SLOT_WIDTH]  # (B, 1, 32, 32)
        right = gray[:, :, top:bottom, SLOT_WIDTH:]  # (B, 1, 32, 32)
        with torch.no_grad():
            return torch.cat([self.classifier.features(left), self.classifier.features(right)], 1).double()  # (B, 256)


def scene_fid(real, fake, classifier=None) -> float:
    """FID between two sets of digit scenes in the classifier's two-slot feature space (`SceneFeatures`).

    Args:
        real: reference scenes in any format `to_gray` takes.
        fake: generated scenes, likewise.
        classifier: a `DigitClassifier`; default the shipped one.

    Returns:
        The Frechet distance (biased upward for small sets: compare sets of equal size).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=SceneFeatures(classifier), reset_real_features=True)
    for images, is_real in ((real, True), (fake, False)):
        gray = to_gray(images)  # (n, 1, 64, 64): one format for the metric, whatever came in
        for chunk in gray.split(500):
            metric.update(chunk, real=is_real)
    return float(metric.compute())


def stroke_token_masks(images, latent_factor: int = 4, patch_size: int = 1) -> torch.Tensor:
    """Which transformer tokens cover digit ink: a token covers a (latent_factor * patch_size)-pixel square cell
    and counts when any pixel in it is ink (brightness > 0.5), specks included — for agreement with router maps.

    Args:
        images: b digit-scene images in any format `to_gray` takes.
        latent_factor: the VAE's downsampling (4: 64x64 pixels -> 16x16 latents).
        patch_size: the transformer's patch size in latents.

    Returns:
        (b, N) bool, tokens in raster order; N = (64 / (latent_factor * patch_size)) ** 2, 256 by default.
    """
    from diffcr.findings import stroke_tokens

    cell = latent_factor * patch_size
    if CANVAS % cell:
        raise ValueError(f"a token cell of {cell} px does not tile the {CANVAS}x{CANVAS} image")
    return stroke_tokens(to_gray(images), cell, threshold=0.0)  # (b, N)
