"""The text-to-image frontier (`diffcr bench --only frontier --task t2i`): the goal's verdict on the prompt-accuracy
axis from hand-made rows, the recipe's validation and workload, and one run end to end through the CLI on a tiny
pretrained scene pipeline. Speedups depend on the machine's load, so only the dense-again point's identity with
dense and the verdict's consistency with the measured numbers are checked, not their size."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from diffcr.cli import app
from diffcr.compare import DENSE, DENSE_TUNED, FBCACHE, FEWER_STEPS
from diffcr.frontier import (
    DENSE_TUNED_STEPS,
    DIFFCR,
    DIFFCR_FBCACHE,
    DIFFCR_STEPS,
    FAMILIES,
    FID_AXIS,
    FrontierPoint,
    goal_verdict,
    verdict_lines,
)
from diffcr.t2i_bench import T2IBenchRecipe, T2IRow
from diffcr.t2i_frontier import PROMPT_ACCURACY, T2IFrontierRecipe, judge_t2i_rows

runner = CliRunner()

# -- the verdict on prompt accuracy -----------------------------------------------------------------------


def _row(family: str, speedup: float, accuracy: float, setting: str = "", flop_speedup: float | None = None) -> dict:
    return {
        "family": family,
        "setting": setting or f"{speedup:g}x",
        "speedup": speedup,
        "flop_speedup": speedup if flop_speedup is None else flop_speedup,
        "digit_accuracy": accuracy,
        "fid": 1000.0,  # far off, and never looked at on the accuracy axis
    }


def _verdict(rows: list[dict], dense: float = 0.80, spread: float = 0.05) -> dict:
    return goal_verdict(rows, dense, spread, axis=PROMPT_ACCURACY)


def test_the_accuracy_axis_limit_lies_below_dense_and_fid_above():
    assert PROMPT_ACCURACY.limit(0.80, 0.05) == pytest.approx(0.75)
    assert FID_AXIS.limit(10.0, 0.5) == pytest.approx(10.5)
    assert PROMPT_ACCURACY.within(0.75, 0.75) and PROMPT_ACCURACY.within(0.95, 0.75)  # at or above the limit
    assert not PROMPT_ACCURACY.within(0.7499, 0.75)
    assert not FID_AXIS.within(math.nan, 10.5) and not PROMPT_ACCURACY.within(math.nan, 0.75)
    assert PROMPT_ACCURACY.bound(0.75) == "digit accuracy at or above 75.0 %"
    assert PROMPT_ACCURACY.show(0.8125) == "digit accuracy 81.2 %"


def test_goal_is_reached_on_accuracy_when_only_the_composition_passes_3x_within_the_spread():
    rows = [
        _row(DENSE, 1.0, 0.80),
        _row(FEWER_STEPS, 2.0, 0.78, "10 steps"),
        _row(FEWER_STEPS, 3.3, 0.60, "6 steps"),  # fast, but 20 points down
        _row(DIFFCR, 1.6, 0.84, "kept 0.58, 20 steps"),  # above dense: better is no loss either
        _row(DIFFCR_STEPS, 3.2, 0.75, "kept 0.58, 10 steps"),  # exactly at 0.80 - 0.05
        _row(DIFFCR_STEPS, 4.0, 0.55, "kept 0.42, 8 steps"),
    ]
    verdict = _verdict(rows)
    assert verdict["axis"] == "digit_accuracy" and "fid_limit" not in verdict
    assert verdict["accuracy_limit"] == pytest.approx(0.75)
    assert verdict["reached"] is True
    assert verdict["composed_speedup"] == 3.2 and verdict["steps_alone_speedup"] == 2.0
    assert verdict["best"][DIFFCR] == {"setting": "kept 0.58, 20 steps", "speedup": 1.6, "digit_accuracy": 0.84}
    assert verdict["best"][DIFFCR_STEPS]["digit_accuracy"] == 0.75
    assert verdict["explanation"] == (
        f"Reached: {DIFFCR_STEPS} runs 3.20x (kept 0.58, 10 steps) at digit accuracy 75.0 % (limit 75.0 %), "
        f"where {FEWER_STEPS} alone stop at 2.00x (10 steps)."
    )


def test_goal_is_not_reached_on_accuracy_when_the_composition_stays_below_3x_and_says_why():
    rows = [
        _row(DENSE, 1.0, 0.80),
        _row(FEWER_STEPS, 1.5, 0.79, "13 steps"),
        _row(FEWER_STEPS, 2.0, 0.70, "10 steps"),
        _row(DIFFCR, 1.4, 0.77, "kept 0.75", flop_speedup=2.0),
        _row(DIFFCR_STEPS, 2.5, 0.76, "kept 0.75, 13 steps"),
        _row(DIFFCR_STEPS, 3.1, 0.60, "kept 0.75, 10 steps"),
    ]
    verdict = _verdict(rows)
    assert verdict["reached"] is False and verdict["composed_speedup"] == 2.5
    text = verdict["explanation"]
    assert text.startswith(
        f"Not reached: {DIFFCR_STEPS} keeps digit accuracy at or above 75.0 % up to 2.50x (kept 0.75, 13 steps)"
    )
    assert "2.10x" in text  # 1.5 x 1.4: the product of the best no-loss points alone
    assert "kept 0.75, 10 steps 3.10x, digit accuracy 60.0 %" in text  # the lossy composed point above 3x
    assert "70%" in text  # DiffCR's measured speedup is 1.4 / 2.0 of its FLOP speedup


def test_goal_is_not_reached_on_accuracy_when_fewer_steps_alone_get_there_too():
    rows = [_row(DENSE, 1.0, 0.80), _row(FEWER_STEPS, 3.3, 0.78, "6 steps"), _row(DIFFCR_STEPS, 3.5, 0.79)]
    verdict = _verdict(rows)
    assert verdict["reached"] is False
    assert verdict["composed_speedup"] == 3.5 and verdict["steps_alone_speedup"] == 3.3
    assert "alone get there too (3.30x (6 steps))" in verdict["explanation"]


def test_no_composed_point_at_dense_accuracy_is_said_so_and_listed():
    rows = [_row(DENSE, 1.0, 0.80), _row(FEWER_STEPS, 2.0, 0.77), _row(DIFFCR_STEPS, 3.5, 0.40)]
    verdict = _verdict(rows)
    assert verdict["reached"] is False and verdict["composed_speedup"] is None
    assert verdict["best"][DIFFCR_STEPS] is None
    assert f"no {DIFFCR_STEPS} point keeps digit accuracy at or above 75.0 %" in verdict["explanation"]
    lines = verdict_lines(verdict, PROMPT_ACCURACY)
    assert f"- {DIFFCR_STEPS}: no point with digit accuracy at or above 75.0 %" in lines
    assert f"- {FEWER_STEPS}: 2.00x (2x, digit accuracy 77.0 %)" in lines


def test_the_compositions_are_judged_on_accuracy_against_dense_fine_tuned():
    rows = [
        _row(DENSE, 1.0, 0.70),
        _row(DENSE_TUNED, 1.0, 0.90),  # fine-tuning alone gains 20 points: the confound
        _row(DENSE_TUNED_STEPS, 2.0, 0.86, "fine-tuned, 10 steps"),
        _row(DENSE_TUNED_STEPS, 3.0, 0.80, "fine-tuned, 6 steps"),  # below 0.90 - 0.05
        _row(DIFFCR_STEPS, 3.5, 0.88, "kept 0.58, 8 steps"),
    ]
    tuned = _verdict(rows, dense=0.70)["against_tuned"]
    assert tuned["accuracy_limit"] == pytest.approx(0.85)
    assert tuned["best"][DENSE_TUNED_STEPS]["speedup"] == 2.0 and tuned["best"][DIFFCR_STEPS]["speedup"] == 3.5
    assert tuned["explanation"] == (
        f"Against {DENSE_TUNED} (digit accuracy 90.0 %, limit 85.0 % with the spread): {DIFFCR_STEPS} keeps quality "
        f"up to 3.50x (kept 0.58, 8 steps), {DENSE_TUNED_STEPS} up to 2.00x (fine-tuned, 10 steps)."
    )


def _t2i_row(name: str, speedup: float, accuracy: float, heldout: float) -> T2IRow:
    by_kind = {"heldout": {"digit_accuracy": heldout, "num_images": 2}, "single": {"digit_accuracy": 1.0}}
    return T2IRow(name, name, None, "", 2, 1.0 / speedup, speedup, speedup, accuracy, 1.0, 0.5, by_kind, 50.0, None)


def test_judged_t2i_rows_carry_family_heldout_accuracy_frontier_and_no_loss():
    points = [
        FrontierPoint(DENSE, 20),
        FrontierPoint(FEWER_STEPS, 10),
        FrontierPoint(FEWER_STEPS, 6),
        FrontierPoint(FEWER_STEPS, 8),
    ]
    judged = [
        _t2i_row("dense", 1.0, 0.80, 0.75),
        _t2i_row("a", 1.8, 0.78, 0.70),
        _t2i_row("b", 3.0, 0.50, 0.40),
        _t2i_row("c", 2.2, 0.45, 0.30),  # slower and less accurate than the 6-step point: off the frontier
    ]
    rows, verdict = judge_t2i_rows(points, judged, accuracy_spread=0.04)
    assert [row["family"] for row in rows] == [DENSE, FEWER_STEPS, FEWER_STEPS, FEWER_STEPS]
    assert [row["setting"] for row in rows] == ["20 steps", "10 steps", "6 steps", "8 steps"]
    assert [row["heldout_accuracy"] for row in rows] == [0.75, 0.70, 0.40, 0.30]
    assert verdict["accuracy_limit"] == pytest.approx(0.76)
    assert [row["no_loss"] for row in rows] == [True, True, False, False]
    assert [row["on_accuracy_frontier"] for row in rows] == [True, True, True, False]
    assert verdict["best"][FEWER_STEPS]["speedup"] == 1.8


# -- the recipe -------------------------------------------------------------------------------------------


def test_default_recipe_takes_the_text_to_image_budget_and_samples_300_images_a_point():
    recipe = T2IFrontierRecipe()
    bench = T2IBenchRecipe()
    names = ("train_steps", "train_batch", "lr", "router_lr", "ratio_lr", "lr_schedule", "ratio_loss_weight")
    for name in (*names, "sample_batch"):
        assert getattr(recipe, name) == getattr(bench, name), name
    assert (recipe.sampler_steps, recipe.guidance_scale, recipe.timestep_regions) == (20, 4.5, 1)
    assert recipe.step_counts == (20, 16, 13, 10, 8, 6) and recipe.diffcr_targets == (0.75, 0.58, 0.42)
    prompts, kinds = recipe.prompts()
    assert recipe.num_samples == len(prompts) == 300
    assert len(set(prompts)) == 50 and all(prompts.count(prompt) == 6 for prompt in set(prompts))
    assert kinds.count("heldout") == 120 and kinds[:50] == kinds[50:100]  # the 50 prompts, six times over
    assert recipe.bench_recipe().sample_config(10).steps == 10


def test_workload_counts_trainings_points_images_and_image_steps():
    work = T2IFrontierRecipe().workload()
    # points: dense 1 + fewer steps 6 + cache 3 + DiffCR 3 + DiffCR x steps 3 x 4 + DiffCR x cache 3 x 2 + tuned 1 + 4
    assert work == {
        "trainings": 4,  # three DiffCR targets and dense fine-tuned
        "train_steps": 400,
        "train_batch": 16,
        "points": 36,
        "images": (36 + 2) * 300,  # and dense on the two spread seed sets
        # steps summed over the points: 20 + 73 + 60 + 60 + 3 x 37 + 120 + 20 + 37 = 501
        "image_steps": 501 * 300 + 2 * 300 * 20,
    }
    steps_only = T2IFrontierRecipe(families=(FEWER_STEPS,), num_prompts=10, seeds_per_prompt=3).workload()
    assert steps_only["trainings"] == 0 and steps_only["points"] == 7
    assert steps_only["images"] == (7 + 2) * 30 and steps_only["image_steps"] == (20 + 73) * 30 + 2 * 30 * 20


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("seeds_per_prompt", 0, "seeds_per_prompt=0"),
        ("num_prompts", 0, "num_prompts=0"),
        ("sampler_steps", 1, "sampler_steps=1 must be >= 2"),
        ("step_counts", (25,), "outside [1, 20]"),
        ("tuned_step_counts", (21,), "outside [1, 20]"),
        ("diffcr_targets", (1.5,), "outside (0, 1]"),
        ("diffcr_fbcache_thresholds", (-0.1,), ">= 0"),
        ("spread_seeds", (0,), "set 0 is the contest's noise"),
        ("spread_seeds", (1, 1), "distinct seed sets"),
        ("num_reference", 1, "num_reference=1"),
        ("families", ("DiffCR-XL",), "choose among"),
    ],
)
def test_recipe_refuses_bad_values_by_name(field, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        T2IFrontierRecipe(**{field: value})


# -- output folders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"machine": {}, "quick": True}, "another bench's results.json"),  # `diffcr bench`
        ({"kind": "frontier", "rows": []}, "the --task class frontier's results.json"),
    ],
)
def test_t2i_frontier_refuses_a_folder_of_another_bench(tmp_path, payload, words):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(payload))
    # the folder is checked before the pipeline is loaded: no pipeline is needed to be refused
    run = runner.invoke(app, ["bench", "--only", "frontier", "--task", "t2i", "--quick", "--out", str(folder)])
    assert run.exit_code == 2 and words in run.output and "Traceback" not in run.output
    assert json.loads((folder / "results.json").read_text()) == payload


def test_class_frontier_and_publish_refuse_a_t2i_frontier_folder(tmp_path):
    from diffcr.harness import publish

    folder = tmp_path / "frontier-t2i"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"kind": "frontier", "task": "t2i", "rows": []}))
    run = runner.invoke(app, ["bench", "--only", "frontier", "--quick", "--out", str(folder)])
    assert run.exit_code == 2 and "the --task t2i frontier's results.json" in run.output
    with pytest.raises(ValueError, match="holds a frontier run"):
        publish(folder, tmp_path / "RESULTS.md")
    assert not (tmp_path / "RESULTS.md").exists()


# -- end to end ---------------------------------------------------------------------------------------------

# the quick recipe cut further, so that the whole frontier runs in seconds: 9 points of 4 prompts x 1 seed
TINY = replace(
    T2IFrontierRecipe.quick(),
    sampler_steps=2,
    step_counts=(2, 1),
    diffcr_step_counts=(1,),
    tuned_step_counts=(1,),
    train_steps=2,
    train_batch=2,
    num_prompts=4,
    seeds_per_prompt=1,
    sample_batch=2,
    num_reference=20,
    num_threads=1,
)


@pytest.fixture(scope="module")
def frontier(tiny_scene_pipeline, tmp_path_factory):
    """One run through the CLI (`--only frontier --task t2i --quick`), the quick recipe swapped for the tinier."""
    out = tmp_path_factory.mktemp("frontier") / "t2i"
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(T2IFrontierRecipe, "quick", classmethod(lambda cls: TINY))
            args = ["bench", "--only", "frontier", "--task", "t2i", "--quick", "--base", str(tiny_scene_pipeline)]
            result = runner.invoke(app, [*args, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the recipe's one thread was set process-wide
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text()), result.output


def test_every_family_has_rows_on_its_accuracy_frontier(frontier):
    _, results, output = frontier
    # 2 trainings (DiffCR at kept 0.5, dense fine-tuned); steps: 2 + (2 + 1) + 2 + 2 + 1 + 2 + 2 + 1 = 15 per image
    assert (
        "text-to-image frontier: 2 trainings x 2 steps (batch 2), then 9 points x 4 images + 2 x 4 for prompt "
        "accuracy's spread = 44 images (76 image-steps before savings)" in output
    )
    assert results["kind"] == "frontier" and results["task"] == "t2i"
    assert results["skipped"] == []  # diffusers' first-block cache attaches to PixArt
    rows = results["rows"]
    assert len(rows) == 9 and {row["family"] for row in rows} == set(FAMILIES)
    for family in FAMILIES:
        mine = [row for row in rows if row["family"] == family]
        assert any(row["on_accuracy_frontier"] for row in mine), family
        for row in mine:
            assert 0.0 <= row["digit_accuracy"] <= 1.0 and 0.0 <= row["heldout_accuracy"] <= 1.0
            assert sum(kind["num_images"] for kind in row["by_kind"].values()) == 4  # 4 prompts x 1 seed
            assert math.isfinite(row["speedup"]) and row["speedup"] > 0
    steps = {(row["family"], row["setting"]): row["steps"] for row in rows}
    assert steps[(DIFFCR_STEPS, "kept 0.50, 1 steps")] == 1 and steps[(DENSE_TUNED_STEPS, "fine-tuned, 1 steps")] == 1
    for row in rows:
        routed = row["family"] in (DIFFCR, DIFFCR_STEPS, DIFFCR_FBCACHE)
        assert (row["mean_kept_ratio"] is not None) == routed, row["family"]
        # DiffCR trains and samples as the demo routes: bypassed tokens still get the cross-attention update
        assert row.get("route_cross_attention") == (False if routed else None), row["family"]
        assert (row["threshold"] == 0.2) == (row["family"] in (FBCACHE, DIFFCR_FBCACHE))


def test_dense_again_matches_dense_and_the_spread_sets_the_limit(frontier):
    _, results, _ = frontier
    rows = results["rows"]
    dense = rows[0]
    assert dense["family"] == DENSE and dense["speedup"] == 1.0 and dense["psnr_vs_dense"] is None
    again = next(row for row in rows if row["family"] == FEWER_STEPS and row["steps"] == TINY.sampler_steps)
    # the same transformer, steps and seeds: the same images, hence the same judgement
    assert again["digit_accuracy"] == dense["digit_accuracy"]
    assert again["heldout_accuracy"] == dense["heldout_accuracy"]
    assert again["psnr_vs_dense"] == pytest.approx(100.0)
    spread = results["spread"]
    assert spread["seed_sets"] == [0, 1, 2] and spread["num_samples"] == 4
    accuracies = spread["dense_accuracies"]
    assert len(accuracies) == 3 and accuracies[0] == dense["digit_accuracy"]
    assert spread["accuracy_spread"] == pytest.approx(max(accuracies) - min(accuracies))
    verdict = results["verdict"]
    assert verdict["axis"] == "digit_accuracy"
    assert verdict["accuracy_limit"] == pytest.approx(dense["digit_accuracy"] - spread["accuracy_spread"])
    for row in rows:
        assert row["no_loss"] == (row["digit_accuracy"] >= verdict["accuracy_limit"]), row["setting"]
    assert dense["no_loss"] and again["no_loss"]
    assert verdict["best"][FEWER_STEPS]["speedup"] >= again["speedup"]
    assert isinstance(verdict["reached"], bool) and verdict["explanation"]
    assert verdict["against_tuned"]["accuracy_limit"] == pytest.approx(
        next(row for row in rows if row["family"] == DENSE_TUNED)["digit_accuracy"] - spread["accuracy_spread"]
    )


def test_report_plot_and_trained_models_are_written(frontier):
    out, results, output = frontier
    text = (out / "results.md").read_text()
    assert text.startswith("### Speed-quality frontier (text-to-image default)")
    assert "4 images (4 evaluation prompts x 1 seed)" in text and "DiffCR-L (layer ratios)" in text
    assert "**Prompt accuracy's run-to-run spread**" in text and "**Goal**" in text
    assert "**The fine-tuning confound.**" in text
    for family in FAMILIES:
        assert f"| {family} |" in text and f"- {family}: " in text
    assert text in output  # the CLI prints the report
    assert (out / "frontier.png").stat().st_size > 1000 and results["plot"].endswith("frontier.png")
    assert {path.name for path in (out / "trained").iterdir()} == {"dense-tuned", "diffcr-kept0.5"}


def test_cache_families_are_left_out_with_the_reason_when_the_cache_cannot_attach(monkeypatch):
    import diffcr.t2i_bench
    from diffcr.t2i_frontier import drop_families_that_cannot_run

    recipe = T2IFrontierRecipe()
    # the cache attaches: nothing changes
    monkeypatch.setattr(diffcr.t2i_bench, "check_fbcache", lambda model: None)
    assert drop_families_that_cannot_run(recipe, object()) == (recipe, [])
    # it does not: both cache families go, every other family stays, and the reason is kept for the report
    monkeypatch.setattr(diffcr.t2i_bench, "check_fbcache", lambda model: "no cache for this layout")
    kept, skipped = drop_families_that_cannot_run(recipe, object())
    assert kept.families == tuple(f for f in FAMILIES if f not in (FBCACHE, DIFFCR_FBCACHE))
    assert skipped == [{"family": f, "reason": "no cache for this layout"} for f in (FBCACHE, DIFFCR_FBCACHE)]
    # a recipe without cache families is not checked at all
    no_cache = replace(recipe, families=(DENSE, FEWER_STEPS))
    assert drop_families_that_cannot_run(no_cache, object()) == (no_cache, [])
    # asked for the cache alone: the reason, not an empty recipe
    with pytest.raises(ValueError, match="first-block cache alone, and no cache for this layout"):
        drop_families_that_cannot_run(replace(recipe, families=(DENSE, FBCACHE)), object())


def test_a_routing_the_blocks_cannot_run_is_refused_before_any_training_or_folder(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import diffcr.t2i_bench
    from conftest import tiny_dit
    from diffcr.t2i_frontier import run_t2i_frontier

    # a transformer without PixArt's cross-attention cannot give bypassed tokens a cross-attention update
    pipe = SimpleNamespace(transformer=tiny_dit(num_layers=2))
    monkeypatch.setattr(diffcr.t2i_bench, "load_bench_pipeline", lambda base: pipe)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match="cross-attention"):
            run_t2i_frontier(tmp_path / "out", replace(TINY, families=(DENSE, DIFFCR)), progress=False)
    finally:
        torch.set_num_threads(threads)  # the recipe's one thread is set process-wide
    assert not (tmp_path / "out").exists()
