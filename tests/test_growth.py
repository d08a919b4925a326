"""Depth growth (`diffcr.models.growth`): the grown transformer computes what its source does, its new blocks are
copies with zero output projections, and `diffcr pretrain --init-from --num-layers` grows and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_pixart
from diffcr.models.growth import OUTPUT_PROJECTIONS, check_grown_matches, grow_depth, growth_plan


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
