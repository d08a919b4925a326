"""`diffcr demo --task t2i` end to end on a tiny pipeline: compression, the same-noise evaluation, the judge's
figures, the router-stroke agreement, the report and the artifact that `--artifact` loads."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffcr.cli import app


@pytest.fixture(scope="module")
def demo(tiny_scene_pipeline, tmp_path_factory):
    from diffcr.t2i_demo import T2IDemoRecipe, run_t2i_demo

    recipe = T2IDemoRecipe(
        steps=3,
        freeze_schedule_at=2,
        batch_size=2,
        sampler_steps=2,
        sample_batch_size=25,
        num_reference=20,
        num_router_prompts=2,
    )
    out = tmp_path_factory.mktemp("demo") / "run"
    estimates = []
    result = run_t2i_demo(out, recipe, base=str(tiny_scene_pipeline), progress=False, on_estimate=estimates.append)
    return out, result, estimates


def test_demo_trains_the_recipe_and_writes_its_artifact(demo, tiny_scene_pipeline):
    import diffcr
    from diffcr.text_to_image import load_pipeline

    out, result, estimates = demo
    assert result["train_steps"] == 3
    assert len(estimates) == 1 and estimates[0].total_seconds > 0
    # the probe timed a step at the frozen schedule for the one step after step 2
    assert estimates[0].frozen_steps == 1 and estimates[0].seconds_per_frozen_step > 0
    assert "then 1 at the frozen schedule" in estimates[0].describe()
    routed = load_pipeline(str(tiny_scene_pipeline), result["artifact"])
    assert diffcr.is_applied(routed.transformer)
    assert diffcr.get_config(routed.transformer).timestep_regions == 4


def test_demo_judges_every_evaluation_prompt(demo):
    from diffcr.data.scenes import evaluation_prompts

    out, result, _ = demo
    samples = np.load(out / "evaluation" / "samples.npz")
    prompts = [p for p, _ in evaluation_prompts()]
    assert samples["prompts"].tolist() == prompts
    assert samples["dense"].shape == samples["diffcr"].shape == (len(prompts), 64, 64, 3)
    judged = json.loads((out / "evaluation" / "scene_judgement.json").read_text())
    for name in ("dense", "diffcr"):
        accuracy = judged[name]["accuracy"]
        assert accuracy["num_images"] == len(prompts)
        assert set(accuracy["by_kind"]) == {"heldout", "seen", "single"}
        assert 0.0 <= accuracy["digit_accuracy"] <= 1.0
        assert np.isfinite(judged[name]["fid"])
    strokes = judged["router_strokes"]
    assert strokes["num_prompts"] == 2 and 0.0 <= strokes["on_stroke"] <= 1.0
    assert result["evaluation"]["speedup"] > 0


def test_demo_report_shows_the_judge(demo):
    from diffcr.t2i_demo import summary_table

    out, result, _ = demo
    page = result["report"].read_text()
    assert "prompt accuracy: digits at their slot" in page and "held-out scenes" in page
    table = summary_table(result["evaluation"], result["judgement"])
    assert "measured sampling speedup" in table and "heldout prompts" in table
    flop_ratio = result["evaluation"]["flop_ratio"]
    # 3 steps leave the kept ratios near 1.0: the FLOPs are dense's exactly where no token is bypassed
    assert flop_ratio >= 1.0 and (flop_ratio == 1.0) == (result["evaluation"]["mean_kept_ratio"] == 1.0)
    assert f"| FLOP-ideal speedup (matrix products counted) | 1.00x | {flop_ratio:.2f}x |" in table
    assert "FLOP-ideal speedup" in page


def test_router_stroke_agreement_counts_only_computed_tokens(tiny_scene_pipeline):
    import diffcr
    from diffcr.t2i_demo import router_stroke_agreement
    from diffcr.text_to_image import PromptSampleConfig, load_pipeline

    pipe = load_pipeline(str(tiny_scene_pipeline))
    diffcr.apply(pipe.transformer, diffcr.DiffCRConfig(target_kept_ratio=0.5, timestep_regions=2))
    diffcr.freeze(pipe.transformer)
    result = router_stroke_agreement(pipe, ["a 1 on the left", "a 7 on the right"], PromptSampleConfig(steps=2))
    assert result["num_prompts"] == 2
    assert set(result["by_layer"]) <= {str(i) for i in range(pipe.transformer.config.num_layers)}
    assert 0.0 <= result["chance"] <= 1.0


def test_cli_demo_task_checks(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["demo", "--task", "video", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "'class' or 't2i'" in bad.output
    mixed = runner.invoke(app, ["demo", "--task", "t2i", "--quick", "--out", str(tmp_path / "y")])
    assert mixed.exit_code != 0 and "--task class" in mixed.output
    torch.set_num_threads(2)


def test_recipe_averaging_sets_the_checkpoint_steps_it_averages():
    from diffcr.t2i_demo import T2IDemoRecipe
    from diffcr.train.averaging import takes_sample

    plain = T2IDemoRecipe(steps=200).train_config()
    assert (plain.average_from, plain.checkpoint_every) == (0, 200)
    averaged = T2IDemoRecipe(steps=200, average_from=100, average_every=20).train_config()
    assert (averaged.average_from, averaged.checkpoint_every) == (100, 20)
    taken = [s for s in range(1, 201) if takes_sample(s, averaged.average_from, averaged.checkpoint_every)]
    assert taken == list(range(100, 201, 20))
    with pytest.raises(ValueError, match="average_every=0 must be >= 1"):
        T2IDemoRecipe(average_every=0)
    with pytest.raises(ValueError, match="after the last step"):
        T2IDemoRecipe(steps=50, average_from=100).train_config()


def test_recipe_ratio_bins_reach_the_diffcr_config():
    from diffcr.config import DEFAULT_RATIO_BINS
    from diffcr.t2i_demo import T2IDemoRecipe

    assert T2IDemoRecipe().diffcr_config().ratio_bins == DEFAULT_RATIO_BINS
    to_zero = (*DEFAULT_RATIO_BINS, 0.0)  # the paper's bins reach 100 % compression: a whole-block skip
    assert T2IDemoRecipe(ratio_bins=to_zero).diffcr_config().ratio_bins == to_zero
    with pytest.raises(ValueError, match="must start at 1.0"):
        T2IDemoRecipe(ratio_bins=(0.9, 0.5))  # checked when the recipe is made


def test_estimate_counts_the_median_step_after_the_first_ones(tiny_scene_pipeline, monkeypatch):
    """Early probe steps run slow (new token counts): each phase counts the median of its later steps."""
    import diffcr.t2i_demo
    import diffcr.text_to_image
    import diffcr.train
    from diffcr.data.latent_cache import load_text_to_image_pipeline
    from diffcr.t2i_demo import (
        LEARNED_TABLE_COST,
        PROBE_TIMED_STEPS,
        PROBE_WARMUP_STEPS,
        SAMPLING_PASSES,
        TIMING_ROUND_PASSES,
        T2IDemoRecipe,
        estimate_t2i_demo,
    )

    assert (PROBE_WARMUP_STEPS, PROBE_TIMED_STEPS) == (2, 3)
    blended, frozen = [5.0, 3.0, 1.0, 1.4, 1.1], [4.0, 2.0, 0.5, 0.9, 0.6]  # seconds of each probe step
    seen = {}

    def fake_train(out_dir, model, conditioning, cfg, **kwargs):
        seen["steps"], seen["freeze_schedule_at"] = cfg.steps, cfg.freeze_schedule_at
        out_dir.mkdir(parents=True)
        clock, rows = 0.0, []
        for step, seconds in enumerate(blended + frozen, start=1):
            clock += seconds
            rows.append(json.dumps({"step": step, "seconds": clock}))
        (out_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")

    monkeypatch.setattr(diffcr.train, "train", fake_train)
    pipe = load_text_to_image_pipeline(str(tiny_scene_pipeline))
    recipe = T2IDemoRecipe(steps=100, freeze_schedule_at=40, sampler_steps=2, sample_batch_size=2)
    estimate = estimate_t2i_demo(pipe, None, recipe, num_prompts=4)
    assert seen == {"steps": 10, "freeze_schedule_at": 5}
    # the blended steps scaled for a learned table that spreads between bins; frozen steps run one pass as probed
    assert estimate.seconds_per_step == pytest.approx(1.1 * LEARNED_TABLE_COST)
    assert estimate.seconds_per_frozen_step == pytest.approx(0.6)
    assert estimate.training_seconds == pytest.approx(40 * 1.1 * LEARNED_TABLE_COST + 60 * 0.6)
    # each further timing round of the evaluation adds a dense and a DiffCR pass over the prompts: with a sampling
    # call that takes 1 s (2 steps), the prompts' 2 batches x 2 steps cost 2 s a pass
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(diffcr.t2i_demo, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(diffcr.text_to_image, "sample_prompts", lambda *a, **k: setattr(clock, "now", clock.now + 1))
    for rounds in (1, 3):
        timed = estimate_t2i_demo(pipe, None, replace(recipe, timing_rounds=rounds), num_prompts=4)
        assert timed.sampling_seconds == pytest.approx(2 * (SAMPLING_PASSES + (rounds - 1) * TIMING_ROUND_PASSES))
    with pytest.raises(ValueError, match="timing_rounds=0 must be >= 1"):
        T2IDemoRecipe(timing_rounds=0)
