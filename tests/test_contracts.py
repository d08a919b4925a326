"""A routed model keeps diffusers' contracts: offloading, save_pretrained / from_pretrained, EMA, gradient
checkpointing, dtype casts and pickling. Each test runs on tiny DiT, PixArt, SD3 and Flux models (the `case`
fixture)."""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffcr
from conftest import PixArtCase, all_blocks, run
from diffcr import DiffCRConfig

T_MIXED = [10, 300, 600, 900]
SCHEDULE = [[1.0, 0.7, 0.5, 0.3], [0.5, 0.5, 0.3, 0.1], [0.8, 1.0, 0.6, 0.4]]


def routed(case, seed: int = 0, frozen: bool = True):
    model = diffcr.apply(case.model(seed=seed), DiffCRConfig(timestep_regions=4))
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.tensor(SCHEDULE))
        for router in model.diffcr.routers:
            router.weight.normal_()
    return diffcr.freeze(model) if frozen else model


def output(model, case, timesteps=T_MIXED, seed: int = 1):
    with torch.no_grad():
        return run(model, case.inputs(timesteps, seed=seed))


# -- offloading -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["apply_then_offload", "offload_then_apply"])
def test_sequential_cpu_offload_matches_plain_routed_model(case, when):
    from accelerate import cpu_offload

    expected = output(routed(case), case)
    if when == "apply_then_offload":
        model = cpu_offload(routed(case), execution_device="cpu")
        # the offload is real: router weights live on the meta device between calls
        assert model.diffcr.routers[0].weight.device.type == "meta"
    else:
        reference = routed(case)
        model = cpu_offload(case.model(), execution_device="cpu")
        diffcr.load(model, _saved(reference))
    out = output(model, case)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # removing DiffCR from the offloaded model gives the dense model back, still offloaded
    diffcr.remove(model)
    torch.testing.assert_close(output(model, case), output(case.model(), case), atol=0, rtol=0)


def _saved(model, folder=None):
    import tempfile

    return diffcr.save(model, folder or tempfile.mkdtemp())


@pytest.mark.parametrize("when", ["apply_then_offload", "offload_then_apply"])
def test_model_cpu_offload_matches_plain_routed_model(case, when):
    from accelerate import cpu_offload_with_hook

    expected = output(routed(case), case)
    if when == "apply_then_offload":
        model, hook = cpu_offload_with_hook(routed(case), execution_device="cpu")
    else:
        model, hook = cpu_offload_with_hook(case.model(), execution_device="cpu")
        diffcr.load(model, _saved(routed(case)))
        assert type(model).__name__ == type(case.model()).__name__ and diffcr.is_frozen(model)
    torch.testing.assert_close(output(model, case), expected, atol=0, rtol=0)
    hook.offload()
    torch.testing.assert_close(output(model, case), expected, atol=0, rtol=0)  # onloaded again by the hook
    diffcr.remove(model)
    torch.testing.assert_close(output(model, case), output(case.model(), case), atol=0, rtol=0)


@pytest.mark.parametrize("when", ["apply_then_offload", "offload_then_apply"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_matches_plain_routed_model(offload_type, when):
    from diffusers.hooks import apply_group_offloading

    case = PixArtCase  # diffusers' DiT declares _supports_group_offloading = False
    expected = output(routed(case), case)
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    if when == "apply_then_offload":
        model = routed(case)
        apply_group_offloading(model, onload_device="cpu", offload_type=offload_type, **options)
    else:
        model = case.model()
        apply_group_offloading(model, onload_device="cpu", offload_type=offload_type, **options)
        diffcr.load(model, _saved(routed(case)))
    torch.testing.assert_close(output(model, case), expected, atol=0, rtol=0)
    diffcr.remove(model)
    torch.testing.assert_close(output(model, case), output(case.model(), case), atol=0, rtol=0)


def test_no_split_modules_name_the_routed_blocks():
    model = routed(PixArtCase)
    block_names = {type(block).__name__ for block in model.transformer_blocks}
    assert block_names == {"DiffCRBasicTransformerBlock"}
    assert block_names <= set(model._no_split_modules)
    assert "BasicTransformerBlock" in model._no_split_modules
    diffcr.remove(model)
    assert "DiffCRBasicTransformerBlock" not in model._no_split_modules


def test_no_split_modules_name_the_routed_blocks_of_every_family(case):
    """diffusers builds an automatic device map from `_get_no_split_modules`: it must name the routed blocks, or,
    for a family that declares none (DiT), refuse `device_map="auto"` as it does for the dense model."""
    model = routed(case)
    base_cls = type(model)._diffcr_base_class
    block_names = {type(block).__name__ for block in model.transformer_blocks}
    assert block_names and all(name.startswith("DiffCR") for name in block_names)
    if base_cls._no_split_modules is None:  # DiT: diffusers does not support device_map="auto"
        assert model._no_split_modules is None
        with pytest.raises(ValueError, match="does not support `device_map='auto'`"):
            model._get_no_split_modules("auto")
    else:
        no_split = set(model._get_no_split_modules("auto"))
        assert block_names <= no_split and set(base_cls._no_split_modules) <= no_split
    diffcr.remove(model)
    assert model._no_split_modules == base_cls._no_split_modules


# -- save_pretrained / from_pretrained / EMA ----------------------------------------------------------------------
def test_save_pretrained_writes_clean_base_and_artifact(case, tmp_path):
    model = routed(case)
    expected = output(model, case)
    model.save_pretrained(tmp_path)
    # the base checkpoint holds base weights only, and loads with plain diffusers as the dense base
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and not [k for k in keys if k.startswith("diffcr")]
    # the top level is diffusers' own layout; the artifact sits in a subfolder
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["diffusion_pytorch_model.safetensors"]
    assert (tmp_path / "diffcr" / "diffcr_weights.safetensors").is_file()
    assert (tmp_path / "diffcr" / "diffcr_config.json").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == type(case.model()).__name__
    base_cls = type(model)._diffcr_base_class
    dense = base_cls.from_pretrained(tmp_path).eval()
    assert not diffcr.is_applied(dense)
    torch.testing.assert_close(output(dense, case), output(case.model(), case), atol=0, rtol=0)
    # the routed model comes back in one call, or by loading the folder onto a base
    loaded = diffcr.from_pretrained(tmp_path).eval()
    assert diffcr.is_frozen(loaded)
    # weights read by diffusers' loader differ in memory layout only: rounding-level differences
    torch.testing.assert_close(output(loaded, case), expected, atol=1e-6, rtol=0)
    onto_base = diffcr.load(case.model(), tmp_path)
    torch.testing.assert_close(output(onto_base, case), expected, atol=0, rtol=0)
    # the routed model itself still holds its DiffCR weights and keeps working after saving
    assert any(k.startswith("diffcr.") for k in model.state_dict())
    torch.testing.assert_close(output(model, case), expected, atol=0, rtol=0)


@pytest.fixture
def diffusers_log(caplog):
    """caplog, also fed by diffusers' loggers (they do not propagate to the root logger)."""
    library = logging.getLogger("diffusers")
    library.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    library.removeHandler(caplog.handler)


NOT_EXPECTED = "are not expected and will be ignored"


def _ema_folder(model, folder):
    from diffusers.training_utils import EMAModel

    EMAModel(model.parameters(), model_cls=type(model), model_config=model.config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("loader", ["from_pretrained", "ema_with_base_class"])
def test_plain_load_of_a_routed_folder_warns(case, tmp_path, diffusers_log, loader):
    from diffusers.training_utils import EMAModel

    model = routed(case)
    base_cls = type(model)._diffcr_base_class
    if loader == "from_pretrained":
        model.save_pretrained(tmp_path)
        dense = base_cls.from_pretrained(tmp_path)
    else:
        dense = EMAModel.from_pretrained(_ema_folder(model, tmp_path), model_cls=base_cls)
    # diffusers' own warning, naming the marker, whose value says what to do
    warned = [r.getMessage() for r in diffusers_log.records if "diffcr_artifact" in r.getMessage()]
    assert warned and NOT_EXPECTED in warned[0] and base_cls.__name__ in warned[0]
    assert "diffcr.from_pretrained(folder)" in warned[0]
    assert not diffcr.is_applied(dense if loader == "from_pretrained" else base_cls.from_pretrained(tmp_path))


@pytest.mark.parametrize(
    "loader",
    [
        "diffcr.from_pretrained",
        "diffcr.load",
        "routed_class.from_pretrained",
        "routed_class.from_config",
        "ema_with_routed_class",
    ],
)
def test_diffcr_loaders_round_trip_without_the_marker_warning(case, tmp_path, diffusers_log, loader):
    from diffusers.training_utils import EMAModel

    model = routed(case)
    expected = output(model, case)
    routed_cls = type(model)
    model.save_pretrained(tmp_path)
    diffusers_log.clear()
    if loader == "diffcr.from_pretrained":
        loaded = diffcr.from_pretrained(tmp_path)
    elif loader == "diffcr.load":
        loaded = diffcr.load(case.model(), tmp_path)
    elif loader == "routed_class.from_pretrained":
        loaded = routed_cls.from_pretrained(tmp_path)
    elif loader == "routed_class.from_config":
        loaded = routed_cls.from_config(tmp_path)  # a routed model of that config: weights come separately
        loaded.load_state_dict(model.state_dict())
        diffcr.freeze(loaded)
    else:
        ema = EMAModel.from_pretrained(_ema_folder(model, tmp_path / "ema"), model_cls=routed_cls)
        loaded = routed_cls.from_config(model.config)
        ema.copy_to(loaded.parameters())
        diffcr.freeze(loaded)
    assert not [r.getMessage() for r in diffusers_log.records if "diffcr_artifact" in r.getMessage()]
    assert diffcr.is_applied(loaded) and diffcr.is_frozen(loaded)
    assert "diffcr_artifact" not in loaded.config
    assert diffcr.get_config(loaded).replace(num_train_timesteps=None) == diffcr.get_config(model)
    state, saved = loaded.state_dict(), model.state_dict()
    assert set(state) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, atol=0, rtol=0, msg=name)
    # weights read by diffusers' loader differ in memory layout only: rounding-level differences
    torch.testing.assert_close(output(loaded.eval(), case), expected, atol=1e-6, rtol=0)


def test_the_marker_is_written_at_save_time_only(case, tmp_path):
    model = routed(case)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "diffusers" not in saved.get("diffcr_artifact", "") and saved["diffcr_artifact"].startswith("diffcr/")
    assert "diffcr_artifact" not in model.config
    # a dense model loaded plainly carries the marker in its config; applying DiffCR again drops it
    dense = type(model)._diffcr_base_class.from_pretrained(tmp_path)
    assert "diffcr_artifact" in dense.config
    diffcr.apply(dense)
    assert "diffcr_artifact" not in dense.config
    diffcr.remove(dense)
    assert "diffcr_artifact" not in dense.config


def test_a_compress_runs_model_folder_is_marked_and_loads_quietly(tmp_path, diffusers_log):
    from conftest import DiTCase
    from diffcr.train import finish_compression, load_compressed

    model = routed(DiTCase, frozen=False)
    written = finish_compression(model, tmp_path, "full")
    expected = output(model.eval(), DiTCase)
    assert "diffcr_artifact" in json.loads((written["model"] / "config.json").read_text())
    diffusers_log.clear()
    loaded = load_compressed(written["model"], written["model"])  # what `diffcr sample --artifact run/model` does
    assert not [r for r in diffusers_log.records if "diffcr_artifact" in r.getMessage()]
    torch.testing.assert_close(output(loaded, DiTCase), expected, atol=1e-6, rtol=0)
    type(model)._diffcr_base_class.from_pretrained(written["model"])
    assert [r for r in diffusers_log.records if "diffcr_artifact" in r.getMessage()]


def test_from_pretrained_of_a_dense_folder_says_what_to_do(case, tmp_path):
    case.model().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no DiffCR artifact"):
        diffcr.from_pretrained(tmp_path)


def test_save_pretrained_keeps_parameter_order(case, tmp_path):
    model = routed(case, frozen=False)
    names = [name for name, _ in model.named_parameters()]
    model.save_pretrained(tmp_path)
    assert [name for name, _ in model.named_parameters()] == names


def test_ema_of_routed_weights_round_trips(case, tmp_path):
    from diffusers.training_utils import EMAModel

    model = routed(case, frozen=False)
    ema = EMAModel(model.parameters(), decay=0.5, model_cls=type(model), model_config=model.config)
    with torch.no_grad():
        model.diffcr.kept_ratio.mul_(0.9).add_(0.05)
        model.diffcr.routers[1].weight.add_(1.0)
    ema.step(model.parameters())
    shadow = dict(zip([n for n, _ in model.named_parameters()], ema.shadow_params))
    ema.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "diffcr" / "diffcr_weights.safetensors"))
    torch.testing.assert_close(saved["kept_ratio"], shadow["diffcr.kept_ratio"], atol=0, rtol=0)
    torch.testing.assert_close(saved["routers.1.weight"], shadow["diffcr.routers.1.weight"], atol=0, rtol=0)
    restored = EMAModel.from_pretrained(tmp_path, model_cls=type(model))
    for name, value in zip([n for n, _ in model.named_parameters()], restored.shadow_params):
        torch.testing.assert_close(value, shadow[name], atol=0, rtol=0)
    # copy_to a routed model of the same config fills routers and ratios too
    target = routed(case, seed=5, frozen=False)
    restored.copy_to(target.parameters())
    torch.testing.assert_close(target.diffcr.kept_ratio, shadow["diffcr.kept_ratio"], atol=0, rtol=0)


def test_eval_routes_with_ratios_an_ema_copy_wrote(case):
    from diffusers.training_utils import EMAModel

    model = routed(case, frozen=False).eval()
    output(model, case)  # an eval forward first: nothing of it may stick
    other = routed(case, frozen=False)
    with torch.no_grad():
        other.diffcr.kept_ratio.fill_(0.5)  # another schedule, the same weights
    EMAModel(other.parameters(), model_cls=type(other), model_config=other.config).copy_to(model.parameters())
    torch.testing.assert_close(output(model, case), output(other.eval(), case), atol=0, rtol=0)


# -- gradient checkpointing ----------------------------------------------------------------------------------------
def _grads_after(case, checkpointing: bool, second_forward: str):
    """Backward of forward A, with another forward B (other timesteps) in between."""
    model = routed(case, frozen=False).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    out_a = run(model, case.inputs([10, 300, 600, 900], seed=1))
    loss = out_a.pow(2).mean() + diffcr.ratio_loss(model)
    if second_forward == "no_grad":
        with torch.no_grad():
            run(model, case.inputs([990, 800, 20, 400], seed=2))
    else:
        out_b = run(model, case.inputs([990, 800, 20, 400], seed=2))
        loss = loss + out_b.pow(2).mean() + diffcr.ratio_loss(model)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("second_forward", ["no_grad", "with_grad"])
def test_checkpoint_recompute_uses_its_own_forward(case, second_forward):
    plain = _grads_after(case, checkpointing=False, second_forward=second_forward)
    ckpt = _grads_after(case, checkpointing=True, second_forward=second_forward)
    assert set(plain) == set(ckpt) and "diffcr.kept_ratio" in plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# -- dtypes and copies ---------------------------------------------------------------------------------------------
def test_bf16_cast_keeps_ratios_and_routers_fp32(case):
    model = routed(case, frozen=False).to(torch.bfloat16)
    assert model.diffcr.kept_ratio.dtype == torch.float32
    assert all(r.weight.dtype == torch.float32 for r in model.diffcr.routers)
    assert model.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.bfloat16
    before = model.diffcr.kept_ratio.detach().clone()
    with torch.no_grad():
        model.diffcr.kept_ratio.add_(1e-4)  # lost in bf16 (spacing 2^-8 near 1)
    assert (model.diffcr.kept_ratio != before).all()
    model.half().float()
    assert model.diffcr.kept_ratio.dtype == torch.float32


def test_routed_model_pickles_and_deep_copies(case):
    model = routed(case)
    expected = output(model, case)
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load):
        clone = copy_of(model)
        assert diffcr.is_applied(clone) and diffcr.is_frozen(clone)
        assert [type(b) for b in all_blocks(clone)] == [type(b) for b in all_blocks(model)]
        torch.testing.assert_close(output(clone, case), expected, atol=0, rtol=0)
        diffcr.remove(clone)
        torch.testing.assert_close(output(clone, case), output(case.model(), case), atol=0, rtol=0)


@pytest.mark.parametrize("frozen", [True, False])
def test_deepcopy_gives_an_equal_and_independent_model(case, frozen):
    model = routed(case, frozen=frozen).eval()
    expected = output(model, case)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(output(clone, case), expected, atol=0, rtol=0)
    assert diffcr.is_frozen(clone) == frozen
    # nothing is shared: every parameter is its own tensor, and the blocks route with the clone's controller
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in clone.parameters()}
    assert all(block._diffcr_controller is clone.diffcr for block in clone.transformer_blocks)
    with torch.no_grad():
        clone.diffcr.kept_ratio.fill_(0.1)
        for router in clone.diffcr.routers:
            router.weight.neg_()
    diffcr.remove(clone)
    assert diffcr.is_applied(model)
    torch.testing.assert_close(output(model, case), expected, atol=0, rtol=0)


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- bad artifacts and inputs --------------------------------------------------------------------------------------
def _tamper_json(folder, change):
    path = folder / "diffcr_config.json"
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format=99), "artifact format 99 is newer"),
        (lambda d: d["config"].update(magic=1), "unknown DiffCRConfig keys"),
        (lambda d: d.update(num_layers="three"), "field 'num_layers' must be int"),
        (lambda d: d.update(num_layers=3, hidden_size=7), r"disagrees with the description .* \['hidden_size'\]"),
        (lambda d: d["config"].update(timestep_regions=2), r"disagrees .* \['config'\]"),
    ],
)
def test_load_refuses_a_tampered_json(case, tmp_path, change, message):
    folder = _saved(routed(case), tmp_path)
    _tamper_json(folder, change)
    model = case.model()
    with pytest.raises(ValueError, match=message):
        diffcr.load(model, folder)
    assert not diffcr.is_applied(model)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("kept_ratio", lambda t: torch.linspace(-3, 5, t.numel()).view_as(t), "outside the bins' range"),
        ("kept_ratio", lambda t: torch.full_like(t, float("nan")), "'kept_ratio' holds NaN"),
        ("routers.0.weight", lambda t: torch.full_like(t, float("nan")), "'routers.0.weight' holds NaN"),
    ],
)
def test_load_refuses_bad_tensors(case, tmp_path, name, value, message):
    folder = _saved(routed(case), tmp_path)
    path = folder / "diffcr_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[name] = value(tensors[name])
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=message):
        diffcr.load(case.model(), folder)


def test_load_refuses_non_json_description(case, tmp_path):
    folder = _saved(routed(case), tmp_path)
    path = folder / "diffcr_weights.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"diffcr": "not json {"})
    with pytest.raises(ValueError, match="metadata of .* is not valid JSON"):
        diffcr.load(case.model(), folder)


def test_nan_timestep_is_a_clear_error(case):
    model = routed(case)
    inputs = case.inputs(T_MIXED)
    inputs["timestep"] = torch.tensor([10.0, float("nan"), 600.0, 900.0])
    with pytest.raises(ValueError, match="timestep holds non-finite values"):
        run(model, inputs)


def test_timestep_outside_the_regions_range_is_a_clear_error(case):
    if case.num_train_timesteps == 1:  # Flux: handed the scheduler's step instead of sigma
        model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4))
        inputs = case.inputs(T_MIXED[:2])
        inputs["timestep"] = torch.tensor([0.5, 999.0])
        with pytest.raises(ValueError, match=r"fall outside \[0, 1\]"):
            run(model, inputs)
        return
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4, num_train_timesteps=10))
    with pytest.raises(ValueError, match=r"fall outside \[0, 10\].*set DiffCRConfig.num_train_timesteps"):
        output(model, case, timesteps=[5, 999])
    with pytest.raises(ValueError, match="fall outside"):
        output(model, case, timesteps=[-1, 5])
    output(model, case, timesteps=[0, 10])  # both ends are fine


def test_more_regions_than_timesteps_is_refused(case):
    if case.num_train_timesteps == 1:
        pytest.skip("Flux's timestep is continuous: any number of regions cuts [0, 1]")
    model = case.model()
    model.register_to_config(num_train_timesteps=10)
    with pytest.raises(ValueError, match="more than the model's 10 training timesteps"):
        diffcr.apply(model, DiffCRConfig(timestep_regions=20))
    assert not diffcr.is_applied(model)


def test_pipeline_save_pretrained_keeps_a_loadable_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from conftest import DiTCase

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=2,
        block_out_channels=(8,),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    transformer = routed(DiTCase)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    # model_index.json still names the diffusers class, so diffusers loads the pipeline (dense transformer)
    assert json.loads((tmp_path / "model_index.json").read_text())["transformer"] == [
        "diffusers",
        "DiTTransformer2DModel",
    ]
    assert not diffcr.is_applied(DiTPipeline.from_pretrained(tmp_path).transformer)
    loaded = diffcr.from_pretrained(tmp_path, subfolder="transformer")
    torch.testing.assert_close(output(loaded, DiTCase), output(transformer, DiTCase), atol=1e-6, rtol=0)


def test_save_into_a_file_path_is_a_clear_error(case, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        diffcr.save(routed(case), blocker / "artifact")


def test_from_pretrained_never_unpickles_the_base_weights(tmp_path):
    routed(PixArtCase()).save_pretrained(tmp_path, safe_serialization=False)  # a pickled .bin, as someone may hand us
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(OSError, match="safetensors"):
        diffcr.from_pretrained(tmp_path)
