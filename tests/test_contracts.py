"""A routed model keeps diffusers' contracts: offloading, save_pretrained / from_pretrained, EMA, gradient
checkpointing, dtype casts and pickling. Each test runs on tiny DiT and PixArt models (the `case` fixture)."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffcr
from conftest import PixArtCase, run
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


def test_model_cpu_offload_matches_plain_routed_model(case):
    from accelerate import cpu_offload_with_hook

    expected = output(routed(case), case)
    model, hook = cpu_offload_with_hook(routed(case), execution_device="cpu")
    torch.testing.assert_close(output(model, case), expected, atol=0, rtol=0)
    hook.offload()


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
        assert type(clone.transformer_blocks[0]) is type(model.transformer_blocks[0])
        torch.testing.assert_close(output(clone, case), expected, atol=0, rtol=0)
        diffcr.remove(clone)
        torch.testing.assert_close(output(clone, case), output(case.model(), case), atol=0, rtol=0)


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
    if case.num_train_timesteps == 1:
        pytest.skip("Flux receives sigma in [0, 1]; the case scales the suite's timesteps into it")
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
