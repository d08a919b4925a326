"""`diffcr prepare`: image-caption sources encoded once with a tiny PixArt-Sigma pipeline built offline."""

from __future__ import annotations

import json

import pytest
import torch

from diffcr.data.captions import read_caption_source
from diffcr.data.latent_cache import LatentCaptionDataset, load_text_to_image_pipeline, prepare_cache
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "pipe")


def test_folder_source_reports_bad_records_by_name(tmp_path):
    folder = write_caption_folder(tmp_path / "data", count=3)
    (folder / "blank.png").write_bytes((folder / "img00.png").read_bytes())
    (folder / "blank.txt").write_text("   ")
    (folder / "nocap.png").write_bytes((folder / "img00.png").read_bytes())
    source = read_caption_source(folder)
    assert [r.caption for r in source.records] == ["a zero on the right", "a one on the left", "a two on the right"]
    reasons = {name.rsplit("/", 1)[-1]: why for name, why in source.skipped}
    assert reasons == {"blank.txt": "empty caption", "nocap.png": "image with no caption file nocap.txt"}


def test_a_caption_with_no_image_is_an_error(tmp_path):
    # a caption the user wrote whose image is gone (renamed, lost) must not be trained around in silence
    folder = write_caption_folder(tmp_path / "data", count=2)
    (folder / "orphan.txt").write_text("a cat")
    (folder / "lost.txt").write_text("a dog")
    expected = r"captions with no image \(2 \.txt files with no image of the same name\): .*lost\.txt, .*orphan\.txt"
    with pytest.raises(ValueError, match=expected):
        read_caption_source(folder)


def test_subfolders_pair_each_image_with_the_caption_beside_it(tmp_path):
    # the same file names in two subfolders are two records, each with its own caption
    png = write_caption_folder(tmp_path / "src", count=1) / "img00.png"
    for sub, caption in (("a", "a cat"), ("b", "a dog")):
        (tmp_path / "data" / sub).mkdir(parents=True)
        (tmp_path / "data" / sub / "0001.png").write_bytes(png.read_bytes())
        (tmp_path / "data" / sub / "0001.txt").write_text(caption)
    (tmp_path / "data" / "b" / "0002.png").write_bytes(png.read_bytes())
    (tmp_path / "data" / "0002.txt").write_text("a red cat")  # not b/0002.png's caption: another folder
    with pytest.raises(ValueError, match=r"captions with no image \(1 .*\): .*data/0002\.txt"):
        read_caption_source(tmp_path / "data")
    (tmp_path / "data" / "0002.txt").unlink()
    source = read_caption_source(tmp_path / "data")
    pairs = [(name.split("data/")[1], r.caption) for r in source.records for name in [r.name]]
    assert pairs == [("a/0001.png", "a cat"), ("b/0001.png", "a dog")]
    assert [(name.split("data/")[1], why) for name, why in source.skipped] == [
        ("b/0002.png", "image with no caption file b/0002.txt")
    ]


def test_two_images_sharing_one_caption_are_refused(tmp_path):
    folder = write_caption_folder(tmp_path / "data", count=2)
    (folder / "img01.jpg").write_bytes((folder / "img01.png").read_bytes())
    expected = r"1 caption files that more than one image would share \(img01\.txt: .*img01\.jpg, .*img01\.png\)"
    with pytest.raises(ValueError, match=expected):
        read_caption_source(folder)
    # with no caption file, both images are skipped and reported, as any image without a caption
    (folder / "img01.txt").unlink()
    skipped = [name.rsplit("/", 1)[-1] for name, _ in read_caption_source(folder).skipped]
    assert skipped == ["img01.jpg", "img01.png"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_sources(tmp_path, kind):
    folder = write_caption_folder(tmp_path / "data", count=2)
    rows = [{"image": "data/img00.png", "caption": "a cat"}, {"image": "data/missing.png", "caption": "a dog"}]
    path = tmp_path / f"manifest.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    expected = rf"captions with no image \(1 rows whose image .*\): manifest\.{kind} row 2 .*missing"
    with pytest.raises(ValueError, match=expected):
        read_caption_source(path)
    path.write_text(path.read_text().replace("missing.png", "img01.png"))
    source = read_caption_source(path)
    assert [(r.caption, r.image) for r in source.records] == [
        ("a cat", folder / "img00.png"),
        ("a dog", folder / "img01.png"),
    ]
    bad = tmp_path / f"bad.{kind}"
    bad.write_text('{"img": "x"}\n' if kind == "jsonl" else "img,text\nx,y\n")
    with pytest.raises(ValueError, match="needs an 'image'"):
        read_caption_source(bad)


def test_prepare_encodes_skips_and_resumes(tmp_path, pipeline_dir):
    folder = write_caption_folder(tmp_path / "data", count=5)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken.txt").write_text("a dog")
    manifest = prepare_cache(pipeline_dir, folder, tmp_path / "cache", shard_size=4, progress=False)
    assert manifest["complete"] and manifest["count"] == 5
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_shape"] == [300, 16]
    assert [s["count"] for s in manifest["shards"]] == [3, 2]  # the broken image was in the first shard
    assert any(name.endswith("broken.png") and "unreadable image" in why for name, why in manifest["skipped"])
    # the cached latents are the pipeline's own VAE mean x scaling factor, and the text its own encode_prompt
    pipe = load_text_to_image_pipeline(pipeline_dir)
    dataset = LatentCaptionDataset(tmp_path / "cache")
    latents, text = dataset[0]
    embeds, mask = text["prompt_embeds"], text["prompt_attention_mask"]
    from diffcr.data.latent_cache import load_image

    with torch.no_grad():
        pixels = load_image(folder / "img00.png", 16)[None]
        expected = pipe.vae.encode(pixels).latent_dist.mean[0] * pipe.vae.config.scaling_factor
        text, text_mask, _, _ = pipe.encode_prompt("a zero on the right", do_classifier_free_guidance=False)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds, text[0].to(torch.bfloat16).float())
    assert mask.tolist() == text_mask[0].tolist() and mask.sum() < 300
    # a rerun keeps the finished shards as they are
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*")}
    again = prepare_cache(pipeline_dir, folder, tmp_path / "cache", shard_size=4, progress=False)
    assert again["count"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*")} == before
    # another resolution into the same folder is refused
    with pytest.raises(ValueError, match="made with another resolution"):
        prepare_cache(pipeline_dir, folder, tmp_path / "cache", resolution=32, shard_size=4, progress=False)


def test_prepare_refuses_what_is_not_a_pixart_pipeline(tmp_path, pipeline_dir):
    from diffusers import PixArtTransformer2DModel

    folder = write_caption_folder(tmp_path / "data", count=1)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        prepare_cache(tmp_path / "data", folder, tmp_path / "cache", progress=False)
    transformer_only = tmp_path / "transformer"
    PixArtTransformer2DModel.from_pretrained(pipeline_dir, subfolder="transformer").save_pretrained(transformer_only)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        prepare_cache(transformer_only, folder, tmp_path / "cache", progress=False)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline"):
        prepare_cache(other, folder, tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="must be a positive multiple of 4"):
        prepare_cache(pipeline_dir, folder, tmp_path / "cache", resolution=18, progress=False)


def test_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.new("RGB", (20, 24), (i * 40, 0, 0)) for i in range(3)]
    table = datasets.Dataset.from_dict({"image": images, "caption": ["a cat", "", "two dogs"]})
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "ds"))
    source = read_caption_source(tmp_path / "ds")
    assert [r.caption for r in source.records] == ["a cat", "two dogs"]
    assert source.skipped == [("ds[1]", "empty caption")]
    assert source.records[1].image.size == (20, 24)
    table.select([0]).remove_columns("caption").save_to_disk(str(tmp_path / "nocap"))
    with pytest.raises(ValueError, match="needs 'image' and 'caption' columns"):
        read_caption_source(tmp_path / "nocap")


def test_prepare_with_no_readable_image_leaves_no_folder(tmp_path, pipeline_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    (data / "a.txt").write_text("a cat")
    with pytest.raises(ValueError, match="no image of .* could be encoded"):
        prepare_cache(pipeline_dir, data, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
