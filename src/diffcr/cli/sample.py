"""`diffcr sample`: samples from a base model with or without a DiffCR artifact: class-conditional for a DiT,
text-to-image through the diffusers pipeline for a PixArt pipeline (`--prompt` / `--prompts`)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import DTYPE_HELP, TRANSFORMER_HELP, TRANSFORMER_SUBFOLDER_HELP, friendly_errors


@app.command()
@friendly_errors
def sample(
    base: str = typer.Option(
        "default", help="base model: 'default' (shipped DiT), a diffusers DiT folder / repo id, or a PixArt pipeline"
    ),
    artifact: str = typer.Option("default", help="DiffCR artifact folder, 'default' (shipped) or 'none' (dense)"),
    classes: str = typer.Option("0-9", help="class ids, e.g. '0-9' or '1,3,5'"),
    prompt: str = typer.Option(None, help="text-to-image: one prompt (with a PixArt pipeline as --base)"),
    prompts: Path = typer.Option(None, help="text-to-image: a text file, one prompt a line"),
    negative_prompt: str = typer.Option("", help="text-to-image: the unconditional text of guidance"),
    height: int = typer.Option(None, help="text-to-image: pixels (default: the transformer's native size)"),
    width: int = typer.Option(None, help="text-to-image: pixels (default: the transformer's native size)"),
    num: int = typer.Option(8, help="images per class (or per prompt)"),
    seed: int = typer.Option(0, help="image i uses seed + i, whatever the batch size or process count"),
    scheduler: str = typer.Option(
        None,
        help="class-conditional only: ddim (default) or dpm (DPM-Solver++); text-to-image samples with the "
        "pipeline's own scheduler, and refuses this flag",
    ),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(None, help="classifier-free guidance (default 3.0; 4.5 for text)"),
    batch_size: int = typer.Option(None, help="images per model call (default 50; 1 for text, exact per seed)"),
    out: Path = typer.Option(
        Path("samples.png"), help="PNG grid (one row per class or prompt); text-to-image also writes each image"
    ),
    npz: Path = typer.Option(None, help="also write arr_0 (n, H, W, C) uint8 and labels (or prompts) to this .npz"),
    threads: int = typer.Option(2, help="CPU threads per process"),
    transformer: str = typer.Option(None, help=TRANSFORMER_HELP),
    transformer_subfolder: str = typer.Option("transformer", help=TRANSFORMER_SUBFOLDER_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
) -> None:
    """Sample images; under `accelerate launch` each process makes its shard of the seeds.

    Text-to-image: image i is the plain pipeline's image (loaded in the same --dtype) for the generator seeded
    seed + i, called with clean_caption=False (prompts are used as typed: PixArt's caption cleaning needs bs4 and
    ftfy) and use_resolution_binning=False (--height / --width are what you get), at --batch-size 1.
    """
    import os

    import torch
    from accelerate import Accelerator

    from diffcr.checkpoint import check_writable_file
    from diffcr.cli.common import check_int
    from diffcr.models import null_class_id
    from diffcr.sampling import (
        SampleConfig,
        class_labels,
        image_format,
        image_grid,
        parse_classes,
        sample_sharded,
        save_npz,
        save_png,
    )
    from diffcr.train import load_compressed

    if prompt is not None or prompts is not None:
        if scheduler is not None:
            raise ValueError(
                "--scheduler picks the class-conditional sampler; text-to-image samples with the pipeline's own "
                "scheduler (drop --scheduler)"
            )
        options = dict(negative_prompt=negative_prompt, height=height, width=width, num=num, seed=seed, steps=steps)
        options.update(
            guidance_scale=4.5 if guidance_scale is None else guidance_scale,
            batch_size=1 if batch_size is None else batch_size,
        )
        from diffcr.data.latent_cache import resolve_pipeline_dtype

        source = {"transformer": transformer, "transformer_subfolder": transformer_subfolder}
        source["torch_dtype"] = resolve_pipeline_dtype(dtype)
        return sample_text(base, artifact, prompt, prompts, out, npz, threads, source, **options)
    if transformer is not None:
        raise ValueError("--transformer replaces a text-to-image pipeline's transformer: pass --prompt or --prompts")
    from diffcr.data.latent_cache import is_text_to_image_pipeline

    if is_text_to_image_pipeline(base):
        raise ValueError(f"--base {base} is a text-to-image pipeline: pass --prompt TEXT or --prompts FILE")
    # 1. every option and every output path is checked before the model is loaded or anything is written
    guidance_scale = 3.0 if guidance_scale is None else guidance_scale
    cfg = SampleConfig(
        scheduler="ddim" if scheduler is None else scheduler,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=50 if batch_size is None else batch_size,
        seed=seed,
    )
    check_int("--num", num, 1, MAX_PER_CLASS, "images per class; the grid puts them in one row")
    check_int("--threads", threads, 1, max(64, 4 * (os.cpu_count() or 1)), "CPU threads per process")
    check_writable_file(out, "--out")
    image_format(out)
    if npz is not None:
        check_writable_file(npz, "--npz")
        if npz.resolve() == out.resolve():
            raise ValueError(f"--npz and --out are the same file {out}; give them different names")

    # 2. the model, the classes it knows, the images
    torch.set_num_threads(threads)
    model = load_compressed(base, artifact)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device)
    class_ids = parse_classes(classes, null_class_id(model))
    check_int("--num x classes", num * len(class_ids), 1, MAX_IMAGES, "images in one call")
    labels = class_labels(class_ids, num)
    images = sample_sharded(model, labels, cfg, null_class_id(model), accelerator, progress=True)
    if images is None:
        return

    # 3. both outputs, each written atomically, after every folder they need exists
    for path in (out, npz):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, image_grid(images, columns=num))
    if npz is not None:
        save_npz(npz, images, labels)
    typer.echo(f"{len(images)} images -> {out}" + (f" and {npz}" if npz else ""))


MAX_PER_CLASS = 10_000
MAX_IMAGES = 1_000_000


def sample_text(
    base, artifact, prompt, prompts_file, out: Path, npz: Path | None, threads: int, source: dict, **options
) -> None:
    """Text-to-image through the PixArt pipeline at `base` (with `source`'s transformer, when one is given), with
    the DiffCR artifact (or dense)."""
    import numpy as np
    import torch
    from accelerate import Accelerator

    from diffcr.checkpoint import check_writable_file
    from diffcr.cli.common import check_int

    # 1. options and output paths, before the pipeline is loaded
    from diffcr.data.latent_cache import SHIPPED_TEXT_TO_IMAGE
    from diffcr.sampling import array_grid, image_format, save_png
    from diffcr.text_to_image import (
        PromptSampleConfig,
        image_seeds,
        load_pipeline,
        read_prompts,
        sample_prompts,
        save_images,
        save_npz,
    )

    if str(artifact) == "default" and str(base) != SHIPPED_TEXT_TO_IMAGE:
        raise ValueError(
            "--artifact default is the shipped text-to-image default's (--base t2i); for another pipeline pass "
            "--artifact DIR (a compress run's artifact/ or model/ folder) or --artifact none for the dense pipeline"
        )
    texts = read_prompts(prompt, prompts_file)
    if str(base) == SHIPPED_TEXT_TO_IMAGE:
        warn_right_slot_first(texts)
    check_int("--threads", threads, 1, 4096, "CPU threads per process")
    cfg = PromptSampleConfig(
        steps=options["steps"],
        guidance_scale=options["guidance_scale"],
        negative_prompt=options["negative_prompt"],
        num_per_prompt=options["num"],
        seed=options["seed"],
        height=options["height"],
        width=options["width"],
        batch_size=options["batch_size"],
    )
    check_writable_file(out, "--out")
    image_format(out)
    folder = out.with_suffix("")  # each image goes here
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: the images go to the folder {folder}, which is a file; choose another --out")
    if npz is not None:
        check_writable_file(npz, "--npz")
        if npz.suffix != ".npz":
            raise ValueError(f"--npz {npz} must end in .npz (numpy would add the suffix to the name)")
        if npz.resolve() == out.resolve():
            raise ValueError(f"--npz and --out are the same file {out}; give them different names")

    # 2. the pipeline and this process's share of the images
    torch.set_num_threads(threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = load_pipeline(base, artifact, **source).to(accelerator.device)
    total = len(image_seeds(len(texts), cfg))
    mine = list(range(accelerator.process_index, total, accelerator.num_processes))
    images = sample_prompts(pipe, texts, cfg, indices=mine, progress=accelerator.is_main_process)
    if accelerator.num_processes > 1:
        shares = accelerator.gather_for_metrics([(mine, images)], use_gather_object=True)
        if not accelerator.is_main_process:
            return
        ordered = [None] * total
        for indices, part in shares:
            for i, image in zip(indices, part):
                ordered[i] = image
        images = np.stack(ordered)

    # 3. the outputs: each image, the grid (one row per prompt), the npz
    save_images(folder, images, texts, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, array_grid(images, cfg.num_per_prompt))
    if npz is not None:
        npz.parent.mkdir(parents=True, exist_ok=True)
        save_npz(npz, images, texts, cfg)
    typer.echo(f"{len(images)} images -> {folder}/ and {out}" + (f" and {npz}" if npz else ""))


def warn_right_slot_first(texts: list[str]) -> None:
    """Warn about prompts the shipped text-to-image default is likely to draw swapped."""
    import logging

    from diffcr.data.scenes import names_right_slot_first

    for text in texts:
        if names_right_slot_first(text):
            logging.getLogger(__name__).warning(
                "%r names the right slot first; the shipped text-to-image default reads a prompt's digits in "
                "order, left slot first, and usually draws such a prompt swapped: write the left digit first, "
                "e.g. 'a 3 on the left and a 7 on the right'",
                text,
            )
