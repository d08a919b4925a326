"""Depth growth (`diffcr.models.growth`): the grown transformer computes what its source does, its new blocks are
copies with zero output projections, and `diffcr pretrain --init-from --num-layers` grows and resumes; dropping
blocks (`drop_blocks`, `--drop-blocks`) keeps the others as they were."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_pixart
from diffcr.models.growth import OUTPUT_PROJECTIONS, check_grown_matches, drop_blocks, grow_depth, growth_plan


def test_growth_plan_spreads_the_copies():
    assert growth_plan(8, 12) == [
        (0, False), (1, False), (1, True), (2, False), (3, False), (3, True),
        (4, False), (5, False), (5, True), (6, False), (7, False), (7, True),
    ]  # fmt: skip
    assert [b for b, copy in growth_plan(4, 8) if copy] == [0, 1, 2, 3]
    assert [b for b, copy in growth_plan(2, 7) if copy] == [0, 0, 1, 1, 1]
    for depth in range(1, 10):
        for grown in range(depth + 1, 3 * depth + 1):
            plan = growth_plan(depth, grown)
            assert len(plan) == grown and [b for b, copy in plan if not copy] == list(range(depth))
            assert [b for b, _ in plan] == sorted(b for b, _ in plan)
    with pytest.raises(ValueError, match="give more blocks"):
        growth_plan(8, 8)


def test_grown_transformer_computes_what_its_source_does():
    source = tiny_pixart(num_layers=4)
    # a source whose output projections are not zero, so a copy that kept them would change the output
    assert source.transformer_blocks[0].ff.net[2].weight.abs().sum() > 0
    grown = grow_depth(source, 6)
    assert grown.config.num_layers == 6 and len(grown.transformer_blocks) == 6
    check_grown_matches(source, grown, atol=1e-6)
    plan = growth_plan(4, 6)
    for index, (block, is_copy) in enumerate(plan):
        new, old = grown.transformer_blocks[index].state_dict(), source.transformer_blocks[block].state_dict()
        for name, value in new.items():
            if is_copy and name.startswith(OUTPUT_PROJECTIONS):
                assert not value.any(), (index, name)
            else:
                assert torch.equal(value, old[name]), (index, name)
    # once the copies train, the models part: the check says so
    with torch.no_grad():
        grown.transformer_blocks[2].ff.net[2].weight.fill_(0.1)
    with pytest.raises(RuntimeError, match="differs from its source"):
        check_grown_matches(source, grown)


def test_growing_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="only PixArt transformers grow"):
        grow_depth(torch.nn.Linear(2, 2), 4)


def test_pretrain_cli_grows_the_init_from_transformer_and_resumes(tiny_scene_pipeline, tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app
    from diffcr.models.scene_pipeline import load_scene_pipeline

    runner = CliRunner()
    source = load_scene_pipeline(tiny_scene_pipeline).transformer
    depth = source.config.num_layers
    out = tmp_path / "grown"
    args = ["pretrain", "--task", "t2i", "--out", str(out), "--init-from", str(tiny_scene_pipeline),
            "--num-layers", str(depth + 2), "--steps", "1", "--batch-size", "2", "--lr", "1e-9",
            "--warmup-steps", "0"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    grown = load_scene_pipeline(out / "pipeline").transformer
    assert grown.config.num_layers == depth + 2
    check_grown_matches(source, grown, atol=1e-4)  # one step at lr 1e-9
    run = json.loads((out / "transformer_run" / "run.json").read_text())
    assert run["init_from"] == str(tiny_scene_pipeline)
    # resuming needs the grown depth again; without it the run says what differs
    steps_at = args.index("--steps") + 1
    longer = [*args[:steps_at], "2", *args[steps_at + 1 :], "--resume"]
    resumed = runner.invoke(app, longer)
    assert resumed.exit_code == 0, resumed.output
    no_depth = [a for i, a in enumerate(longer) if a != "--num-layers" and longer[i - 1] != "--num-layers"]
    refused = runner.invoke(app, no_depth)
    assert refused.exit_code != 0 and "num_layers" in refused.output, refused.output
    # --width stays refused with --init-from
    wide = runner.invoke(app, [*args[:-2], "--width", "64", "--out", str(tmp_path / "wide")])
    assert wide.exit_code == 2 and "leave out --width" in " ".join(wide.output.split()), wide.output
    assert not (tmp_path / "wide").exists()


def _output(transformer, seed: int = 0) -> torch.Tensor:
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    caption = torch.randn(2, 4, config.caption_channels, generator=generator)
    kwargs = {"encoder_hidden_states": caption, "timestep": torch.tensor([10, 900])}
    with torch.no_grad():
        return transformer.eval()(
            latents, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **kwargs
        ).sample


def test_dropping_blocks_keeps_the_others_and_computes_the_model_without_them():
    import copy

    source = tiny_pixart(num_layers=4)
    smaller = drop_blocks(source, [1, 2])
    assert smaller.config.num_layers == 2 and len(smaller.transformer_blocks) == 2
    assert len(source.transformer_blocks) == 4  # the source is left as it was
    for new, old in zip(smaller.transformer_blocks, [source.transformer_blocks[0], source.transformer_blocks[3]]):
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    # the same function as the source with those blocks taken out of its forward
    without = copy.deepcopy(source)
    without.transformer_blocks = torch.nn.ModuleList([without.transformer_blocks[0], without.transformer_blocks[3]])
    assert torch.equal(_output(smaller), _output(without))
    assert (_output(smaller) - _output(source)).abs().max() > 1e-3  # the dropped blocks did something
    # growing and then dropping the copies gives the source back, weight for weight
    grown = grow_depth(source, 6)
    copies = [index for index, (_, is_copy) in enumerate(growth_plan(4, 6)) if is_copy]
    back = drop_blocks(grown, copies)
    assert back.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize(
    ("dropped", "message"),
    [([], "drop at least one"), ([0, 1, 2, 3], "keep at least one"), ([4], "not block indices"),
     ([-1], "not block indices"), ([1, 1], "twice"), ([True], "not block indices")],
)  # fmt: skip
def test_dropping_bad_blocks_is_refused(dropped, message):
    with pytest.raises(ValueError, match=message):
        drop_blocks(tiny_pixart(num_layers=4), dropped)


def test_dropping_blocks_of_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="only PixArt transformers lose blocks"):
        drop_blocks(torch.nn.Linear(2, 2), [0])


def test_pretrain_cli_drops_blocks_and_writes_them_untrained_with_zero_steps(tiny_scene_pipeline, tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app
    from diffcr.models.scene_pipeline import load_scene_pipeline

    runner = CliRunner()
    source = load_scene_pipeline(tiny_scene_pipeline).transformer
    depth = source.config.num_layers
    base = ["pretrain", "--task", "t2i", "--init-from", str(tiny_scene_pipeline)]
    result = runner.invoke(app, [*base, "--drop-blocks", "0", "--steps", "0", "--out", str(tmp_path / "pruned")])
    assert result.exit_code == 0, result.output
    assert "untrained" in result.output
    pruned = load_scene_pipeline(tmp_path / "pruned" / "pipeline").transformer
    assert pruned.config.num_layers == depth - 1
    want = drop_blocks(source, [0]).state_dict()
    assert all(torch.equal(pruned.state_dict()[k], v) for k, v in want.items())
    assert not (tmp_path / "pruned" / "transformer_run").exists()  # nothing trained
    # a run that trains remembers what it dropped: resuming with other blocks is refused
    out = tmp_path / "trained"
    train = [*base, "--drop-blocks", "0", "--steps", "1", "--batch-size", "2", "--warmup-steps", "0", "--out", str(out)]
    assert runner.invoke(app, train).exit_code == 0
    assert json.loads((out / "transformer_run" / "run.json").read_text())["drop_blocks"] == [0]
    other = [*base, "--drop-blocks", "1", "--steps", "2", "--batch-size", "2", "--out", str(out), "--resume"]
    refused = runner.invoke(app, other)
    assert refused.exit_code != 0 and "it started dropping [0]" in " ".join(refused.output.split()), refused.output
    resumed = runner.invoke(app, [*base, "--steps", "2", "--batch-size", "2", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_scene_pipeline(out / "pipeline").transformer.config.num_layers == depth - 1
    # the same blocks again, without --init-from (the run knows where it started): accepted
    again = ["pretrain", "--task", "t2i", "--drop-blocks", "0", "--steps", "3", "--batch-size", "2", "--out", str(out)]
    assert runner.invoke(app, [*again, "--resume"]).exit_code == 0
    # a run that dropped nothing cannot be resumed dropping blocks
    plain = tmp_path / "plain"
    no_drop = [*base, "--steps", "1", "--batch-size", "2", "--warmup-steps", "0", "--out", str(plain)]
    assert runner.invoke(app, no_drop).exit_code == 0
    late = runner.invoke(app, [*base, "--drop-blocks", "0", "--steps", "2", "--out", str(plain), "--resume"])
    assert late.exit_code != 0 and "it started with no block dropped" in " ".join(late.output.split()), late.output


def test_zero_steps_keep_the_source_text_encoder_layers_and_grow_too(tiny_scene_pipeline, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from diffcr.cli import app
    from diffcr.models.scene_pipeline import TEXT_ENCODER_FILE, load_scene_pipeline, text_encoder_layers

    # a source pipeline whose transformer learned on two MiniLM layers (the default is three)
    source_dir = tmp_path / "two-layers"
    shutil.copytree(tiny_scene_pipeline, source_dir)
    (source_dir / TEXT_ENCODER_FILE).write_text(json.dumps({"num_hidden_layers": 2}))
    runner = CliRunner()
    base = ["pretrain", "--task", "t2i", "--init-from", str(source_dir), "--steps", "0"]
    written = runner.invoke(app, [*base, "--drop-blocks", "0", "--out", str(tmp_path / "a")])
    assert written.exit_code == 0, written.output
    assert text_encoder_layers(tmp_path / "a" / "pipeline") == 2
    other = runner.invoke(
        app, [*base, "--drop-blocks", "0", "--text-encoder-layers", "3", "--out", str(tmp_path / "b")]
    )
    assert other.exit_code != 0 and "learned on 2 text encoder layers" in " ".join(other.output.split())
    assert not (tmp_path / "b").exists()
    # --steps 0 with --num-layers writes the grown transformer untrained
    source = load_scene_pipeline(tiny_scene_pipeline).transformer
    depth = source.config.num_layers
    grown = runner.invoke(app, [*base, "--num-layers", str(depth + 2), "--out", str(tmp_path / "c")])
    assert grown.exit_code == 0, grown.output
    check_grown_matches(source, load_scene_pipeline(tmp_path / "c" / "pipeline").transformer, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--steps", "0"], "give --init-from"),
     (["--steps", "0", "--init-from", "x", "--resume"], "leave out --resume"),
     (["--steps", "0", "--init-from", "x", "--average-from", "1"], "and --average-from"),
     (["--steps", "0", "--init-from", "x", "--token-bypass", "0.5"], "--steps 0 trains nothing"),
     (["--drop-blocks", "0", "--steps", "1"], "give --init-from"),
     (["--drop-blocks", "a,b", "--steps", "1"], "must be block indices")],
)  # fmt: skip
def test_pretrain_cli_refuses_zero_steps_or_dropping_without_a_pipeline(extra, message, tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--task", "t2i", "--out", str(tmp_path / "x"), *extra])
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x").exists()
    on_class = CliRunner().invoke(app, ["pretrain", "--drop-blocks", "0", "--out", str(tmp_path / "y")])
    assert on_class.exit_code != 0 and "--drop-blocks belongs to --task t2i" in " ".join(on_class.output.split())


def test_pretrain_cli_refuses_dropping_and_growing_at_once(tiny_scene_pipeline, tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app

    for depth in ("12", "8", "6"):  # deeper than, as deep as and shallower than the source: all refused
        args = ["pretrain", "--task", "t2i", "--init-from", str(tiny_scene_pipeline), "--drop-blocks", "0",
                "--num-layers", depth, "--steps", "0", "--out", str(tmp_path / "x")]  # fmt: skip
        result = CliRunner().invoke(app, args)
        message = " ".join(result.output.split())
        assert result.exit_code != 0 and f"num_layers={depth} and dropping blocks [0] at once" in message, message
        assert not (tmp_path / "x").exists()
