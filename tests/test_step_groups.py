"""Step-Adaptive Training, reconstructed: SNR timestep groups, the SNR-to-size prior, per-group
fine-tuning (`finetune`) and sampling with the groups' weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import DiffusionConfig
from ddsm_search.diffusion import NoiseSchedule, sample_loop, sampling_timesteps
from ddsm_search.errors import DDSMError
from ddsm_search.solvers.base import Solver
from ddsm_search.images import to_uint8
from ddsm_search.methods.step_groups.finetune import finetune_schedule, plan_groups
from ddsm_search.methods.step_groups.groups import (
    group_index,
    group_sizes,
    prior_genome,
    prior_schedule,
    prior_subnets,
    seed_genomes,
    snr_groups,
)
from ddsm_search.sampling import Runtime, generate
from ddsm_search.schedule import Schedule, load_schedule, save_schedule
from ddsm_search.search.genome import SearchSpace
from ddsm_search.space.subnet import Subnet, SubnetSpace

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


CONFIGS = [DiffusionConfig(), DiffusionConfig(timesteps=100), DiffusionConfig(beta_schedule="cosine")]
SPACE = SubnetSpace.of({"width": [1.0, 0.75, 0.5, 0.25], "depth": [6, 4]})


@pytest.mark.parametrize("cfg", CONFIGS, ids=["linear-1000", "linear-100", "cosine-1000"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_groups_are_contiguous_cover_all_timesteps_and_are_ordered_by_snr(cfg, k):
    groups = snr_groups(cfg, k)
    lam = NoiseSchedule(cfg).log_snr()
    assert [g.index for g in groups] == list(range(k))
    assert groups[0].last == cfg.timesteps - 1 and groups[-1].first == 0, "noisiest first, all timesteps"
    for noisier, cleaner in zip(groups, groups[1:]):
        assert noisier.first == cleaner.last + 1, "contiguous, no gap, no overlap"
        assert lam[noisier.first:noisier.last + 1].max() < lam[cleaner.first:cleaner.last + 1].min()
        assert noisier.mean_logsnr < cleaner.mean_logsnr
    assert all(g.size >= 1 for g in groups) and sum(g.size for g in groups) == cfg.timesteps
    for t in (0, cfg.timesteps // 2, cfg.timesteps - 1):
        assert t in groups[group_index(groups, t)]


def test_groups_are_equal_spans_of_log_snr():
    cfg = DiffusionConfig()
    lam = NoiseSchedule(cfg).log_snr()
    groups = snr_groups(cfg, 4)
    spans = [g.band[1] - g.band[0] for g in groups]
    assert np.allclose(spans, (lam[0] - lam[-1]) / 4)
    for g in groups:  # where every band holds whole timesteps (here), each timestep lies in its band
        inside = lam[g.first:g.last + 1]
        assert inside.min() >= g.band[0] - 1e-9 and inside.max() <= g.band[1] + 1e-9
    # as many groups as timesteps: the repair gives every group exactly one
    tiny = DiffusionConfig(timesteps=10)
    assert [g.size for g in snr_groups(tiny, 10)] == [1] * 10
    for bad in (0, 11, 2.5, True):
        with pytest.raises(DDSMError, match="groups"):
            snr_groups(tiny, bad)


def test_size_rule_is_monotone_in_snr_and_explicit():
    cfg = DiffusionConfig()
    steps = sampling_timesteps(cfg.timesteps, 20)
    prior = prior_subnets(SPACE, cfg, steps, 4)
    for axis in SPACE.names:  # noisiest first: sizes never shrink as the SNR grows
        values = [s[axis] for s in prior]
        assert values == sorted(values), values
    assert prior[0] == SPACE.smallest and prior[-1] == SPACE.full
    reverse = prior_subnets(SPACE, cfg, steps, 4, harder="noisy")
    assert reverse[0] == SPACE.full and reverse[-1] == SPACE.smallest
    sizes = group_sizes(SPACE, snr_groups(cfg, 4), axes=["width"])
    assert [s["width"] for s in sizes] == [0.25, 0.5, 0.75, 1.0], "K = number of choices: one choice each"
    assert all(s["depth"] == 6 for s in sizes), "axes left out of the rule stay full"
    cheap = group_sizes(SPACE, snr_groups(cfg, 4), axes=["width"], gamma=3.0)
    assert all(c["width"] <= s["width"] for c, s in zip(cheap, sizes)) and cheap != sizes
    assert group_sizes(SPACE, snr_groups(cfg, 1)) == [SPACE.full]
    for bad in ({"gamma": 0}, {"gamma": float("nan")}, {"harder": "both"}, {"axes": ["heads"]}):
        with pytest.raises(DDSMError):
            group_sizes(SPACE, snr_groups(cfg, 4), **bad)


def test_prior_schedule_and_search_seed(tiny_supernet):
    supernet = load_supernet(tiny_supernet)
    prior = prior_schedule(supernet, 10, groups=3)
    assert len(prior) == 10 and all(s in supernet.model.space.members for s in prior)
    widths = [s["width"] for s in prior]
    assert widths == sorted(widths) and widths[-1] == 1.0 and widths[0] == 0.5
    assert len(prior_schedule(supernet, groups=3)) == supernet.config.sample.steps
    space = SearchSpace.of(supernet.model.space, steps=10, segments=5)
    genome = prior_genome(space, supernet.config.diffusion, 3)
    decoded = space.decode(genome)
    for start, stop in space.bounds:  # each segment runs the largest subnet its steps ask for
        assert set(decoded[start:stop]) == {max(prior[start:stop])}
    assert seed_genomes(space, supernet.config.diffusion, None) == []
    assert seed_genomes(space, supernet.config.diffusion, 3) == [genome]


def test_plan_groups_runs_and_snr_cuts():
    cfg = DiffusionConfig(timesteps=100)
    a, b = Subnet.of(width=1.0), Subnet.of(width=0.5)
    subnets = [b, b, b, a, a]
    timesteps = sampling_timesteps(cfg.timesteps, 5)  # 99, 74, 50, 25, 0
    groups = plan_groups(subnets, cfg)
    assert [(g.start, g.stop, g.subnet) for g in groups] == [(0, 3, b), (3, 5, a)]
    cut = plan_groups(subnets, cfg, snr_groups=3)
    labels = [group_index(snr_groups(cfg, 3), t) for t in timesteps]
    assert len(cut) == len({(s, l) for s, l in zip(subnets, labels)}) > len(groups)
    for plan in (groups, cut):  # the training intervals tile 0 .. T-1 and hold their steps' timesteps
        assert plan[0].timesteps[1] == 99 and plan[-1].timesteps[0] == 0
        for g, h in zip(plan, plan[1:]):
            assert g.timesteps[0] == h.timesteps[1] + 1
        for g in plan:
            assert all(g.timesteps[0] <= timesteps[i] <= g.timesteps[1] for i in range(g.start, g.stop))


SCHEDULE = [{"width": 0.5}] * 3 + [{"width": 1.0}] * 2


@pytest.fixture(scope="module")
def tuned(tiny_supernet, tmp_path_factory):
    """A schedule of two runs (width 0.5, then 1.0) fine-tuned per group for a few steps."""
    root = tmp_path_factory.mktemp("finetune")
    supernet = load_supernet(tiny_supernet)
    source = save_schedule(root / "plain.json", Schedule(subnets=[Subnet.of(**s) for s in SCHEDULE]), supernet)
    result = finetune_schedule(source, tiny_supernet, root / "tuned.json", steps=3, batch_size=8, lr=1e-3,
                               progress=False)
    return supernet, source, result


def _by_hand(supernet, networks, groups, n: int, seed: int) -> torch.Tensor:
    """Sample with the fine-tuned modules themselves, one per step, outside generate."""
    steps = len(SCHEDULE)
    per_step = {i: networks[k] for k, g in enumerate(groups) for i in range(g.start, g.stop)}
    x = torch.randn((n, *supernet.image_shape), generator=torch.Generator().manual_seed(seed))
    ts = sampling_timesteps(supernet.config.diffusion.timesteps, steps)
    return sample_loop(per_step, list(range(steps)), ts, x, Solver().run(NoiseSchedule(supernet.config.diffusion), ts))


def test_finetune_writes_weights_the_schedule_references(tuned, tmp_path, capsys):
    supernet, source, result = tuned
    data = json.loads(result.schedule.read_text())
    ref = data["settings"]["weights"]
    assert ref["file"] == "tuned.weights.safetensors" and result.weights.is_file()
    assert [g["steps"] for g in ref["groups"]] == [[0, 3], [3, 5]]
    assert [g["subnet"] for g in ref["groups"]] == [{"width": 0.5}, {"width": 1.0}]
    assert ref["groups"][0]["timesteps"] == [26, 99] and ref["groups"][1]["timesteps"] == [0, 25]
    assert data["flops_per_image"] == json.loads(source.read_text())["flops_per_image"]
    loaded = load_schedule(result.schedule, supernet)
    assert list(loaded.settings["weights"].groups) == result.groups
    # round trip: generate with the file's weights == the trained modules run by hand == sample --schedule
    runtime = Runtime(supernet)
    images = generate(runtime.plan_schedule(loaded), n=4, seed=3)
    assert torch.equal(images, _by_hand(supernet, result.networks, result.groups, 4, 3))
    plain = generate(runtime.plan(loaded.subnets, solver=loaded.solver), n=4, seed=3)
    assert not torch.equal(images, plain), "fine-tuning changed what the steps run"
    out = tmp_path / "s.npz"
    assert main(["sample", str(supernet.path), "--schedule", str(result.schedule), "--n", "4", "--seed", "3",
                 "--out", str(out), "--quiet", "--device", "cpu", "--backend", "torch"]) == 0
    assert np.array_equal(np.load(out)["images"], to_uint8(images))
    assert main(["sample", str(supernet.path), "--schedule", str(result.schedule), "--n", "4", "--seed", "3",
                 "--out", str(out), "--quiet", "--device", "cpu", "--backend", "torch", "--compare"]) == 0
    assert np.array_equal(np.load(out)["images"], to_uint8(images)), "timed against full size: the same images"
    assert "group 0 torch" in capsys.readouterr().out


def test_evaluate_scores_the_group_weights(tuned, tmp_path, capsys):
    """evaluate (API and CLI) scores the images the fine-tuned weights make, not the supernet's."""
    from ddsm_search.evaluation.quality import evaluate
    from ddsm_search.evaluation.scoring import make_scorer, score_images
    from ddsm_search.metrics import seed_for

    supernet, source, result = tuned
    loaded = load_schedule(result.schedule, supernet)
    scorer = make_scorer(supernet, metric="fid")
    runtime = Runtime(supernet)
    tuned_plan = runtime.plan_schedule(loaded)
    tuned_r = evaluate(tuned_plan, scorer, n=8, kid=False)
    images = generate(tuned_plan, n=8, seed=seed_for("search"))
    assert tuned_r["fid"] == pytest.approx(score_images(scorer, images, kid=False)["fid"], rel=1e-9)
    plain_r = evaluate(runtime.plan(loaded.subnets, solver=loaded.solver), scorer, n=8, kid=False)
    assert plain_r["fid"] != pytest.approx(tuned_r["fid"], rel=1e-6), "the weights change the score"
    assert plain_r["gflops_per_image"] == tuned_r["gflops_per_image"]
    out = tmp_path / "r.json"
    assert main(["evaluate", str(supernet.path), "--schedule", str(result.schedule), "--n", "8", "--quiet",
                 "--device", "cpu", "--backend", "torch", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(tuned_r["fid"], rel=1e-9)


def test_each_group_trains_only_its_own_weights(tuned, tmp_path):
    supernet, source, result = tuned
    only = finetune_schedule(source, supernet.path, tmp_path / "only1.json", steps=3, batch_size=8, lr=1e-3,
                             progress=False, only=[1])
    plain0 = supernet.model.export(Subnet.of(width=0.5)).state_dict()
    for name, value in only.networks[0].state_dict().items():  # group 0 untouched: the supernet's weights
        assert torch.equal(value, plain0[name]), name
    for name, value in only.networks[1].state_dict().items():  # group 1 as when every group was trained
        assert torch.equal(value, result.networks[1].state_dict()[name]), name
    assert any(not torch.equal(v, plain0[k]) for k, v in result.networks[0].state_dict().items())
    # so the steps of group 0 give the supernet's outputs, those of group 1 the fine-tuned ones
    x = torch.randn((3, *supernet.image_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(80)
    static = supernet.model.export(Subnet.of(width=0.5)).eval()
    loaded = load_schedule(only.schedule, supernet)
    weights, steps = loaded.settings["weights"], loaded.step_keys()
    with torch.no_grad():
        assert torch.equal(weights.network(supernet.model, steps[0].subnet, steps[0].get("group"))(x, t), static(x, t))
        assert torch.equal(weights.network(supernet.model, steps[-1].subnet, steps[-1].get("group"))(x, t),
                           result.networks[1](x, t))
    # two groups that run one subnet (a run cut at an SNR edge) keep two networks
    cut = finetune_schedule(source, supernet.path, tmp_path / "cut.json", steps=2, batch_size=4, lr=1e-3,
                            progress=False, snr_groups=3)
    same = [k for k, g in enumerate(cut.groups) if g.subnet == Subnet.of(width=1.0)]
    assert len(same) == 2
    a, b = (cut.networks[k].state_dict() for k in same)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_tampered_or_inconsistent_weights_are_refused(tuned, tmp_path, capsys):
    supernet, _, result = tuned
    folder = tmp_path / "copy"
    folder.mkdir()
    schedule, weights = folder / "tuned.json", folder / "tuned.weights.safetensors"

    def fresh():
        schedule.write_bytes(result.schedule.read_bytes())
        weights.write_bytes(result.weights.read_bytes())

    def group_steps(d):
        d["settings"]["weights"]["groups"][0]["steps"] = [0, 2]

    def group_subnet(d):
        d["settings"]["weights"]["groups"][1]["subnet"] = {"width": 0.75}

    def group_times(d):
        d["settings"]["weights"]["groups"][1]["timesteps"] = [0, 10]

    def with_exit(d):
        d["settings"]["exit"] = {"threshold": 0.5}

    def sha(d):
        d["settings"]["weights"]["sha256"] = "0" * 64

    cases = [
        (lambda: weights.write_bytes(weights.read_bytes()[:-1] + b"x"), "does not match its sha256"),
        (lambda: weights.unlink(), "is missing"),
        (lambda: _edit(schedule, sha), "does not match its sha256"),
        (lambda: _edit(schedule, group_steps), "without gaps or overlaps"),
        (lambda: _edit(schedule, group_subnet), "runs width=0.75"),
        (lambda: _edit(schedule, group_times), "do not hold its steps' timesteps"),
        (lambda: _edit(schedule, with_exit), "exit policy together with fine-tuned group weights"),
    ]
    out = tmp_path / "x.npz"
    for damage, message in cases:
        fresh()
        damage()
        with pytest.raises(DDSMError, match=message):
            load_schedule(schedule, supernet)
        assert main(["sample", str(supernet.path), "--schedule", str(schedule), "--n", "2", "--out", str(out),
                     "--quiet", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    fresh()  # the weights file read again for sampling is hash-checked on the bytes it loads
    loaded = load_schedule(schedule, supernet)
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    with pytest.raises(DDSMError, match="does not match its sha256"):
        generate(Runtime(supernet).plan_schedule(loaded), n=2, seed=0)


def test_finetune_cli_writes_both_or_nothing(tuned, tmp_path, capsys):
    supernet, source, result = tuned
    out = tmp_path / "out" / "ft.json"
    base = ["finetune", str(source), "--supernet", str(supernet.path), "--train-steps", "1", "--batch-size", "4",
            "--quiet", "--device", "cpu"]
    exit_schedule = tmp_path / "exit.json"
    _edit_copy = json.loads(source.read_text())
    _edit_copy["settings"] = {"exit": {"threshold": 0.5}}
    exit_schedule.write_text(json.dumps(_edit_copy))
    bad = [
        (base + ["--out", str(tmp_path / "ft.txt")], "must end in .json"),
        (base + ["--out", str(out), "--distill", "2"], "--distill must be in [0, 1]"),
        (base + ["--out", str(out), "--lr", "0"], "--lr must be a finite number > 0"),
        (base[:2] + ["--supernet", str(tmp_path / "none")] + base[4:] + ["--out", str(out)], "not found"),
        (["finetune", str(exit_schedule)] + base[2:] + ["--out", str(out)], "exit"),
        (["finetune", str(tmp_path / "tampered.json")] + base[2:] + ["--out", str(out)], "does not match its sha256"),
    ]
    (tmp_path / "tampered.json").write_bytes(result.schedule.read_bytes())
    (tmp_path / "tuned.weights.safetensors").write_bytes(result.weights.read_bytes()[:-1] + b"x")
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "ft.txt").exists()
    assert main(base + ["--out", str(out), "--distill", "0.5"]) == 0
    assert "fine-tuned 2 group(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["ft.json", "ft.weights.safetensors"]
    info = json.loads(out.read_text())["settings"]["weights"]["finetune"]
    assert info["distill"] == 0.5 and info["steps"] == 1
    assert main(["sample", str(supernet.path), "--schedule", str(out), "--n", "2", "--out", str(tmp_path / "a.png"),
                 "--quiet", "--device", "cpu", "--exit-threshold", "0.5"]) == 2
    assert "group weights" in capsys.readouterr().err
