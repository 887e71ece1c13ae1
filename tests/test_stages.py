"""Stage boundaries for a multi-stage U-Net: the optimal denoiser, the cost matrices, the interval DP
(against brute force), the plot, find_stages / write_stages and the `stages` command's bad inputs."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from ddsm_search.cli.methods import add_parsers as add_method_parsers
from ddsm_search.config import config_from_dict
from ddsm_search.data import load_dataset
from ddsm_search.diffusion import NoiseSchedule
from ddsm_search.errors import DDSMError
from ddsm_search.methods.multistage.stages import (
    SIMILARITY_PNG,
    STAGES_JSON,
    denoiser_cost,
    find_stages,
    gradient_cost,
    grid_timesteps,
    interval_cluster,
    logsnr_cost,
    optimal_denoiser,
    plot_similarity,
    write_stages,
)
from tests.conftest import tiny_dict


def _abar(timesteps: int = 1000):
    return NoiseSchedule(config_from_dict({"diffusion": {"timesteps": timesteps}}).diffusion).alphas_cumprod


def _brute_denoiser(x, t, y, abar):
    """E[x0 | x_t] by a plain loop over training images, float64, naive weights normalised at the end."""
    out = []
    for q in range(len(x)):
        a = float(abar[t[q]])
        logw = [-float(((x[q] - math.sqrt(a) * yi) ** 2).sum()) / (2 * (1 - a)) for yi in y]
        top = max(logw)
        w = [math.exp(v - top) for v in logw]
        out.append(sum(wi * yi for wi, yi in zip(w, y)) / sum(w))
    return torch.stack(out)


# ---- the optimal denoiser ------------------------------------------------------------------------

def test_optimal_denoiser_matches_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    abar = _abar()
    for t in ([0, 0, 0], [50, 50, 50], [400, 400, 400], [999, 999, 999], [3, 250, 700]):
        tt = torch.tensor(t)
        expected = _brute_denoiser(x, t, y, abar)
        got = optimal_denoiser(x, tt if len(set(t)) > 1 else t[0], y, abar)
        assert got.dtype == torch.float64 and got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        # chunks of 2 logits at a time: the streaming logsumexp gives the same answer
        torch.testing.assert_close(optimal_denoiser(x, tt, y, abar, chunk=2), expected, rtol=1e-10, atol=1e-12)


def test_optimal_denoiser_at_small_noise_is_the_nearest_training_image():
    data = load_dataset("digits", limit=50)
    y, abar = data.to_float(), _abar()
    g = torch.Generator().manual_seed(0)
    picks = torch.tensor([3, 17, 41])
    a = abar[0].float()
    x = a.sqrt() * y[picks] + (1 - a).sqrt() * torch.randn(y[picks].shape, generator=g)
    torch.testing.assert_close(optimal_denoiser(x, 0, data, abar), y[picks], rtol=0, atol=1e-6)
    # a query between images lands on the nearer one, not on an average
    mid = 0.6 * y[3] + 0.4 * y[17]
    torch.testing.assert_close(optimal_denoiser(mid[None], 0, data, abar)[0], y[3], rtol=0, atol=1e-6)


def test_optimal_denoiser_at_large_noise_tends_to_the_data_mean():
    data = load_dataset("digits", limit=200)
    y, abar = data.to_float(), _abar()
    g = torch.Generator().manual_seed(0)
    gaps = []
    for t in (500, 900, 999):
        a = abar[t].float()
        x = a.sqrt() * y[:16] + (1 - a).sqrt() * torch.randn(y[:16].shape, generator=g)
        gaps.append(float((optimal_denoiser(x, t, data, abar) - y.mean(0)).abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05


# ---- cost matrices ---------------------------------------------------------------------------------

def test_logsnr_cost_is_monotone_in_distance():
    timesteps = grid_timesteps(1000, 30)
    c = logsnr_cost(timesteps, _abar())
    assert np.allclose(c, c.T) and np.all(np.diag(c) == 0)
    for i in range(len(c)):
        assert np.all(np.diff(c[i, i:]) > 0) and np.all(np.diff(c[i, :i + 1]) < 0)


def test_denoiser_cost_is_symmetric_deterministic_and_grows_away_from_the_diagonal():
    data = load_dataset("digits", limit=60)
    timesteps = grid_timesteps(1000, 12)
    c = denoiser_cost(data, timesteps, _abar(), samples=24, seed=3)
    assert c.shape == (12, 12) and np.allclose(c, c.T) and np.all(np.diag(c) == 0) and np.all(c >= 0)
    np.testing.assert_array_equal(c, denoiser_cost(data, timesteps, _abar(), samples=24, seed=3))
    assert c[0, 1] < c[0, 6] < c[0, 11]
    p = denoiser_cost(data, timesteps, _abar(), samples=24, seed=3, metric="pixels")
    assert np.all((0 <= p) & (p <= 1)) and np.all(np.diag(p) == 0)


class TinyEps(nn.Module):
    """An eps-predictor small enough for tests: a conv whose output is shifted by a time feature."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.time = nn.Linear(2, 1)
        self.unused = nn.Linear(1, 1)  # gets no gradient: counted as zeros

    def forward(self, x, t):
        f = torch.stack([t.float() / 1000, torch.sin(t.float() / 100)], 1)
        return torch.tanh(self.conv(x)) * self.time(f)[:, :, None, None] + 0.1 * x


def test_gradient_cost_on_a_tiny_model_is_symmetric_with_zero_diagonal():
    torch.manual_seed(0)
    model = TinyEps().train()
    model.time.weight.requires_grad_(False)
    data = load_dataset("digits", limit=40)
    timesteps = grid_timesteps(1000, 8)
    c = gradient_cost(model, data, timesteps, _abar(), samples=20, seed=0, batch_size=7)
    assert c.shape == (8, 8) and np.array_equal(c, c.T) and np.all(np.diag(c) == 0)
    assert np.all((c >= 0) & (c <= 2)) and c.max() > 0
    # deterministic, and the chunking of the batch does not change the gradients
    np.testing.assert_allclose(c, gradient_cost(model, data, timesteps, _abar(), samples=20, seed=0), atol=1e-6)
    # the model comes back as it was: mode, requires_grad, no .grad left behind
    assert model.training and not model.time.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


# ---- the interval DP against brute force -----------------------------------------------------------

def _seg_cost(c, a, b, kind):
    """Cost of grid points a..b inclusive, by loops."""
    if kind == "center":
        center = a + (b - a + 1) // 2
        return sum(c[center, j] for j in range(a, b + 1))
    return sum((c[i, j] + c[j, i]) / 2 for i in range(a, b + 1) for j in range(i + 1, b + 1))


def _bounds(n, k, balance):
    if balance is None:
        return 1, n
    b = Fraction(balance).limit_denominator(1000)
    return max(1, math.floor((1 - b) * n / k)), math.ceil((1 + b) * n / k)


def _brute_force(c, k, balance, kind):
    """Least total cost over every split of len(c) points into k contiguous segments within the bounds."""
    n = len(c)
    lo, hi = _bounds(n, k, balance)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        lengths = [e - s for s, e in zip(edges[:-1], edges[1:])]
        if all(lo <= length <= hi for length in lengths):
            best = min(best, sum(_seg_cost(c, s, e - 1, kind) for s, e in zip(edges[:-1], edges[1:])))
    return best


@pytest.mark.parametrize("kind", ["center", "pairwise"])
@pytest.mark.parametrize("balance", [None, 0.5, 0.0, 0.25])
def test_interval_cluster_is_optimal_against_brute_force(kind, balance):
    rng = np.random.default_rng(7)
    for trial in range(12):
        n = int(rng.integers(2, 9))
        c = rng.random((n, n))
        if trial % 2 == 0:  # the cost matrices we build are symmetric with zero diagonal
            c = (c + c.T) / 2
            np.fill_diagonal(c, 0)
        for k in range(1, min(4, n) + 1):
            result = interval_cluster(c, k, balance=balance, segment_cost=kind)
            best = _brute_force(c, k, balance, kind)
            assert result["cost"] == pytest.approx(best, rel=1e-9, abs=1e-12), (n, k)
            # the split returned is a valid one and costs what it says
            segs, lo_hi = result["segments"], _bounds(n, k, balance)
            assert len(segs) == k and segs[0][0] == 0 and segs[-1][1] == n - 1
            assert all(b[0] == a[1] + 1 for a, b in zip(segs, segs[1:]))
            assert all(lo_hi[0] <= b - a + 1 <= lo_hi[1] for a, b in segs)
            assert sum(_seg_cost(c, a, b, kind) for a, b in segs) == pytest.approx(result["cost"], rel=1e-9, abs=1e-12)
            assert result["boundaries"] == [a for a, _ in segs[1:]]


def test_interval_cluster_balance_and_timesteps():
    # two flat blocks of 2 and 8 points: unbounded, the split follows the blocks; balanced, it cannot
    c = np.ones((10, 10))
    c[:2, :2] = 0
    c[2:, 2:] = 0
    free = interval_cluster(c, 2, balance=None, timesteps=[10 * i for i in range(10)])
    assert free["boundaries"] == [2] and free["boundary_timesteps"] == [20] and free["cost"] == 0
    balanced = interval_cluster(c, 2, balance=0.5)  # lengths 2.5 .. 7.5 -> 2 .. 8: still allowed
    assert balanced["boundaries"] == [2]
    even = interval_cluster(c, 2, balance=0.0)  # lengths exactly 5
    assert even["lengths"] == [5, 5] and even["cost"] > 0
    assert interval_cluster(c, 1)["segments"] == [[0, 9]]


# ---- bad inputs -----------------------------------------------------------------------------------

def _tiny_cfg(**data):
    return config_from_dict(tiny_dict(data={"limit": 30, **data}))


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "at least 1"),
    ({"k": 11, "grid": 10}, "do not fit"),
    ({"k": 2, "cost": "entropy"}, "unknown cost"),
    ({"k": 2, "cost": "gradient"}, "needs a model"),
    ({"k": 2, "grid": 1}, "between 2 and"),
    ({"k": 2, "grid": 101}, "between 2 and"),
    ({"k": 2, "balance": 1.5}, "balance"),
    ({"k": 2, "segment_cost": "max"}, "unknown segment cost"),
    ({"k": 2, "samples": 0}, "samples"),
    ({"k": 2.5}, "integer"),
])
def test_find_stages_bad_inputs_raise(kwargs, message):
    with pytest.raises(DDSMError, match=message):
        find_stages(_tiny_cfg(), **kwargs)


def test_interval_cluster_bad_inputs_raise():
    with pytest.raises(DDSMError, match="square"):
        interval_cluster(np.zeros((3, 4)), 2)
    with pytest.raises(DDSMError, match="do not fit"):
        interval_cluster(np.zeros((3, 3)), 4)
    with pytest.raises(DDSMError, match="finite"):
        interval_cluster(np.full((3, 3), np.nan), 2)


# ---- find_stages, write_stages, plot and the command --------------------------------------------

def test_find_stages_writes_json_and_png(tmp_path):
    result = find_stages(_tiny_cfg(), 3, "denoiser", grid=20, samples=16)
    json_path, png_path = write_stages(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [SIMILARITY_PNG, STAGES_JSON]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(json_path.read_text())
    assert saved["format"] == "ddsm-search/stages" and saved["k"] == 3 and saved["images"] == 30
    assert len(saved["grid"]) == 20 and len(saved["matrix"]) == 20 and len(saved["boundaries"]) == 2
    stages = saved["stages"]
    assert stages[0]["t_min"] == 0 and stages[-1]["t_max"] == 99
    assert all(b["t_min"] == a["t_max"] + 1 for a, b in zip(stages, stages[1:]))
    assert [s["t_min"] for s in stages[1:]] == saved["boundary_timesteps"]
    assert saved["boundary_timesteps"] == [saved["grid"][i] for i in saved["boundaries"]]
    # deterministic for a seed
    assert find_stages(_tiny_cfg(), 3, "denoiser", grid=20, samples=16)["boundaries"] == saved["boundaries"]


def test_plot_similarity_writes_a_png_atomically(tmp_path):
    path = tmp_path / "s.png"
    fig = plot_similarity(np.random.default_rng(0).random((6, 6)), [0, 20, 40, 60, 80, 99], [2, 4], path)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["s.png"]
    assert len(fig.axes) == 2, "the heat map and its colour bar"


def _run(argv):
    from ddsm_search.cli.args import Parser

    parser = Parser(prog="ddsm-search")
    add_method_parsers(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def config_file(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(data={"limit": 30})))
    return path


def test_stages_command_prints_and_writes(config_file, tmp_path, capsys):
    out = tmp_path / "stages"
    assert _run(["stages", str(config_file), "--k", "2", "--cost", "logsnr", "--grid", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 stage(s) by logsnr cost" in printed and "boundaries at t =" in printed
    assert (out / STAGES_JSON).is_file() and (out / SIMILARITY_PNG).is_file()
    again = tmp_path / "denoiser"
    assert _run(["stages", str(config_file), "--k", "2", "--grid", "10", "--samples", "8", "--out", str(again)]) == 0
    assert "optimal denoiser" in capsys.readouterr().err, "a bar over the grid while the matrix is computed"
    assert _run(["stages", str(config_file), "--k", "2", "--grid", "10", "--samples", "8", "--out", str(again),
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "at least 1"),
    (["--k", "30", "--grid", "20"], "do not fit"),
    (["--k", "2", "--cost", "entropy"], "unknown cost"),
    (["--k", "2", "--cost", "gradient"], "needs a model"),
    (["--k", "2", "--supernet", "somewhere"], "only used by --cost gradient"),
    (["--k", "2", "--balance", "2"], "balance"),
])
def test_stages_command_bad_inputs_write_nothing(config_file, tmp_path, extra, message):
    out = tmp_path / "stages"
    with pytest.raises(DDSMError, match=message):
        _run(["stages", str(config_file), "--out", str(out), *extra])
    assert not out.exists()


def test_stages_command_missing_config_and_file_out(tmp_path, config_file):
    with pytest.raises(DDSMError, match="config file not found"):
        _run(["stages", str(tmp_path / "nope.yaml"), "--k", "2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DDSMError, match="is a file"):
        _run(["stages", str(config_file), "--k", "2", "--out", str(tmp_path / "file")])


@pytest.fixture(scope="module")
def untrained_supernet(tmp_path_factory):
    """A supernet directory at initial weights (no training: the gradient cost only needs a model)."""
    from ddsm_search.backbones.cost import flops_table
    from ddsm_search.backbones.registry import build_supernet
    from ddsm_search.checkpoint import save_supernet

    cfg = config_from_dict(tiny_dict(data={"limit": 30}))
    torch.manual_seed(0)
    model = build_supernet(cfg.model, (1, 8, 8))
    out = tmp_path_factory.mktemp("stages-supernet") / "net"
    save_supernet(out, config=cfg, ema=model, train_state={}, step=0, flops=flops_table(cfg.model, (1, 8, 8)),
                  dataset="digits-train")
    return out


def test_stages_command_gradient_with_a_supernet(untrained_supernet, config_file, tmp_path, capsys):
    tiny_supernet = untrained_supernet
    out = tmp_path / "stages"
    assert _run(["stages", str(config_file), "--k", "2", "--cost", "gradient", "--supernet", str(tiny_supernet),
                 "--grid", "4", "--samples", "4", "--out", str(out)]) == 0
    saved = json.loads((out / STAGES_JSON).read_text())
    matrix = np.array(saved["matrix"])
    assert saved["cost"] == "gradient" and np.array_equal(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    # a supernet trained with another noise schedule is refused before anything is written
    import yaml

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(tiny_dict(data={"limit": 30}, diffusion={"timesteps": 50})))
    with pytest.raises(DDSMError, match="noise schedule"):
        _run(["stages", str(other), "--k", "2", "--cost", "gradient", "--supernet", str(tiny_supernet),
              "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()
