"""The exit policy as part of a schedule: keys, genes of the search, the schedule file, sampling with
executed FLOPs (prefix cache included), the search, export, report and `sample --schedule`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from ddsm_search.checkpoint import load_supernet
from ddsm_search.cli.main import main
from ddsm_search.config import SearchConfig, config_from_dict
from ddsm_search.errors import DDSMError
from ddsm_search.evaluation.quality import evaluate
from ddsm_search.evaluation.scoring import scorer_for
from ddsm_search.methods.early_exit import PLUGIN as EARLY_EXIT
from ddsm_search.methods.early_exit.finetune import heads_sha256
from ddsm_search.methods.early_exit.policy import ExitPolicy
from ddsm_search.sampling import PrefixCache, Runtime, executed_summary, generate
from ddsm_search.schedule import Schedule, load_schedule, save_schedule
from ddsm_search.search.genome import SearchSpace
from ddsm_search.space.steps import ExecutedRecord, Step, parse_plan_key, plan_key, steps_of
from ddsm_search.space.subnet import Subnet, SubnetSpace, schedule_key
from tests.conftest import tiny_dict

TINY_DIT = {"kind": "dit", "patch_size": 2, "hidden_size": 32, "blocks": 4, "head_dim": 8, "mlp_ratio": 2.0,
            "widths": [1.0, 0.5], "depths": [4, 3, 2]}
SEARCH = {"steps": 6, "segments": 2, "population": 6, "generations": 2, "samples": 24, "workers": 0,
          "batch_size": 24, "axes": ["depth"], "exit_thresholds": [0.0, 0.9]}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """A tiny DiT supernet with exit heads, and its config file."""
    root = tmp_path_factory.mktemp("dit-exit-schedule")
    data = tiny_dict(search=SEARCH)
    data["model"] = TINY_DIT
    (root / "dit.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(root / "dit.yaml"), "--out", str(root / "net"), "--train-steps", "3", "--quiet",
                 "--device", "cpu"]) == 0
    assert main(["finetune-exit", str(root / "net"), "--train-steps", "3", "--batch-size", "8", "--quiet"]) == 0
    return root / "net", root / "dit.yaml"


def test_policy_keys_round_trip_and_bad_inputs():
    policy = ExitPolicy((0.8, 0.8, None, 0.5))
    assert policy.key == "0.8*2 off 0.5" and ExitPolicy.parse(policy.key) == policy
    subnets = [Subnet.of(width=1.0, depth=4)] * 2 + [Subnet.of(width=0.5, depth=2)] * 2
    steps = Schedule(subnets, settings={"exit": policy}).step_keys()
    key = plan_key(steps)
    assert key == "width=1.0,depth=4*2 width=0.5,depth=2*2 | exit 0.8*2 off 0.5"
    assert parse_plan_key(key) == steps
    off = Schedule(subnets, settings={"exit": ExitPolicy((None,) * 4)}).step_keys()
    assert plan_key(off) == schedule_key(subnets), "all off is the static schedule"
    assert steps == [Step.of(subnets[0], exit=0.8), Step.of(subnets[1], exit=0.8), Step(subnets[2]),
                     Step.of(subnets[3], exit=0.5)]
    assert ExitPolicy.of(0.7, 3).thresholds == (0.7, 0.7, 0.7)
    for bad in ([-1], [float("nan")], [True], ["x"], []):
        with pytest.raises(DDSMError):
            ExitPolicy(tuple(bad))
    with pytest.raises(DDSMError, match="2 thresholds but the schedule has 3"):
        ExitPolicy.of([0.5, 0.5], 3)
    with pytest.raises(DDSMError, match="3 values of exit for 4 steps"):
        parse_plan_key("width=1.0*4 | exit 0.5*3")


class _Supernet:
    """What exit's genes read of a supernet's model: its space."""

    def __init__(self, space):
        self.space = space


def _exit_genes(supernet_space, thresholds):
    return [EARLY_EXIT.genes(_Supernet(supernet_space), SearchConfig(exit_thresholds=list(thresholds)))]


def test_exit_genes_round_trip_and_seed_the_threshold_sweep():
    supernet_space = SubnetSpace.of({"width": [1.0, 0.5], "depth": [4, 3, 2]})
    space = SearchSpace.of(supernet_space, steps=6, segments=3, genes=_exit_genes(supernet_space, [0.5, 0.9]))
    assert space.genes[0].thresholds == (0.9, 0.5) and space.gene_choices == [2] * 3 + [3] * 3 + [3] * 3
    rng = np.random.default_rng(0)
    for genome in space.random(30, rng) + space.uniform():
        steps = space.plan(genome)
        assert space.plan(space.encode(steps)) == steps
        low = [i for i, s in enumerate(steps) if s.subnet["depth"] == 2]
        assert all(steps[i].get("exit") is None for i in low), "no exit below the shallowest depth"
        if not low:
            assert space.encode(steps) == genome
    sweep = [space.plan(g) for g in space.uniform()[-2:]]
    assert [tuple(s.get("exit") for s in steps) for steps in sweep] == [(0.9,) * 6, (0.5,) * 6]
    assert all([s.subnet for s in steps] == [Subnet.of(width=1.0, depth=4)] * 6 for steps in sweep), \
        "the sweep is at full size"
    assert all(not s.fields for s in space.plan((0,) * 9)), "every segment off is a static schedule"
    with pytest.raises(DDSMError, match="several exit thresholds"):
        space.encode(steps_of([Subnet.of(width=1.0, depth=4)] * 6, exit=[0.9, 0.5, 0.9, 0.9, 0.5, 0.5]))
    with pytest.raises(DDSMError, match="depth axis"):
        width_only = SubnetSpace.of({"width": [1.0, 0.5]})
        SearchSpace.of(width_only, steps=4, segments=2, genes=_exit_genes(width_only, [0.5]))


def test_sampling_accounts_for_what_each_image_executed(dit):
    net, _ = dit
    supernet = load_supernet(net)
    runtime = Runtime(supernet)
    subnets = [Subnet.of(width=1.0, depth=4)] * 3 + [Subnet.of(width=0.5, depth=3)] * 3

    def plan(policy=None):
        settings = {} if policy is None else {"exit": policy}
        return runtime.plan_schedule(Schedule(subnets, settings=settings))

    kwargs = dict(n=5, seed=3)
    static = generate(plan(), **kwargs)
    never, record = ExitPolicy((2.0, None, 2.0, None, 2.0, 2.0)), ExecutedRecord()
    dynamic = plan(never)
    same = generate(dynamic, **kwargs, record=record)
    assert torch.equal(same, static), "a threshold above 1 runs every block: the static schedule"
    # analytically: a dynamic step that never exits costs its static subnet plus one head at every exit
    # point below its cap (depth choices 3 and 2 below 4; 2 below 3), static steps their table's FLOPs
    head = {s.subnet: dynamic.denoiser(s).unit_flops["head"] for s in dynamic.steps if s.fields}
    want = sum(supernet.flops[s] for s in subnets) + 2 * (2 * head[subnets[0]]) + 2 * head[subnets[3]]
    done = executed_summary(dynamic, record, 5)
    assert done["per_image"].tolist() == pytest.approx([want] * 5)
    assert done["depth_per_step"] == {"mean": [4, 4, 4, 3, 3, 3], "sd": [0.0] * 6}
    early, record = plan(ExitPolicy((0.0,) * 6)), ExecutedRecord()
    generate(early, **kwargs, record=record)
    done = executed_summary(early, record, 5)
    assert done["depth_per_step"]["mean"] == [2.0] * 6, "threshold 0: every image leaves at the first exit"
    assert done["flops_per_image"]["mean"] < want and done["flops_per_image"]["sd"] == 0.0


def test_a_plan_with_an_exit_policy_needs_the_heads(dit, tmp_path):
    import shutil

    net, _ = dit
    shutil.copytree(net, tmp_path / "bare")
    (tmp_path / "bare" / "exit_heads.json").unlink()
    supernet = load_supernet(tmp_path / "bare")
    with pytest.raises(DDSMError, match="exit heads"):
        Runtime(supernet).plan(steps_of([Subnet.of(width=1.0, depth=4)] * 3, exit=[0.0] * 3))


def test_prefix_cache_keeps_the_executed_flops_of_dynamic_steps(dit):
    net, _ = dit
    supernet = load_supernet(net)
    runtime, scorer = Runtime(supernet, batch_size=4), scorer_for(supernet)
    subnets = [Subnet.of(width=1.0, depth=4)] * 6
    first, second = (runtime.plan(steps_of(subnets, exit=p)) for p in ([0.0] * 3 + [None] * 3, [0.0] * 6))
    kwargs = dict(n=6, seed_set="search", batch_size=4)  # two chunks per step
    alone = [evaluate(p, scorer, **kwargs) for p in (first, second)]
    cache = PrefixCache([3])
    cached = [evaluate(p, scorer, cache=cache, **kwargs) for p in (first, second)]
    assert cache.steps_saved == 3, "the second schedule resumed after the shared dynamic prefix"
    for a, b in zip(alone, cached):
        assert a["executed"] == b["executed"] and a["fid"] == pytest.approx(b["fid"])
        assert a["schedule"] == b["schedule"] and " | exit " in a["schedule"]
    assert alone[1]["gflops_per_image"] < alone[0]["gflops_per_image"]


def test_exit_policy_round_trips_through_the_schedule_file(dit, tmp_path):
    net, _ = dit
    supernet = load_supernet(net)
    subnets = [Subnet.of(width=1.0, depth=4)] * 4
    policy = ExitPolicy((0.9, 0.9, None, 0.2))
    path = save_schedule(tmp_path / "s.json", Schedule(subnets=subnets, settings={"exit": policy}), supernet)
    data = json.loads(path.read_text())
    assert data["settings"]["exit"] == {"thresholds": [0.9, 0.9, None, 0.2], "heads_sha256": heads_sha256(supernet)}
    back = load_schedule(path, supernet)
    assert back.settings["exit"] == policy and back.subnets == subnets
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"subnets": [{"depth": 3}] * 4, "settings": {"exit": {"threshold": 0.5}}}))
    assert load_schedule(hand, supernet).settings["exit"] == ExitPolicy((0.5,) * 4)
    bad = {"unknown": ({"exit": {"threshold": 0.5}, "density": 1}, "not known"),
           "count": ({"exit": {"thresholds": [0.5, 0.5]}}, "2 thresholds but the schedule has 4"),
           "both": ({"exit": {"threshold": 0.5, "thresholds": [0.5] * 4}}, "conflicting"),
           "value": ({"exit": {"threshold": -2}}, "finite number >= 0"),
           "heads": ({"exit": {"threshold": 0.5, "heads_sha256": "0" * 64}}, "other exit heads")}
    for name, (settings, message) in bad.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"subnets": [{"depth": 3}] * 4, "settings": settings}))
        with pytest.raises(DDSMError, match=message):
            load_schedule(p, supernet)


def test_search_export_report_and_sample_run_the_exit_policy(dit, tmp_path, capsys):
    net, config = dit
    run = tmp_path / "run"
    assert main(["search", str(config), "--supernet", str(net), "--out", str(run), "--quiet"]) == 0
    from ddsm_search.report.tables import load_run, row_steps, row_subnets

    table = load_run(run)
    exits = table.apply(lambda row: any(s.get("exit") is not None for s in row_steps(row)), axis=1)
    dynamic = table[exits]
    assert len(dynamic) >= 2 and (~exits).any()
    supernet = load_supernet(net)
    for _, row in dynamic.iterrows():
        static = supernet.schedule_flops(row_subnets(row)) / 1e9
        assert all(s.subnet["depth"] > 2 for s in row_steps(row) if s.get("exit") is not None)
        assert row["gflops"] != pytest.approx(static), "a dynamic schedule's FLOPs are those executed"
        assert row["gflops_sd"] >= 0 and " | exit " in row["schedule"]
    sweep = dynamic[dynamic["uniform"].isin(["exit=0.0", "exit=0.9"])]
    assert len(sweep) == 2, "the first generation holds the threshold sweep at full size"
    # at full depth only thresholds are searched: the cheapest schedule is dynamic, and a quality bar
    # every schedule meets exports it
    data = yaml.safe_load(config.read_text())
    data["search"]["choices"] = {"depth": [4]}
    (tmp_path / "exit-only.yaml").write_text(yaml.safe_dump(data))
    run = tmp_path / "exit-only"
    assert main(["search", str(tmp_path / "exit-only.yaml"), "--supernet", str(net), "--out", str(run),
                 "--quiet"]) == 0
    assert main(["export", str(run), "--max-loss", "1e9", "--n", "16", "--out", str(tmp_path / "s.json"),
                 "--quiet"]) == 0
    schedule = json.loads((tmp_path / "s.json").read_text())
    assert "exit" in schedule["settings"] and schedule["executed"]["samples"] == 16
    assert len(schedule["executed"]["depth_per_step"]["mean"]) == 6
    capsys.readouterr()
    assert main(["sample", str(net), "--schedule", str(tmp_path / "s.json"), "--n", "4", "--out",
                 str(tmp_path / "x.npz"), "--quiet"]) == 0
    assert " | exit " in capsys.readouterr().out, "the plan's key names its exit policy"
    cheapest = load_run(run).sort_values("gflops").iloc[0]
    assert any(s.get("exit") is not None for s in row_steps(cheapest))
    assert schedule["gflops_per_image"] <= cheapest["gflops"] * 1.5
    share = f"{100 * cheapest['flops_share'] + 1e-6:.6f}%"
    assert main(["report", str(run), "--budget", share]) == 0
    assert (run / "report" / "schedule.png").is_file()


def test_exit_search_refusals(dit, tiny_supernet, tmp_path, capsys):
    net, config = dit
    with pytest.raises(DDSMError, match="needs a DiT"):
        from ddsm_search.config import validate_search

        validate_search(config_from_dict(tiny_dict(search={"exit_thresholds": [0.5]})))
    with pytest.raises(DDSMError, match="distinct certainties"):
        from ddsm_search.config import validate_search

        data = tiny_dict(search={"exit_thresholds": [0.5, 1.5]})
        data["model"] = TINY_DIT
        validate_search(config_from_dict(data))
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(net, bare)
    (bare / "exit_heads.json").unlink()
    assert main(["search", str(config), "--supernet", str(bare), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no exit heads" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
