"""The demo is budgeted in steps, estimates its time before training, and flags a run that did not do what its
recipe planned (an early stop, a missed kept-ratio target) in the summary and the report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from diffcr.assess import KEPT_RATIO_TOLERANCE, run_warnings, summary_table, training_facts
from diffcr.cli import app
from diffcr.demo import DemoEstimate, DemoRecipe


def assessment(planned=140, done=140, max_minutes=None, target=0.5, kept=0.5) -> dict:
    """A synthetic assessment (only what the summary and the warnings read)."""
    quality = {"accuracy": 0.95, "fid": 300.0, "psnr_vs_dense": 14.0, "ssim_vs_dense": 0.5}
    return {
        "num_images": 100,
        "dense_seconds_per_batch": 15.0,
        "diffcr_seconds_per_batch": 8.0,
        "speedup": 1.9,
        "flop_ratio": 2.2,
        "mean_kept_ratio_sampling": kept,
        "dense": quality,
        "diffcr": quality,
        "real_fid_floor": 160.0,
        "training": {
            "planned_steps": planned,
            "steps_done": done,
            "max_minutes": max_minutes,
            "train_seconds": 300.0,
            "target_kept_ratio": target,
        },
    }


def test_default_and_quick_recipes_have_no_time_cap():
    for recipe in (DemoRecipe(), DemoRecipe.quick()):
        assert recipe.minutes is None and recipe.steps >= 50
        assert recipe.train_config().max_minutes is None
        assert recipe.train_config().steps == recipe.steps


@pytest.mark.parametrize("minutes", [0, -1, float("nan"), float("inf")])
def test_recipe_rejects_a_bad_time_cap(minutes):
    with pytest.raises(ValueError, match="minutes"):
        DemoRecipe(minutes=minutes)


def test_no_warning_when_the_run_did_what_it_planned():
    assert run_warnings(assessment(kept=0.5 + KEPT_RATIO_TOLERANCE - 0.001)) == []
    assert "WARNING" not in summary_table(assessment())
    assert run_warnings(assessment(target=None, kept=1.0)) == []  # a dense run has no target
    assert run_warnings({"mean_kept_ratio_sampling": 0.9}) == []  # an assessment without training facts


def test_warns_when_a_time_cap_stops_training_and_the_target_is_missed():
    # the case of the issue: 62 of 140 steps under a 5-minute cap, mean kept 0.60 against 0.5
    lines = run_warnings(assessment(done=62, max_minutes=5, kept=0.60))
    assert len(lines) == 2 and all(line.startswith("WARNING:") for line in lines)
    assert "step 62 of 140" in lines[0] and "--minutes 5" in lines[0] and "not those of its recipe" in lines[0]
    assert "0.600 vs target 0.500" in lines[1] and "less compressed" in lines[1]


def test_warns_on_an_interrupted_run_and_an_overshot_target():
    stopped, missed = run_warnings(assessment(done=10, kept=0.4))
    assert "step 10 of 140" in stopped and "interrupted" in stopped
    assert "more compressed" in missed


def test_summary_shows_the_warnings_below_the_table_unless_asked_not_to():
    flagged = assessment(done=62, max_minutes=5, kept=0.6)
    table, _, warnings = summary_table(flagged).partition("\n\n")
    assert "measured speedup" in table and "WARNING" not in table
    assert warnings.splitlines() == run_warnings(flagged)
    assert "WARNING" not in summary_table(flagged, warnings=False)


def test_training_facts_read_the_run(tmp_path):
    assert training_facts(tmp_path) == {}
    run = {"train": {"steps": 140, "max_minutes": 5.0}, "diffcr": {"target_kept_ratio": 0.5}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    rows = [{"step": i, "seconds": 2.0 * i} for i in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert training_facts(tmp_path) == {
        "planned_steps": 140,
        "steps_done": 3,
        "max_minutes": 5.0,
        "train_seconds": 6.0,
        "target_kept_ratio": 0.5,
    }


def test_estimate_describes_steps_time_and_a_cap():
    estimate = DemoEstimate(steps=120, seconds_per_step=0.9, sampling_seconds=90.0, other_seconds=10.0)
    assert estimate.capped_at_step is None and estimate.total_seconds == pytest.approx(208.0)
    text = estimate.describe()
    assert "training 120 steps, about 1.8 min on this machine (0.90 s/step)" in text
    assert "whole demo about 3.5 min" in text and "cap" not in text
    capped = DemoEstimate(steps=140, seconds_per_step=4.8, sampling_seconds=200, other_seconds=20, max_minutes=5)
    assert capped.capped_at_step == 63 and capped.train_seconds == pytest.approx(63 * 4.8)
    assert "near step 63 of 140" in capped.describe()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "pre"
    args = ["pretrain", "--out", out, "--num-layers", "1", "--steps", "2", "--batch-size", "4", "--warmup-steps", "0"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


def test_demo_cut_short_by_a_time_cap_says_so(pretrained, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--base", pretrained / "model", "--out", out, "--steps", "2", "--num-per-class", "1"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--minutes", "1e-5"]])
    assert result.exit_code == 0, result.output
    assert "training 2 steps, about" in result.output and "whole demo about" in result.output
    assert "near step 1 of 2" in result.output  # the estimate foresees the cap
    assert "WARNING: training stopped at step 1 of 2 planned (the --minutes 1e-05 time cap)" in result.output
    assert "1 of 2 planned training steps" in result.output
    saved = json.loads((out / "assessment.json").read_text())
    assert saved["training"]["steps_done"] == 1 and saved["training"]["planned_steps"] == 2
    assert any("step 1 of 2" in line for line in saved["warnings"])
    page = (out / "report" / "report.html").read_text()
    assert 'class="warning">WARNING: training stopped at step 1 of 2' in page and "1 of 2 planned steps" in page
    assert "WARNING: training stopped" in (out / "report" / "summary.md").read_text()


def test_demo_rejects_a_zero_time_cap(pretrained, tmp_path):
    result = CliRunner().invoke(app, ["demo", "--base", str(pretrained / "model"), "--minutes", "0"])
    assert result.exit_code == 2 and "minutes=0.0 must be a positive number" in result.output


# -- the text-to-image demo flags its run the same way ---------------------------------------------------------
def t2i_evaluation(planned=200, done=200, max_minutes=None, target=0.5, kept=0.5) -> tuple[dict, dict]:
    """A synthetic text-to-image evaluation and judgement (only what the summary and the warnings read)."""
    accuracy = {"digit_accuracy": 0.9, "empty_accuracy": 0.95, "image_accuracy": 0.8, "by_kind": {}}
    evaluation = {
        "speedup": 1.6,
        "latency_per_image_s": {"dense": 0.2, "diffcr": 0.125},
        "mean_kept_ratio": kept,
        "psnr_vs_dense_db": 20.0,
        "ssim_vs_dense": 0.8,
        "training": assessment(planned, done, max_minutes, target, kept)["training"],
    }
    judgement = {"num_reference": 500, "dense": {"accuracy": accuracy, "fid": 10.0}}
    judgement["diffcr"] = judgement["dense"]
    return evaluation, judgement


def test_t2i_summary_has_no_warning_when_the_run_did_what_it_planned():
    from diffcr.t2i_demo import summary_table as t2i_summary

    assert "WARNING" not in t2i_summary(*t2i_evaluation(kept=0.5 + KEPT_RATIO_TOLERANCE - 0.001))
    evaluation, judgement = t2i_evaluation(kept=0.9)
    del evaluation["training"]  # an evaluation without training facts (a plain `diffcr evaluate`)
    assert "WARNING" not in t2i_summary(evaluation, judgement)
    # an assessment written before FLOPs were counted has no FLOP-ideal row; one with them shows it second
    assert "FLOP-ideal" not in t2i_summary(evaluation, judgement)
    rows = t2i_summary({**evaluation, "flop_ratio": 1.876}, judgement).splitlines()
    assert rows[3] == "| FLOP-ideal speedup (matrix products counted) | 1.00x | 1.88x |"


def test_t2i_summary_warns_when_training_stopped_early_or_missed_its_target():
    from diffcr.t2i_demo import summary_table as t2i_summary

    evaluation, judgement = t2i_evaluation(done=90, max_minutes=5, kept=0.62)
    table, _, warnings = t2i_summary(evaluation, judgement).partition("\n\n")
    assert "measured sampling speedup" in table and "WARNING" not in table
    lines = warnings.splitlines()
    # the same lines as the class demo's, from the same helper
    assert lines == run_warnings({"training": evaluation["training"], "mean_kept_ratio_sampling": 0.62})
    assert "step 90 of 200" in lines[0] and "--minutes 5" in lines[0]
    assert "0.620 vs target 0.500" in lines[1] and "less compressed" in lines[1]
    assert "WARNING" not in t2i_summary(evaluation, judgement, warnings=False)


def test_t2i_demo_cut_short_says_so_in_summary_and_report(tiny_scene_pipeline, tmp_path, monkeypatch):
    from dataclasses import dataclass, replace

    from diffcr.data import scenes
    from diffcr.t2i_demo import PROBE_TIMED_STEPS, PROBE_WARMUP_STEPS, T2IDemoRecipe, run_t2i_demo
    from diffcr.t2i_demo import summary_table as t2i_summary

    every_tenth = scenes.evaluation_prompts()[::10]  # every kind of prompt, a fifth of the sampling time
    monkeypatch.setattr(scenes, "evaluation_prompts", lambda: every_tenth)

    @dataclass(frozen=True)
    class CappedRecipe(T2IDemoRecipe):
        """The demo's recipe with a time cap that stops its training after one step (not the estimate's probe)."""

        def train_config(self, seed: int = 0):
            cfg = super().train_config(seed)
            probe = self.steps == PROBE_WARMUP_STEPS + PROBE_TIMED_STEPS
            return cfg if probe else replace(cfg, max_minutes=1e-5)

    recipe = CappedRecipe(
        steps=3, batch_size=2, sampler_steps=2, sample_batch_size=5, num_reference=20, num_router_prompts=1
    )
    out = tmp_path / "run"
    result = run_t2i_demo(out, recipe, base=str(tiny_scene_pipeline), progress=False)
    assert result["train_steps"] == 1
    stopped, missed = result["warnings"]  # one step leaves the kept ratios near 1.0, far from the target
    assert "WARNING: training stopped at step 1 of 3 planned (the --minutes 1e-05 time cap)" in stopped
    target = f"vs target {recipe.target_kept_ratio:.3f}"
    assert "WARNING: the schedule missed its target" in missed and target in missed
    assert t2i_summary(result["evaluation"], result["judgement"]).splitlines()[-2:] == [stopped, missed]
    page = result["report"].read_text()
    assert 'class="warning">WARNING: training stopped at step 1 of 3' in page and "1 of 3 planned steps" in page
    assert "WARNING: the schedule missed its target" in page
