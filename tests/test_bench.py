"""The benchmark harness's own logic: FLOP and memory counting, the speedup-matching search, the baselines it
runs (ToMe, first-block cache, random and uniform routing), the findings' measures and the report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import diffcr
from conftest import DiTCase, tiny_dit
from diffcr.benchmark import count_flops, match_knob, model_flops, peak_memory


def _adaln_flops(width: int) -> int:
    # per sample and block: timestep MLP (256 -> C -> C), then the 6C modulation of adaLN-Zero
    return 2 * (256 * width + width * width + width * 6 * width)


def _dit_inputs(batch: int = 2, timestep: int = 500):
    inputs = DiTCase.inputs(torch.full((batch,), timestep))
    return inputs


def test_counted_flops_of_one_block_match_a_hand_count():
    model = tiny_dit()
    block = model.transformer_blocks[0]
    width, tokens, batch = 16, 16, 2
    hidden = torch.randn(batch, tokens, width)
    labels = torch.tensor([1, 2])
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        _, counted = count_flops(lambda: block(hidden, timestep=timestep, class_labels=labels))
    projections = 2 * tokens * 4 * width * width
    attention = 2 * 2 * tokens * tokens * width
    mlp = 2 * tokens * 2 * width * 4 * width
    assert counted == batch * (projections + attention + mlp + _adaln_flops(width))


@pytest.mark.parametrize("kept", [0.5, 0.25])
def test_counted_flops_of_a_routed_model_match_the_analytic_count(kept):
    dense = tiny_dit()
    routed = copy.deepcopy(dense)
    diffcr.apply(routed, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=(1.0, kept, 0.0), init_kept_ratio=kept))
    diffcr.freeze(routed)
    inputs = _dit_inputs()
    with torch.no_grad():
        _, dense_flops = count_flops(lambda: dense(**inputs))
        _, routed_flops = count_flops(lambda: routed(**inputs))
    layers, tokens, width, batch = 3, 16, 16, 2
    kept_tokens = int(kept * tokens)
    block = model_flops(dense, kept_tokens) // layers  # one block on the kept tokens
    router = 2 * tokens * width
    saved = layers * batch * (model_flops(dense, tokens) // layers - block - router)
    assert dense_flops - routed_flops == saved
    assert model_flops(dense, tokens, [kept] * layers, batch_size=batch) == layers * batch * (block + router)


def test_match_knob_finds_the_knob_closest_to_the_target():
    calls = []

    def speedup(knob):
        calls.append(knob)
        return 1.0 + 2.0 * knob  # 1x at 0, 3x at 1

    knob, reached = match_knob(speedup, 2.0, 0.0, 1.0, iterations=8)
    assert knob == pytest.approx(0.5, abs=1 / 256)
    assert reached == pytest.approx(2.0, abs=0.01)
    assert len(calls) <= 10
    # unreachable targets give the nearest end of the range
    assert match_knob(speedup, 5.0, 0.0, 1.0)[0] == 1.0
    assert match_knob(speedup, 0.5, 0.0, 1.0)[0] == 0.0


def test_match_knob_on_integer_knobs_returns_an_integer():
    # sampling steps: fewer steps = faster, so the knob is -steps
    knob, reached = match_knob(lambda neg: 20 / -neg, 1.5, -20.0, -1.0, iterations=10, integer=True)
    assert knob == -13.0  # 20/13 = 1.54 is the closest to 1.5
    assert reached == pytest.approx(20 / 13)
    with pytest.raises(ValueError, match="low"):
        match_knob(lambda k: k, 1.0, 2.0, 1.0)


def test_peak_memory_counts_new_tensors_and_routing_lowers_it():
    _, peak = peak_memory(lambda: torch.ones(1000))
    assert peak == 4000

    def two_live():
        a = torch.ones(1000)
        b = torch.ones(1000)
        return a, b

    def one_at_a_time():
        for _ in range(2):
            torch.ones(1000)

    assert peak_memory(two_live)[1] == 8000
    assert peak_memory(one_at_a_time)[1] == 4000
    weight = torch.ones(1000)
    assert peak_memory(lambda: weight.t().view(10, 100))[1] == 0  # views of existing memory are not new
    dense = tiny_dit()
    routed = copy.deepcopy(dense)
    diffcr.apply(routed, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=(1.0, 0.25, 0.0), init_kept_ratio=0.25))
    diffcr.freeze(routed)
    inputs = _dit_inputs(batch=8)
    with torch.no_grad():
        dense_peak = peak_memory(lambda: dense(**inputs))[1]
        routed_peak = peak_memory(lambda: routed(**inputs))[1]
    assert 0 < routed_peak < dense_peak


# -- baselines --------------------------------------------------------------------------------------------


def test_tome_at_ratio_zero_equals_dense_and_merging_cuts_flops():
    pytest.importorskip("tomesd")
    from diffcr.baselines import apply_tome

    dense = tiny_dit()
    inputs = _dit_inputs(batch=2)
    args = (inputs.pop("hidden_states"),)  # tomesd reads the image size from the first positional argument
    with torch.no_grad():
        reference = dense(*args, **inputs).sample
        unmerged = apply_tome(copy.deepcopy(dense), 0.0)
        assert torch.equal(unmerged(*args, **inputs).sample, reference)
        merged = apply_tome(copy.deepcopy(dense), 0.5)
        out, merged_flops = count_flops(lambda: merged(*args, **inputs).sample)
        _, dense_flops = count_flops(lambda: dense(*args, **inputs))
    assert not torch.allclose(out, reference)
    assert merged_flops < 0.75 * dense_flops
    with pytest.raises(ValueError, match="0.75"):
        apply_tome(copy.deepcopy(dense), 0.9)


def test_tomesd_defaults_merge_nothing_on_a_patch_2_dit():
    tomesd = pytest.importorskip("tomesd")
    dense = tiny_dit()
    inputs = _dit_inputs()
    args = (inputs.pop("hidden_states"),)
    patched = copy.deepcopy(dense)
    tomesd.apply_patch(patched, ratio=0.5)  # max_downsample=1: the documented pitfall apply_tome avoids
    with torch.no_grad():
        assert torch.equal(patched(*args, **inputs).sample, dense(*args, **inputs).sample)


def test_first_block_cache_threshold_zero_is_dense_and_a_high_threshold_skips_blocks():
    from diffcr.baselines import FirstBlockCache

    dense = tiny_dit()
    inputs = _dit_inputs(batch=2)
    exact = FirstBlockCache(copy.deepcopy(dense), 0.0)
    skipping = FirstBlockCache(copy.deepcopy(dense), 1e6)
    with torch.no_grad():
        reference = [dense(**{**inputs, "timestep": inputs["timestep"] - 100 * i}).sample for i in range(3)]
        with exact.sampling_run() as model:
            for i in range(3):
                out = model(**{**inputs, "timestep": inputs["timestep"] - 100 * i}).sample
                torch.testing.assert_close(out, reference[i], rtol=0, atol=1e-5)
        with skipping.sampling_run() as model:
            _, first = count_flops(lambda: model(**inputs))
            _, second = count_flops(lambda: model(**{**inputs, "timestep": inputs["timestep"] - 100}))
    block = model_flops(dense, 16) // 3 + _adaln_flops(16)
    assert first - second == 2 * 2 * block  # blocks 2 and 3 of 3 skipped, batch 2
    with torch.no_grad(), skipping.sampling_run() as model:  # a new run starts from a fresh cache
        assert count_flops(lambda: model(**inputs))[1] == first


def test_random_routing_keeps_the_schedule_and_changes_the_tokens():
    from diffcr.baselines import randomize_routers

    model = tiny_dit()
    diffcr.apply(model, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=(1.0, 0.5, 0.0), init_kept_ratio=0.5))
    diffcr.freeze(model)
    control = randomize_routers(copy.deepcopy(model), seed=0)
    inputs = _dit_inputs()
    with torch.no_grad():
        learned, learned_flops = count_flops(lambda: model(**inputs).sample)
        random, random_flops = count_flops(lambda: control(**inputs).sample)
    assert learned_flops - random_flops == 3 * 2 * (2 * 16 * 16)  # only the router projections are gone
    assert not torch.allclose(learned, random)
    again = randomize_routers(copy.deepcopy(model), seed=0)
    with torch.no_grad():
        assert torch.equal(again(**inputs).sample, random)  # seeded


def test_uniform_routing_keeps_its_ratio_through_training(tmp_path):
    from diffcr.baselines import uniform_config
    from diffcr.data.mnist import ImageDataset
    from diffcr.models import build_base_model
    from diffcr.train import TrainConfig, train

    config = uniform_config(0.4)
    assert config.ratio_bins == (1.0, 0.4, 0.05) and config.ratio_loss_weight == 0.0
    torch.manual_seed(0)
    model = build_base_model(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8)
    gen = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(16) % 10, tuple("0123456789"))
    cfg = TrainConfig(mode="full", steps=2, batch_size=4, ratio_lr=0.0, checkpoint_every=2)
    result = train(tmp_path / "run", model, data, cfg, diffcr_config=config, progress=False)
    sched = diffcr.schedule(result.model)
    assert sched.continuous == [[pytest.approx(0.4)]] * 2
    assert sched.kept_ratio == [[0.4]] * 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["mean_kept_ratio"] == pytest.approx(0.4) for row in rows)
    with pytest.raises(ValueError, match="kept_ratio"):
        uniform_config(0.0)


# -- findings ---------------------------------------------------------------------------------------------


def test_stroke_tokens_marks_patches_that_touch_a_stroke():
    from diffcr.findings import stroke_tokens

    images = -torch.ones(1, 1, 4, 4)
    images[0, 0, 0, 1] = 1.0  # top-left patch
    images[0, 0, 3, 3] = 0.5  # bottom-right patch
    assert stroke_tokens(images, 2).tolist() == [[True, False, False, True]]


def test_stroke_alignment_reads_the_tokens_the_routers_chose():
    from diffcr.findings import stroke_alignment
    from diffcr.sampling import SampleConfig

    model = tiny_dit()
    diffcr.apply(model, diffcr.DiffCRConfig(timestep_regions=2, ratio_bins=(1.0, 0.5, 0.0), init_kept_ratio=0.5))
    with torch.no_grad():
        model.diffcr.kept_ratio[1, :] = 1.0  # layer 1 stays dense: it must not be reported
    diffcr.freeze(model)
    labels = torch.tensor([1, 2, 3])
    result = stroke_alignment(model, labels, SampleConfig(steps=3, batch_size=3))
    assert result.layers == [0, 2]
    assert all(0.0 <= value <= 1.0 for value in result.on_stroke + result.chance)
    assert set(result.by_phase) <= {"early (noisy)", "middle", "late (clean)"}
    assert "router_logits" not in vars(model.diffcr)  # the recorder is removed afterwards


@pytest.mark.parametrize("random_scores", [False, True])
def test_recorded_masks_are_the_tokens_the_blocks_computed(random_scores):
    """A bypassed token leaves its block bit for bit unchanged, so the tokens a block changed are the ones it
    computed: they must be exactly the recorded mask, for learned and for random router scores."""
    from diffcr.baselines import randomize_routers
    from diffcr.findings import computed_token_masks
    from diffcr.sampling import SampleConfig

    model = tiny_dit()
    diffcr.apply(model, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=(1.0, 0.5, 0.0), init_kept_ratio=0.5))
    diffcr.freeze(model)
    if random_scores:
        randomize_routers(model, seed=3)
    changed = []

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        changed.append((output != hidden).any(-1))  # (2B, N): tokens the block touched

    hook = model.transformer_blocks[1].register_forward_hook(record, with_kwargs=True)
    try:
        labels = torch.tensor([1, 2])
        _, computed = computed_token_masks(model, labels, SampleConfig(steps=2, batch_size=2))
    finally:
        hook.remove()
    layer1 = [mask for _, layer, mask in computed if layer == 1]
    assert len(layer1) == 2 == len(changed)
    for mask, touched in zip(layer1, changed):
        assert mask.sum(1).tolist() == [8, 8]
        assert torch.equal(mask, touched[:2])
    assert ("router_logits" in vars(model.diffcr)) == random_scores  # the recorder is gone, a random scorer stays


# -- report -----------------------------------------------------------------------------------------------


def test_publish_replaces_only_the_bench_section(tmp_path):
    from diffcr.harness import BENCH_END, BENCH_START, publish

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "results.md").write_text("first table\n")
    (bench / "plot.png").write_bytes(b"png")
    docs = tmp_path / "docs" / "RESULTS.md"
    docs.parent.mkdir()
    docs.write_text("# Results\n\nhand-written intro\n")
    publish(bench, docs)
    text = docs.read_text()
    assert "hand-written intro" in text and "first table" in text and text.count(BENCH_START) == 1
    (bench / "results.md").write_text("second table\n")
    docs.write_text(docs.read_text() + "\nafter the section\n")
    publish(bench, docs)
    text = docs.read_text()
    assert "second table" in text and "first table" not in text
    assert text.index("hand-written intro") < text.index(BENCH_START) < text.index(BENCH_END) < text.index("after")
    assert (docs.parent / "images" / "bench" / "plot.png").read_bytes() == b"png"
    with pytest.raises(FileNotFoundError, match="diffcr bench"):
        publish(tmp_path / "missing", docs)


def test_bench_quick_runs_the_whole_harness(tmp_path):
    """The smoke run: every part of `diffcr bench --quick` through the CLI, on tiny sizes."""
    from typer.testing import CliRunner

    from diffcr.cli import app
    from diffcr.compare import DENSE, DENSE_TUNED, DIFFCR_L, DIFFCR_LT, FBCACHE, FEWER_STEPS, RANDOM, TOME, UNIFORM

    out = tmp_path / "bench"
    run = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out)])
    assert run.exit_code == 0, run.output
    results = json.loads((out / "results.json").read_text())
    methods = {row["method"] for row in results["comparison"]}
    assert {DENSE, DENSE_TUNED, DIFFCR_LT, DIFFCR_L, UNIFORM, RANDOM, TOME, FEWER_STEPS, FBCACHE} <= methods
    assert any(m.startswith("DiffCR-LT, gate sigmoid") for m in methods)
    dense = next(row for row in results["comparison"] if row["method"] == DENSE)
    assert dense["speedup"] == 1.0 and dense["flop_speedup"] == 1.0
    for row in results["comparison"]:
        assert row["seconds_per_batch"] > 0 and row["gflops_per_image"] > 0 and 0 <= row["accuracy"] <= 1
    assert {r["family"] for r in results["scaling"]} == {"pixart", "dit"}
    assert [(r["family"], r["kept_ratio"]) for r in results["train_step"]] == [
        ("pixart", 0.95),
        ("pixart", 0.45),
        ("dit", 0.95),
        ("dit", 0.45),
    ]
    assert set(results["part_seconds"]) == {"scaling", "train", "compare"}
    assert results["findings"]["convergence"] and results["findings"]["strokes"]["layers"] is not None
    text = (out / "results.md").read_text()
    for heading in ("Methods at matched speedups", "findings, in miniature", "Speed scaling"):
        assert heading in text
    for plot in ("quality_vs_speedup", "speed_scaling"):
        assert (out / f"{plot}.png").stat().st_size > 1000
