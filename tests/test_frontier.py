"""The speed-quality frontier (`diffcr bench --only frontier`): its Pareto frontier, the goal's verdict from
measured rows, the first-block cache on routed models, and the quick run end to end."""

from __future__ import annotations

import contextlib
import copy
import json
import re

import pytest
import torch

import diffcr
from conftest import tiny_dit
from diffcr.baselines import FirstBlockCache
from diffcr.compare import DENSE, DENSE_TUNED, FEWER_STEPS
from diffcr.frontier import (
    DENSE_TUNED_STEPS,
    DIFFCR,
    DIFFCR_STEPS,
    FAMILIES,
    FrontierRecipe,
    frontier_points,
    goal_verdict,
    mark_frontiers,
    pareto_front,
)

# -- Pareto frontier --------------------------------------------------------------------------------------


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [
        (1.0, 10.0),  # slowest, best FID: on the front
        (2.0, 12.0),  # on the front
        (1.5, 13.0),  # dominated by (2.0, 12.0)
        (3.0, 20.0),  # fastest: on the front
        (2.0, 12.0),  # a tie with the second point: neither dominates the other
        (3.0, 25.0),  # as fast as (3.0, 20.0), worse FID: dominated
    ]
    assert pareto_front(points) == [True, True, False, True, True, False]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [True]


def test_frontiers_are_marked_within_each_family():
    rows = [
        {"family": "a", "speedup": 1.0, "fid": 5.0, "accuracy": 0.9},
        {"family": "a", "speedup": 2.0, "fid": 4.0, "accuracy": 0.8},  # dominates the first on FID
        {"family": "b", "speedup": 1.5, "fid": 9.0, "accuracy": 0.95},  # worse than family a, but alone in b
    ]
    mark_frontiers(rows)
    assert [row["on_frontier"] for row in rows] == [False, True, True]
    assert [row["on_accuracy_frontier"] for row in rows] == [True, True, True]


# -- the goal's verdict -----------------------------------------------------------------------------------


def _row(family: str, speedup: float, fid: float, setting: str = "", flop_speedup: float | None = None) -> dict:
    return {
        "family": family,
        "setting": setting or f"{speedup:g}x",
        "speedup": speedup,
        "flop_speedup": speedup if flop_speedup is None else flop_speedup,
        "fid": fid,
    }


def test_goal_is_reached_when_only_the_composition_passes_3x_within_the_spread():
    rows = [
        _row(DENSE, 1.0, 10.0),
        _row(FEWER_STEPS, 2.0, 10.4, "10 steps"),
        _row(FEWER_STEPS, 3.3, 14.0, "6 steps"),  # fast, but lossy
        _row(DIFFCR, 1.6, 10.2),
        _row(DIFFCR_STEPS, 3.2, 10.5, "kept 0.58, 10 steps"),  # within 10 + 0.5
        _row(DIFFCR_STEPS, 4.0, 12.0, "kept 0.42, 8 steps"),  # lossy
    ]
    verdict = goal_verdict(rows, dense_quality=10.0, quality_spread=0.5)
    assert verdict["fid_limit"] == 10.5
    assert verdict["reached"] is True
    assert verdict["composed_speedup"] == 3.2 and verdict["steps_alone_speedup"] == 2.0
    assert verdict["best"][DIFFCR_STEPS]["setting"] == "kept 0.58, 10 steps"
    assert verdict["explanation"].startswith("Reached")


def test_goal_is_not_reached_when_the_composition_stays_below_3x_and_says_why():
    rows = [
        _row(DENSE, 1.0, 10.0),
        _row(FEWER_STEPS, 1.5, 10.3, "13 steps"),
        _row(FEWER_STEPS, 2.0, 11.0, "10 steps"),
        _row(DIFFCR, 1.4, 10.4, "kept 0.75", flop_speedup=2.0),
        _row(DIFFCR_STEPS, 2.5, 10.4, "kept 0.75, 13 steps"),
        _row(DIFFCR_STEPS, 3.1, 11.8, "kept 0.75, 10 steps"),
    ]
    verdict = goal_verdict(rows, dense_quality=10.0, quality_spread=0.5)
    assert verdict["reached"] is False
    assert verdict["composed_speedup"] == 2.5
    text = verdict["explanation"]
    assert text.startswith("Not reached")
    assert "2.10x" in text  # 1.5 x 1.4: the product of the best no-loss points alone
    assert "kept 0.75, 10 steps 3.10x, FID 11.80" in text  # the lossy composed point above 3x
    assert "70%" in text  # DiffCR's measured speedup is 1.4 / 2.0 of its FLOP speedup


def test_goal_is_not_reached_when_fewer_steps_alone_get_there_too():
    rows = [
        _row(DENSE, 1.0, 10.0),
        _row(FEWER_STEPS, 3.3, 10.1, "6 steps"),
        _row(DIFFCR_STEPS, 3.5, 10.2),
    ]
    verdict = goal_verdict(rows, dense_quality=10.0, quality_spread=0.5)
    assert verdict["reached"] is False
    assert verdict["composed_speedup"] == 3.5 and verdict["steps_alone_speedup"] == 3.3
    assert "alone get there too" in verdict["explanation"]


def test_no_composed_point_within_the_band_is_said_so():
    rows = [_row(DENSE, 1.0, 10.0), _row(FEWER_STEPS, 2.0, 10.2), _row(DIFFCR_STEPS, 3.5, 20.0)]
    verdict = goal_verdict(rows, dense_quality=10.0, quality_spread=0.5)
    assert verdict["reached"] is False and verdict["composed_speedup"] is None
    assert verdict["best"][DIFFCR_STEPS] is None
    assert f"no {DIFFCR_STEPS} point keeps FID" in verdict["explanation"]


# -- the plan -----------------------------------------------------------------------------------------------


def test_points_cover_every_family_with_unique_settings():
    recipe = FrontierRecipe()
    points = frontier_points(recipe)
    assert points[0].family == DENSE and points[0].steps == 20
    assert [p.family for p in points if p.family not in FAMILIES] == []
    assert {p.family for p in points} == set(FAMILIES)
    names = [(p.family, p.setting) for p in points]
    assert len(set(names)) == len(names)
    composed = [p for p in points if p.family == DIFFCR_STEPS]
    assert len(composed) == len(recipe.diffcr_targets) * len(recipe.diffcr_step_counts)
    assert recipe.num_samples == 300
    work = recipe.workload()
    assert work["trainings"] == 4 and work["images"] == (len(points) + 1) * 300
    tuned_steps = [p for p in points if p.family == DENSE_TUNED_STEPS]
    assert [p.steps for p in tuned_steps] == list(recipe.tuned_step_counts) and all(p.fine_tuned for p in tuned_steps)


def test_a_family_subset_measures_and_trains_only_what_it_samples():
    recipe = FrontierRecipe(families=(FEWER_STEPS, DENSE_TUNED, DENSE_TUNED_STEPS), spread_seeds=(1, 2))
    points = frontier_points(recipe)
    assert points[0].family == DENSE  # the reference always runs
    assert {p.family for p in points} == {DENSE, FEWER_STEPS, DENSE_TUNED, DENSE_TUNED_STEPS}
    assert len(points) == 1 + len(recipe.step_counts) + 1 + len(recipe.tuned_step_counts)
    assert recipe.trains_dense_tuned and not recipe.trains_diffcr
    work = recipe.workload()
    assert work["trainings"] == 1 and work["images"] == (len(points) + 2) * 300
    routed_only = FrontierRecipe(families=(DIFFCR,))
    assert routed_only.workload()["trainings"] == len(routed_only.diffcr_targets)
    assert not routed_only.trains_dense_tuned


def test_the_compositions_are_also_judged_against_dense_fine_tuned():
    rows = [
        _row(DENSE, 1.0, 20.0),
        _row(DENSE_TUNED, 1.0, 10.0),
        _row(DENSE_TUNED_STEPS, 2.0, 10.4, "fine-tuned, 10 steps"),
        _row(DENSE_TUNED_STEPS, 3.0, 12.0, "fine-tuned, 6 steps"),  # outside 10 + 0.5
        _row(DIFFCR_STEPS, 3.5, 10.3, "kept 0.58, 8 steps"),
    ]
    verdict = goal_verdict(rows, dense_quality=20.0, quality_spread=0.5)
    tuned = verdict["against_tuned"]
    assert tuned["fid_limit"] == pytest.approx(10.5)
    assert tuned["best"][DENSE_TUNED_STEPS]["speedup"] == 2.0
    assert tuned["best"][DIFFCR_STEPS]["speedup"] == 3.5
    assert "up to 3.50x (kept 0.58, 8 steps)" in tuned["explanation"]
    assert "up to 2.00x (fine-tuned, 10 steps)" in tuned["explanation"]
    assert goal_verdict(rows[:1], dense_quality=20.0, quality_spread=0.5)["against_tuned"] is None


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("step_counts", (25,), "outside [1, 20]"),
        ("diffcr_targets", (1.5,), "outside (0, 1]"),
        ("fbcache_thresholds", (-0.1,), ">= 0"),
        ("spread_seeds", (0,), "set 0 is the contest's noise"),
        ("num_per_class", 0, "num_per_class=0"),
        ("tuned_step_counts", (21,), "outside [1, 20]"),
        ("families", ("DiffCR-XL",), "choose among"),
    ],
)
def test_recipe_refuses_bad_values_by_name(field, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        FrontierRecipe(**{field: value})


# -- first-block cache on a routed model ------------------------------------------------------------------


def _routed_tiny_dit(kept: float = 0.5):
    model = tiny_dit()
    diffcr.apply(model, diffcr.DiffCRConfig(timestep_regions=2, ratio_bins=(1.0, kept, 0.0), init_kept_ratio=kept))
    diffcr.freeze(model)
    return model.eval()


def _sample(model, run_context, steps: int = 4) -> torch.Tensor:
    from diffcr.sampling import SampleConfig, denoise, initial_noise, model_image_shape

    noise = initial_noise([0, 1, 2], model_image_shape(model), seed=0)
    labels = torch.tensor([1, 4, 7])
    with run_context():
        return denoise(model, noise, labels, SampleConfig(steps=steps, batch_size=3), null_class=10)


def test_first_block_cache_at_threshold_zero_is_exactly_the_routed_model():
    routed = _routed_tiny_dit()
    reference = _sample(routed, contextlib.nullcontext)
    cache = FirstBlockCache(copy.deepcopy(routed), 0.0)
    assert diffcr.is_applied(cache.model)
    assert torch.equal(_sample(cache.model, cache.sampling_run), reference)
    assert torch.equal(_sample(cache.model, cache.sampling_run), reference)  # a second run starts afresh


def test_first_block_cache_skips_the_routed_blocks_at_a_high_threshold():
    from diffcr.benchmark import count_flops

    routed = _routed_tiny_dit()
    cache = FirstBlockCache(copy.deepcopy(routed), 1e6)
    _, routed_flops = count_flops(lambda: _sample(routed, contextlib.nullcontext))
    cached_images, cached_flops = count_flops(lambda: _sample(cache.model, cache.sampling_run))
    # every step after the first reuses the cached residual of blocks 2 and 3: far fewer FLOPs, other images
    assert cached_flops < 0.6 * routed_flops
    assert torch.isfinite(cached_images).all()
    assert not torch.equal(cached_images, _sample(routed, contextlib.nullcontext))


# -- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_base(tmp_path):
    """A random 3-block DiT at the digits' size, saved as a `--base` folder: the smoke run's models sample and
    train in a fraction of the shipped base's time (3 blocks: the first-block cache needs a first and a last)."""
    from diffcr.models.tiny_dit import build_base_model

    torch.manual_seed(0)
    folder = tmp_path / "base"
    build_base_model(num_layers=3, num_attention_heads=2, attention_head_dim=8).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


def test_bench_only_frontier_quick_writes_every_family(tmp_path, small_base):
    """The smoke run: `diffcr bench --only frontier --quick` through the CLI."""
    from typer.testing import CliRunner

    from diffcr.cli import app

    out = tmp_path / "frontier"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the quick recipe keeps the caller's threads; one is steady on a shared machine
    try:
        args = ["bench", "--only", "frontier", "--quick", "--base", str(small_base), "--out", str(out)]
        run = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert run.exit_code == 0, run.output
    assert "trainings x 2 steps" in run.output  # the estimate, printed before starting
    results = json.loads((out / "results.json").read_text())
    families = {row["family"] for row in results["rows"]}
    assert families == set(FAMILIES)
    for family in families:
        mine = [row for row in results["rows"] if row["family"] == family]
        assert mine and any(row["on_frontier"] for row in mine)
    dense = results["rows"][0]
    assert dense["family"] == DENSE and dense["speedup"] == 1.0
    dense_again = next(row for row in results["rows"] if row["family"] == FEWER_STEPS and row["steps"] == 4)
    assert dense_again["fid"] == pytest.approx(dense["fid"])  # same model, same noise: the same images
    assert dense_again["psnr_vs_dense"] == pytest.approx(100.0)
    spread = results["spread"]
    assert len(spread["dense_fids"]) == 2 and spread["fid_spread"] >= 0
    assert results["verdict"]["fid_limit"] == pytest.approx(dense["fid"] + spread["fid_spread"])
    assert isinstance(results["verdict"]["reached"], bool) and results["verdict"]["explanation"]
    assert (out / "frontier.png").stat().st_size > 1000
    text = (out / "results.md").read_text()
    assert "run-to-run spread" in text and "**Goal**" in text and text in run.output


def test_bench_frontier_refuses_a_bench_folder(tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app

    runner = CliRunner()
    bench_folder = tmp_path / "bench"
    bench_folder.mkdir()
    (bench_folder / "results.json").write_text(json.dumps({"machine": {}, "quick": True}))
    run = runner.invoke(app, ["bench", "--only", "frontier", "--quick", "--out", str(bench_folder)])
    assert run.exit_code == 2 and "another bench's results.json" in run.output
    assert "Traceback" not in run.output


def test_publish_refuses_a_frontier_folder_and_leaves_results_md_alone(tmp_path):
    from diffcr.harness import publish

    folder = tmp_path / "frontier"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"kind": "frontier", "rows": []}))
    (folder / "results.md").write_text("frontier table\n")
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("before\n")
    with pytest.raises(ValueError, match="holds a frontier run"):
        publish(folder, results_md)
    assert results_md.read_text() == "before\n"
