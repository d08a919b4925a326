"""`diffcr bench --task t2i` end to end on a tiny pretrained scene pipeline: every method tuned, trained where it
learns, sampled from the same seeds and judged by prompt accuracy; results.json, results.md and the plot written.
Speedup values depend on the machine's load, so only their presence and finiteness are checked."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from diffcr.cli import app
from diffcr.compare import DENSE, DENSE_TUNED, DIFFCR_L, DIFFCR_LT, FBCACHE, FEWER_STEPS, RANDOM, TOME, UNIFORM
from diffcr.t2i_bench import DIFFCR_LT_REGIONS, PLOT_NAME, StepLatency, T2IBenchRecipe, load_bench_pipeline

runner = CliRunner()
METHODS = (DENSE, DENSE_TUNED, DIFFCR_LT, DIFFCR_L, UNIFORM, RANDOM, FBCACHE, FEWER_STEPS, DIFFCR_LT_REGIONS)
# the quick recipe cut further, so that the whole bench runs in seconds
TINY = replace(
    T2IBenchRecipe.quick(),
    train_steps=2,
    train_batch=2,
    sampler_steps=2,
    num_prompts=4,
    sample_batch=2,
    num_reference=20,
    num_threads=1,
)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_scene_pipeline):
    return tiny_scene_pipeline


@pytest.fixture(scope="module")
def bench(tiny_pipeline, tmp_path_factory):
    """One run through the CLI (`--task t2i --quick`), the quick recipe swapped for the tinier one."""
    out = tmp_path_factory.mktemp("bench") / "t2i"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(T2IBenchRecipe, "quick", classmethod(lambda cls: TINY))
        result = runner.invoke(
            app, ["bench", "--task", "t2i", "--quick", "--base", str(tiny_pipeline), "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text()), result.output


def rows_of(results: dict, method: str) -> list[dict]:
    return [row for row in results["rows"] if row["method"] == method]


def test_every_method_has_a_row_with_finite_speedup_and_accuracy(bench):
    _, results, _ = bench
    for method in METHODS:
        rows = rows_of(results, method)
        assert rows, f"no row for {method}"
        for row in rows:
            assert math.isfinite(row["speedup"]) and row["speedup"] > 0, row
            assert math.isfinite(row["flop_speedup"]) and row["flop_speedup"] > 0, row
            for name in ("digit_accuracy", "empty_accuracy", "image_accuracy"):
                assert 0.0 <= row[name] <= 1.0, (name, row)
            assert set(row["by_kind"]) == {"heldout", "seen", "single"}  # 4 prompts still hold every kind
            assert math.isfinite(row["fid"]) or math.isnan(row["fid"])  # 4 images: FID may be degenerate
    dense = rows_of(results, DENSE)[0]
    assert dense["speedup"] == 1.0 and dense["psnr_vs_dense"] is None
    assert results["num_prompts"] == 4 and all(r["by_kind"]["heldout"]["num_images"] == 2 for r in results["rows"])
    # every target gets one row per method that is tuned to it
    targeted = [r for r in results["rows"] if r["target_speedup"] is not None]
    assert {r["target_speedup"] for r in targeted} == set(TINY.speedups)


def test_fewer_steps_rows_take_fewer_steps_than_the_others(bench):
    _, results, _ = bench
    for row in results["rows"]:
        if row["method"] == FEWER_STEPS:
            assert 1 <= row["steps"] < TINY.sampler_steps
        else:
            assert row["steps"] == TINY.sampler_steps


def test_routed_rows_carry_their_timestep_regions(bench):
    _, results, _ = bench
    expected = {
        DIFFCR_LT: TINY.timestep_regions,
        DIFFCR_L: 1,
        UNIFORM: 1,
        RANDOM: TINY.timestep_regions,
        DIFFCR_LT_REGIONS: len(TINY.region_targets),
    }
    for method, regions in expected.items():
        for row in rows_of(results, method):
            assert row["timestep_regions"] == regions, row
            assert len(row["schedule"]) == 8 and all(len(layer) == regions for layer in row["schedule"])
            assert 0.0 < row["mean_kept_ratio"] <= 1.0
            # the demo's routing (cross-attention for bypassed tokens) in every routed method
            assert row["route_cross_attention"] is TINY.route_cross_attention is False, row
    # uniform routing keeps the tuned ratio everywhere: its ratios never learn
    knob = results["uniform_knobs"][str(TINY.speedups[0])]
    uniform = rows_of(results, UNIFORM)[0]
    assert all(kept == pytest.approx(knob) for layer in uniform["schedule"] for kept in layer)
    for method in (DENSE, DENSE_TUNED, FBCACHE, FEWER_STEPS):
        assert all(row["timestep_regions"] is None for row in rows_of(results, method))


def test_region_targets_row_is_trained_as_the_demo_trains(bench):
    from diffcr.t2i_demo import T2IDemoRecipe

    _, results, _ = bench
    (row,) = rows_of(results, DIFFCR_LT_REGIONS)
    assert row["target_speedup"] == TINY.region_targets_at
    assert row["knob"] == "region targets 0.6 / 1 / 0.3 / 0.1"
    # the bench's config for the row is the demo's, field for field
    demo = T2IDemoRecipe().diffcr_config().to_dict()
    bench_config = T2IBenchRecipe().region_targets_config().to_dict()
    assert bench_config.pop("target_kept_ratio") == pytest.approx(demo.pop("target_kept_ratio"))
    assert bench_config == demo


def test_region_targets_row_must_sit_under_a_target():
    with pytest.raises(ValueError, match="region_targets_at=3.0 is not one of speedups"):
        T2IBenchRecipe(region_targets_at=3.0)
    assert T2IBenchRecipe(region_targets=None, region_targets_at=3.0).region_targets is None
    with pytest.raises(ValueError, match="outside the bins' range"):
        T2IBenchRecipe(region_targets=(0.6, 1.0, 0.3, 0.01))  # the bins stop at 0.1


def test_report_names_every_method_and_why_tome_is_skipped(bench):
    out, results, output = bench
    markdown = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in markdown
    assert (out / PLOT_NAME).stat().st_size > 0
    skipped = {entry["method"]: entry["reason"] for entry in results["skipped"]}
    assert set(skipped) == {TOME} and "ada_norm_single" in skipped[TOME]
    assert f"Skipped, {TOME}" in markdown
    assert "route_cross_attention=False" in markdown
    assert "| method | target |" in output  # the CLI prints the table


def test_bench_refuses_task_flags_that_do_not_belong(tmp_path):
    result = runner.invoke(app, ["bench", "--task", "video", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--task" in result.output
    result = runner.invoke(app, ["bench", "--task", "t2i", "--only", "scaling", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--only" in result.output


def test_bench_refuses_a_pipeline_that_cannot_draw_scenes(tmp_path):
    from t2i_helpers import build_tiny_pixart_pipeline

    folder = build_tiny_pixart_pipeline(tmp_path / "rgb")
    with pytest.raises(ValueError, match="digit scenes"):
        load_bench_pipeline(folder)


def test_prompts_hold_every_kind_however_few():
    prompts, kinds = T2IBenchRecipe().prompts()
    assert len(prompts) == 50 and kinds.count("heldout") == 20
    prompts, kinds = replace(T2IBenchRecipe(), num_prompts=3).prompts()
    assert kinds == ["heldout", "seen", "single"] and len(set(prompts)) == 3


def test_fewer_steps_account_for_the_fixed_cost_of_a_call():
    latency = StepLatency(fixed_seconds=1.0, seconds_per_step=0.5, full_steps=20)  # dense call 11 s
    assert latency.steps_for(2.0) == 9  # 1 + 9 * 0.5 = 5.5 s: half of dense, not 20 / 2 = 10 steps
    assert latency.steps_for(1.01) == 19  # always fewer than dense
    assert latency.steps_for(100.0) == 1
    assert StepLatency(0.0, -1.0, 20).steps_for(2.0) == 10  # a noisy fit falls back to steps / target


def test_trained_variants_take_the_demo_budget_and_schedule():
    from diffcr.t2i_demo import T2IDemoRecipe

    demo = T2IDemoRecipe()
    for dense in (True, False):
        cfg = T2IBenchRecipe().train_config(dense=dense)
        assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.lr_schedule) == (
            demo.steps,
            demo.batch_size,
            demo.lr,
            demo.lr_schedule,
        )
    assert T2IBenchRecipe(lr_schedule="constant").train_config(dense=False).lr_schedule == "constant"
    # the routed variants fix their schedule where the demo does; dense fine-tuning has no kept ratios to fix
    fixing = T2IBenchRecipe(train_steps=40, freeze_schedule_at=30)
    assert fixing.train_config(dense=False).freeze_schedule_at == 30
    assert fixing.train_config(dense=True).freeze_schedule_at == 0
    assert T2IBenchRecipe().train_config(dense=False).freeze_schedule_at == demo.freeze_schedule_at
    with pytest.raises(ValueError, match="freeze_schedule_at=50 is after the last step"):
        T2IBenchRecipe(train_steps=40, freeze_schedule_at=50)


@pytest.mark.parametrize(
    ("only", "module", "runner_name"),
    [("all", "diffcr.t2i_bench", "run_t2i_bench"), ("frontier", "diffcr.t2i_frontier", "run_t2i_frontier")],
)
@pytest.mark.parametrize("paper_routing", [False, True])
def test_paper_routing_flag_reaches_the_recipe(tmp_path, monkeypatch, only, module, runner_name, paper_routing):
    import importlib

    seen = {}

    def fake_run(out, recipe, base):
        seen["recipe"] = recipe
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("table\n")
        return {"seconds": 0.0}

    monkeypatch.setattr(importlib.import_module(module), runner_name, fake_run)
    args = ["bench", "--task", "t2i", "--only", only, "--quick", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args + ["--paper-routing"] * paper_routing)
    assert result.exit_code == 0, result.output
    # the paper's routing: bypassed tokens skip cross-attention too; the default is the demo's
    assert seen["recipe"].route_cross_attention is paper_routing


def test_paper_routing_is_refused_for_the_class_task(tmp_path):
    result = runner.invoke(app, ["bench", "--paper-routing", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--paper-routing belongs to --task t2i" in result.output
    assert not (tmp_path / "a").exists()
