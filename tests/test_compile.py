"""torch.compile and torch.export on routed models: outputs equal eager, graphs and recompiles counted.

Regional compilation (`block.compile()`) compiles each block's own computation on its kept tokens, with
routing eager: no graph break under `fullgraph=True`, at most one graph per distinct kept count. Whole-model
compilation specialises on the batch's timestep region only: at most one graph per region, plus one for every
batch that mixes regions. A schedule that is the same in every region (a fresh model, DiffCR-L) traces into one
graph without reading the timestep, so `fullgraph=True` and `torch.export` work.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import diffcr
from conftest import FluxCase, SD3Case, tiny_pixart
from conftest import run as conftest_run
from diffcr.ratios import num_kept_tokens

# per layer, one kept ratio per timestep region (4 regions of 250 steps)
REGION_TABLE = [[1.0, 0.8, 0.5, 0.3], [0.9, 0.8, 0.5, 0.3]]
UNIFORM = [(100, 100), (400, 400), (600, 600), (900, 900)]
MIXED = [(100, 900), (900, 400), (600, 100)]


def routed_pixart(table=REGION_TABLE, regions: int = 4, freeze: bool = True):
    model = tiny_pixart(num_layers=len(table))
    diffcr.apply(model, diffcr.DiffCRConfig(target_kept_ratio=0.5, timestep_regions=regions))
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.tensor(table))
    if freeze:
        diffcr.freeze(model)
    return model.eval()


def inputs(timesteps, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(timesteps), 4, 8, 8, generator=generator)
    context = torch.randn(len(timesteps), 5, 12, generator=generator)
    return (hidden,), {"encoder_hidden_states": context, "timestep": torch.tensor(timesteps)}


def run(model, timesteps):
    args, kwargs = inputs(timesteps)
    return model(*args, **kwargs).sample


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def test_regional_compilation_is_fullgraph_with_a_graph_per_kept_count_at_most(dynamo):
    model = routed_pixart()
    expected = {t: run(model, t) for t in UNIFORM + MIXED}
    for block in model.transformer_blocks:
        block.compile(fullgraph=True)  # what diffusers' compile_repeated_blocks calls
    with torch.no_grad():
        for t in (UNIFORM + MIXED) * 2:
            torch.testing.assert_close(run(model, t), expected[t], atol=1e-5, rtol=1e-5)
    num_tokens = 16
    kept_counts = {num_kept_tokens(kept, num_tokens) for row in REGION_TABLE for kept in row}
    assert graph_breaks() == 0
    assert 1 <= dynamo["stats"]["unique_graphs"] <= len(kept_counts)


def test_compile_repeated_blocks_finds_the_routed_blocks(dynamo):
    model = routed_pixart()
    expected = run(model, (600, 600))
    model.compile_repeated_blocks(fullgraph=True)
    assert all("_diffcr_compiled_forward" in block.__dict__ for block in model.transformer_blocks)
    with torch.no_grad():
        torch.testing.assert_close(run(model, (600, 600)), expected, atol=1e-5, rtol=1e-5)


def test_whole_model_recompiles_once_per_region_and_once_for_mixed_batches(dynamo):
    model = routed_pixart()
    expected = {t: run(model, t) for t in UNIFORM + MIXED}
    compiled = torch.compile(model)
    with torch.no_grad():
        for t in (UNIFORM + MIXED) * 2:
            torch.testing.assert_close(run(compiled, t), expected[t], atol=1e-5, rtol=1e-5)
    # one graph for each region the batch shares, one for every mix of regions
    assert dynamo["stats"]["unique_graphs"] <= len(UNIFORM) + 1


@pytest.mark.parametrize(
    "table, regions, freeze",
    [([[1.0] * 4, [1.0] * 4], 4, False), ([[0.5], [0.3]], 1, True)],
    ids=["fresh_model", "layer_schedule"],  # as apply leaves it; DiffCR-L, which needs no timestep to plan
)
def test_timestep_free_schedule_compiles_fullgraph_without_recompiling(dynamo, table, regions, freeze):
    model = routed_pixart(table=table, regions=regions, freeze=freeze)
    expected = {t: run(model, t) for t in UNIFORM + MIXED}
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for t in UNIFORM + MIXED:
            torch.testing.assert_close(run(compiled, t), expected[t], atol=1e-5, rtol=1e-5)
    assert dynamo["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("table, regions", [([[1.0] * 4, [1.0] * 4], 4), ([[0.5], [0.3]], 1)], ids=["fresh", "layer"])
def test_export_equals_eager(table, regions):
    model = routed_pixart(table=table, regions=regions, freeze=regions == 1)
    args, kwargs = inputs((100, 900))
    exported = torch.export.export(model, args, kwargs)
    torch.testing.assert_close(exported.module()(*args, **kwargs).sample, model(*args, **kwargs).sample)


def test_eval_schedule_follows_the_table_after_a_change():
    model = routed_pixart(table=[[1.0] * 4, [1.0] * 4], freeze=False)
    dense = run(model, (600, 600))
    with torch.no_grad():
        model.diffcr.kept_ratio.fill_(0.3)
    routed = run(model, (600, 600))
    assert not torch.allclose(routed, dense)
    assert diffcr.mean_kept_ratio_used(model) == pytest.approx(0.3)


def test_training_under_whole_model_compile_matches_eager(dynamo):
    model = routed_pixart(freeze=False).train()
    args, kwargs = inputs((100, 900))
    eager_loss = model(*args, **kwargs).sample.square().mean() + diffcr.ratio_loss(model)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.diffcr.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)
    loss = compiled(*args, **kwargs).sample.square().mean() + diffcr.ratio_loss(model)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5)
    for grad, eager_grad in zip([p.grad for p in model.diffcr.parameters()], eager_grads):
        torch.testing.assert_close(grad, eager_grad, atol=1e-6, rtol=1e-5)


def test_remove_keeps_a_compiled_block_compiled(dynamo):
    model = routed_pixart()
    model.transformer_blocks[0].compile(fullgraph=True)
    diffcr.remove(model)
    block = model.transformer_blocks[0]
    assert "_diffcr_compiled_forward" not in block.__dict__
    assert block._compiled_call_impl is not None


def test_a_compiled_routed_block_pickles():
    import pickle

    model = routed_pixart()
    model.transformer_blocks[0].compile()
    expected = run(model, (600, 600))
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(run(restored, (600, 600)), expected)


def test_regional_compilation_trains_like_eager(dynamo):
    model = routed_pixart(freeze=False).train()
    args, kwargs = inputs((100, 900))
    eager_loss = model(*args, **kwargs).sample.square().mean() + diffcr.ratio_loss(model)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for block in model.transformer_blocks:
        block.compile(fullgraph=True)
    loss = model(*args, **kwargs).sample.square().mean() + diffcr.ratio_loss(model)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5)
    for grad, eager_grad in zip([p.grad for p in model.parameters()], eager_grads):
        torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-4)
    assert graph_breaks() == 0


def test_compiled_model_routes_with_a_loaded_artifact(dynamo, tmp_path):
    trained = routed_pixart(freeze=False)  # an artifact saved while its ratios still learn
    diffcr.save(trained, tmp_path / "artifact")
    model = tiny_pixart(num_layers=len(REGION_TABLE))
    diffcr.load(model, tmp_path / "artifact")
    compiled = torch.compile(model.eval())
    with torch.no_grad():
        for t in (UNIFORM[1], MIXED[0]):
            torch.testing.assert_close(run(compiled, t), run(trained, t), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # two families, each compiled whole and regionally: about a minute
@pytest.mark.parametrize("case", [SD3Case, FluxCase], ids=["sd3", "flux"])
def test_mmdit_families_compile_regionally_and_whole(dynamo, case):
    model = diffcr.apply(case.model(), diffcr.DiffCRConfig(timestep_regions=4, gate="sigmoid_block"))
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.tensor([[1.0, 0.75, 0.5, 0.25]]).expand_as(model.diffcr.kept_ratio))
    model = diffcr.freeze(model).eval()
    batches = [case.inputs(list(t), seed=1) for t in UNIFORM + MIXED[:1]]
    expected = [conftest_run(model, inputs) for inputs in batches]
    whole = torch.compile(model)
    with torch.no_grad():
        for inputs, value in zip(batches, expected):
            torch.testing.assert_close(conftest_run(whole, inputs), value, atol=1e-5, rtol=1e-5)
    model.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        for inputs, value in zip(batches, expected):
            torch.testing.assert_close(conftest_run(model, inputs), value, atol=1e-5, rtol=1e-5)
