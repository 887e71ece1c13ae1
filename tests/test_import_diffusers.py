"""Importing a diffusers UNet2DModel as a supernet: at full width it is the diffusers model (to 1e-5),
smaller widths run, unmappable models are refused in one line, and the command line exits 2 on bad
input without writing anything.

Models are small random UNet2DModels saved with save_pretrained; every parameter is nudged from its
initial value (norms' scales and all biases start at 1 or 0), so a weight mapped to the wrong place or
left out shows in the outputs. diffusers is a test dependency (the dev extra).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ddsm_search.backends import fused as kernels
from ddsm_search.backends import supports
from ddsm_search.checkpoint import load_supernet
from ddsm_search.errors import DDSMError
from ddsm_search.methods.pretrained.diffusers_config import unet2d_class
from ddsm_search.methods.pretrained.diffusers_unet import IMPORT_FILE, import_diffusers

UNet2DModel = unet2d_class()

BASE = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1)
CONFIGS = {
    # DDPM-like: additive ("default") conditioning, attention at 4x4 with one head (attention_head_dim
    # null), [sin, cos] features with freq_shift 1, padding-0 downsampling, eps 1e-6
    "additive": dict(BASE, in_channels=1, out_channels=1, norm_num_groups=8, norm_eps=1e-6,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                     flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None, downsample_padding=0),
    # ADM-like: scale/shift conditioning (the middle attention then has no GroupNorm), attention at 8x8
    # with heads of 8, [cos, sin] features, a scaled middle block, centred inputs
    "scale_shift": dict(BASE, in_channels=3, out_channels=3, norm_num_groups=16, resnet_time_scale_shift="scale_shift",
                        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                        flip_sin_to_cos=True, freq_shift=0, attention_head_dim=8, mid_block_scale_factor=2 ** 0.5,
                        center_input_sample=True),
    # attention at another level in the encoder (4x4) than in the decoder (2x2), three levels
    "asymmetric": dict(BASE, in_channels=1, out_channels=1, block_out_channels=(32, 32, 64), norm_num_groups=8,
                       attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # no middle attention, two ResBlocks per level
    "no_mid_attention": dict(BASE, in_channels=1, out_channels=1, norm_num_groups=8, layers_per_block=2,
                             add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D")),
}
TIMESTEPS = (0, 1, 250, 999)


def save_unet(path, seed: int = 0, **config):
    """Save a random UNet2DModel with every parameter nudged; return the model (eval mode)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each config of CONFIGS saved and imported: {name: (diffusers model, loaded Supernet)}."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name, config in CONFIGS.items():
        model = save_unet(root / name, **config)
        out[name] = model, load_supernet(import_diffusers(root / name, root / f"{name}-net"))
    return out


def _image(model, seed: int = 1, batch: int = 2) -> torch.Tensor:
    c, s = model.config.in_channels, model.config.sample_size
    return torch.randn((batch, c, s, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_width_equals_diffusers(imported, name):
    model, supernet = imported[name]
    net = supernet.model.set_subnet(1.0)
    static = supernet.model.export(1.0).eval()
    x = _image(model)
    with torch.no_grad():
        for t in TIMESTEPS:
            tt = torch.full((2,), t, dtype=torch.long)
            ref = model(x, tt).sample
            assert (net(x, tt) - ref).abs().max() < 1e-5, t
            assert (static(x, tt) - ref).abs().max() < 1e-5, t
        # one scalar timestep for the whole batch, as the samplers pass it
        assert (net(x, torch.tensor(500)) - model(x, 500).sample).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["additive", "scale_shift"])
def test_slim_widths_run_and_are_other_functions(imported, name):
    model, supernet = imported[name]
    x, t = _image(model), torch.tensor([10, 700])
    with torch.no_grad():
        full = supernet.model.set_subnet(1.0)(x, t)
        for width in (0.75, 0.5, 0.25):
            out = supernet.model.set_subnet(width)(x, t)
            assert torch.isfinite(out).all() and out.shape == full.shape
            assert (out - full).abs().max() > 1e-3
            assert (supernet.model.export(width).eval()(x, t) - out).abs().max() < 1e-5
    supernet.model.set_subnet(1.0)


def test_supernet_directory_is_a_checkpoint(imported):
    _, supernet = imported["additive"]
    assert [s.key for s in supernet.model.space] == [f"width={w}" for w in (1.0, 0.75, 0.5, 0.25)]
    assert supernet.full_flops > supernet.flops[supernet.model.check_subnet(0.25)] > 0
    assert supernet.config.data.kind == "digits" and supernet.image_shape == (1, 8, 8)
    m = supernet.config.model
    assert (m.norm_groups, m.time_conditioning, m.emb_act, m.flip_sin_to_cos, m.freq_shift, m.attn_heads,
            m.downsample_padding, m.norm_eps) == (8, "additive", True, False, 1.0, 1, 0, 1e-6)
    record = json.loads((supernet.path / IMPORT_FILE).read_text())
    assert max(record["max_relative_difference"].values()) < 1e-5
    assert not any(p.name.startswith(".") for p in supernet.path.parent.iterdir())  # no temporary left


def test_attention_levels_may_differ_between_encoder_and_decoder(imported):
    m = imported["asymmetric"][1].config.model
    assert (m.attention_resolutions, m.up_attention_resolutions, m.attn_heads, m.head_dim) == ((4,), (2,), None, 8)


def test_widths_option_and_bad_widths(tmp_path):
    save_unet(tmp_path / "m", **CONFIGS["no_mid_attention"])
    path = import_diffusers(tmp_path / "m", tmp_path / "net", widths=(1.0, 0.5))
    assert [s.key for s in load_supernet(path).model.space] == ["width=1.0", "width=0.5"]
    for widths, words in [((0.5,), "--widths: must include 1.0"), ((1.0, 0.3), "--widths: width 0.3")]:
        with pytest.raises(DDSMError, match=words):
            import_diffusers(tmp_path / "m", tmp_path / "bad", widths=widths)
        assert not (tmp_path / "bad").exists()


def test_pipeline_folder_takes_the_schedulers_noise_process(tmp_path):
    from diffusers import DDPMScheduler

    save_unet(tmp_path / "pipe" / "unet", **CONFIGS["no_mid_attention"])
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    scheduler = DDPMScheduler(num_train_timesteps=400, beta_schedule="squaredcos_cap_v2")
    scheduler.save_pretrained(tmp_path / "pipe" / "scheduler")
    diffusion = load_supernet(import_diffusers(tmp_path / "pipe", tmp_path / "net")).config.diffusion
    assert (diffusion.timesteps, diffusion.beta_schedule) == (400, "cosine")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "pipe" / "scheduler")
    with pytest.raises(DDSMError, match="v_prediction"):
        import_diffusers(tmp_path / "pipe" / "unet", tmp_path / "net2")


def _edited(tmp_path, **changes):
    """A saved model whose config.json has `changes` (refused before its weights are read)."""
    path = tmp_path / "model"
    if not path.exists():
        save_unet(path, **CONFIGS["additive"])
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes, words", [
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types[1] is CrossAttnDownBlock2D"),
    ({"up_block_types": ["AttnSkipUpBlock2D", "UpBlock2D"]}, "up_block_types[0] is AttnSkipUpBlock2D"),
    ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type is UNetMidBlock2DCrossAttn"),
    ({"class_embed_type": "timestep"}, "class embeddings"),
    ({"num_class_embeds": 10}, "class embeddings"),
    ({"act_fn": "gelu"}, "act_fn is 'gelu'"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type is 'fourier'"),
    ({"resnet_time_scale_shift": "ada_group"}, "resnet_time_scale_shift is 'ada_group'"),
    ({"downsample_type": "resnet"}, "downsample_type is 'resnet'"),
    ({"out_channels": 2}, "out_channels 2"),
    ({"block_out_channels": [32, 48]}, "not whole multiples"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel, not a UNet2DModel"),
])
def test_unmappable_models_are_refused_in_one_line(tmp_path, changes, words):
    path = _edited(tmp_path, **changes)
    with pytest.raises(DDSMError) as info:
        import_diffusers(path, tmp_path / "net")
    message = str(info.value)
    assert words in message and "\n" not in message
    assert not (tmp_path / "net").exists()


def _cli(argv) -> int:
    """Run the command as ddsm-search's main does."""
    from ddsm_search.cli.main import main

    return main(argv)


@pytest.mark.parametrize("case", ["missing", "no config.json", "config.json not JSON", "no weights", "bad widths",
                                  "out not empty"])
def test_cli_bad_input_exits_2_in_one_line(tmp_path, capsys, case):
    model = tmp_path / "model"
    extra = []
    if case == "no config.json":
        model.mkdir()
        (model / "notes.txt").write_text("hello")
    elif case == "config.json not JSON":
        model.mkdir()
        (model / "config.json").write_text("{not json")
    elif case == "no weights":
        save_unet(model, **CONFIGS["no_mid_attention"])
        for f in model.glob("*.safetensors"):
            f.unlink()
    elif case in ("bad widths", "out not empty"):
        save_unet(model, **CONFIGS["no_mid_attention"])
        extra = ["--widths", "1,x"] if case == "bad widths" else []
        if case == "out not empty":
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _cli(["import-diffusers", str(model), "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddsm-search: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_imports(tmp_path, capsys):
    save_unet(tmp_path / "model", **CONFIGS["no_mid_attention"])
    assert _cli(["import-diffusers", str(tmp_path / "model"), "--out", str(tmp_path / "net"), "--widths", "1,0.5"]) == 0
    assert "imported" in capsys.readouterr().out
    assert load_supernet(tmp_path / "net").model.space.choices("width") == (1.0, 0.5)


def test_fused_backend_refuses_what_it_does_not_translate(imported):
    for name in ("additive", "scale_shift"):  # additive conditioning; a scaled middle block
        assert not supports("fused", imported[name][1].model.export(1.0))


def test_fused_backend_runs_what_it_translates(tmp_path):
    """GroupNorm groups of a fixed count, eps, SiLU on the embedding, [sin, cos] features and one head
    per attention layer run on the kernel, equal to torch's layers at every width."""
    if kernels._cpu_ok() or not kernels.available():
        pytest.skip("the fused kernel is not available on this CPU")
    from ddsm_search.backends.fused.unet_graph import FusedDenoiser

    config = dict(BASE, in_channels=1, out_channels=1, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
                  attn_norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1,
                  attention_head_dim=None, norm_eps=1e-6, center_input_sample=True)
    model = save_unet(tmp_path / "m", **config)
    supernet = load_supernet(import_diffusers(tmp_path / "m", tmp_path / "net"))
    x, t = _image(model, batch=3), torch.tensor(321)
    with torch.inference_mode():
        for width in (1.0, 0.75, 0.5, 0.25):
            static = supernet.model.export(width).eval()
            assert supports("fused", static)
            fused = FusedDenoiser(static)
            assert fused.runs_fused(x)
            assert (fused(x, t) - static(x, t)).abs().max() < 1e-4
        assert (FusedDenoiser(supernet.model.export(1.0).eval())(x, t) - model(x, 321).sample).abs().max() < 1e-4


def test_train_resumes_from_an_imported_supernet(tmp_path, imported):
    """The train state written beside the weights lets `train --resume` fine-tune the import (here with
    a small batch, written into its meta.json as a user's config would be)."""
    from dataclasses import replace

    from ddsm_search.checkpoint import META, meta_digest, supernet_config
    from ddsm_search.training import train

    _, supernet = imported["additive"]
    out = tmp_path / "net"
    shutil.copytree(supernet.path, out)
    cfg = replace(supernet.config, train=replace(supernet.config.train, batch_size=8, sandwich_random=0))
    meta = json.loads((out / META).read_text())
    meta["config"] = supernet_config(cfg.to_dict())
    meta["meta_sha256"] = meta_digest(meta)
    (out / META).write_text(json.dumps(meta))
    train(cfg, out, steps=1, resume=True, progress=False, grids=False, device="cpu")
    tuned = load_supernet(out)
    assert tuned.step == 1
    before = supernet.model.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in tuned.model.state_dict().items())


def test_checkpoints_written_before_the_new_unet_options_still_load_and_resume(tmp_path, tiny_cfg):
    """meta.json of a supernet trained before the import options existed lacks their keys: it loads
    with their defaults and `train --resume` does not take their absence for a changed config."""
    from dataclasses import fields

    from ddsm_search.checkpoint import META, meta_digest
    from ddsm_search.config import UNetConfig
    from ddsm_search.training import train

    out = train(tiny_cfg, tmp_path / "net", steps=1, progress=False, grids=False, device="cpu")
    meta = json.loads((out / META).read_text())
    new = [f.name for f in fields(UNetConfig)][[f.name for f in fields(UNetConfig)].index("norm_groups"):]
    for key in new:
        del meta["config"]["model"][key]
    meta["meta_sha256"] = meta_digest(meta)
    (out / META).write_text(json.dumps(meta))
    assert load_supernet(out).config.model == tiny_cfg.model
    train(tiny_cfg, out, steps=2, resume=True, progress=False, grids=False, device="cpu")
    assert load_supernet(out).step == 2
