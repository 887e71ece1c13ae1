"""Every bad input of the command line: one line naming the problem, exit status 2, nothing written.

Each case builds its input in a fresh folder, runs the CLI in-process and checks three things: the
exit status is 2, stderr is one line that names the problem, and no file or folder appeared (or
changed) in that folder apart from the inputs the case wrote itself.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from ddsm_search.checkpoint import META
from ddsm_search.cli.main import main
from tests.conftest import tiny_dict

SEARCH = {"steps": 4, "segments": 2, "population": 4, "generations": 1, "samples": 20, "workers": 0, "batch_size": 20}


def _yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _config(tmp: Path, **sections) -> str:
    return str(_yaml(tmp / "exp.yaml", tiny_dict(**sections)))


def _copy_supernet(src: Path, tmp: Path) -> Path:
    dst = tmp / "net"
    shutil.copytree(src, dst)
    return dst


def _edit_meta(net: Path, change, *, rehash: bool) -> None:
    from ddsm_search.checkpoint import meta_digest

    meta = json.loads((net / META).read_text())
    change(meta)
    if rehash:
        meta["meta_sha256"] = meta_digest(meta)
    else:
        meta.pop("meta_sha256", None)  # as a file written before meta.json carried its own hash
    (net / META).write_text(json.dumps(meta))


def _schedule(tmp: Path, **fields) -> str:
    """A schedule file of format version 2 (one subnet per step), with `fields` set."""
    data = {"subnets": [{"width": 1.0}] * 5, **fields}
    path = tmp / "schedule.json"
    path.write_text(json.dumps(data))
    return str(path)


def _schedule_v1(tmp: Path, **fields) -> str:
    """A schedule file of format version 1 (one width per step), with `fields` set."""
    data = {"widths": [1.0] * 5, **fields}
    path = tmp / "schedule.json"
    path.write_text(json.dumps(data))
    return str(path)


def _schedule_v3(tmp: Path, steps=None, **fields) -> str:
    """A schedule file of format version 3 (a solver, and a timestep and subnet per step), with `fields` set."""
    steps = steps if steps is not None else [{"timestep": t, "subnet": {"width": 1.0}} for t in (99, 74, 49, 24, 0)]
    data = {"version": 3, "solver": {"name": "unipc", "order": 2}, "steps": steps, **fields}
    path = tmp / "schedule.json"
    path.write_text(json.dumps(data))
    return str(path)


def _sample(n, t, *flags):
    return ["sample", str(n), *flags, "--out", str(t / "g.png")]


def _full_disk(monkeypatch, tmp: Path) -> None:
    """Writing any image fails as on a full disk."""
    from PIL import Image

    def save(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)


def _read_only(monkeypatch, tmp: Path) -> None:
    """The case's folder refuses new files (as a folder without write permission, which root ignores)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == tmp.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _unreadable_weights(monkeypatch, tmp: Path) -> None:
    """Reading the supernet's weights fails with an I/O error (a bad disk), outside ddsm-search's readers."""
    from ddsm_search import checkpoint

    def load_file(path, device="cpu"):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(checkpoint, "load_file", load_file)


# each case: (id, build(tmp, supernet, run) -> argv, the text the error line must contain[, patch(monkeypatch,
# tmp) applied before the command runs]); `run()` returns a finished search run, made on first use
CASES = [
    ("sample --out under /proc", lambda t, n, r: _sample(n, t, "--width", "1")[:-1] + ["/proc/ddsm-search/g.png"],
     "cannot write /proc/ddsm-search/g.png: No such file or directory"),
    ("sample: a full disk", lambda t, n, r: _sample(n, t, "--width", "1", "--n", "4"),
     "g.png: No space left on device", _full_disk),
    ("sample: permission denied", lambda t, n, r: _sample(n, t, "--width", "1", "--n", "4"),
     "g.png: Permission denied", _read_only),
    ("sample: an I/O error reading the weights", lambda t, n, r: _sample(n, t, "--width", "1"),
     "supernet.safetensors: Input/output error", _unreadable_weights),
    ("search --out under /proc", lambda t, n, r: ["search", _config(t, search=SEARCH), "--supernet", str(n),
                                                  "--out", "/proc/ddsm-search/run"], "/proc/ddsm-search/run"),
    ("group_size 0", lambda t, n, r: ["train", _config(t, model={"group_size": 0}), "--out", str(t / "o")],
     "model.group_size"),
    ("head_dim 0", lambda t, n, r: ["train", _config(t, model={"head_dim": 0}), "--out", str(t / "o")],
     "model.head_dim"),
    ("channel_mults too deep", lambda t, n, r: ["train", _config(t, model={"channel_mults": [1, 2, 2, 2, 2]}),
                                                "--out", str(t / "o")], "model.channel_mults"),
    ("odd base_channels", lambda t, n, r: ["train", _config(t, model={"base_channels": 9, "group_size": 1}),
                                           "--out", str(t / "o")], "model.base_channels"),
    ("negative grad_clip", lambda t, n, r: ["train", _config(t, train={"grad_clip": -1.0}), "--out", str(t / "o")],
     "train.grad_clip"),
    ("nan in the config", lambda t, n, r: ["train", _config(t, train={"lr": float("nan")}), "--out", str(t / "o")],
     "train.lr"),
    ("empty config", lambda t, n, r: ["train", _file(t / "e.yaml", ""), "--out", str(t / "o")], "is empty"),
    ("binary config", lambda t, n, r: ["train", _binary(t / "b.yaml"), "--out", str(t / "o")], "not a text file"),
    ("train --out is a file", lambda t, n, r: ["train", _config(t), "--out", _file(t / "taken")], "is a file"),
    ("sample --eta nan", lambda t, n, r: ["sample", str(n), "--width", "1", "--eta", "nan", "--out", str(t / "g.png")],
     "--eta"),
    ("sample --eta negative", lambda t, n, r: ["sample", str(n), "--width", "1", "--eta", "-0.5",
                                               "--out", str(t / "g.png")], "--eta"),
    ("evaluate --eta nan", lambda t, n, r: ["evaluate", str(n), "--width", "1", "--eta", "nan"], "--eta"),
    ("binary schedule", lambda t, n, r: ["sample", str(n), "--schedule", _binary(t / "s.json"),
                                         "--out", str(t / "g.png")], "not a text file"),
    *[case for version, make in (("", _schedule), (" (version 1)", _schedule_v1)) for case in [
        (f"schedule eta text{version}", lambda t, n, r, make=make: _sample(
            n, t, "--schedule", make(t, sampler={"eta": "abc"})), "sampler.eta"),
        (f"schedule eta null{version}", lambda t, n, r, make=make: _sample(
            n, t, "--schedule", make(t, sampler={"eta": None})), "sampler.eta"),
        (f"schedule sampler null{version}", lambda t, n, r, make=make: _sample(
            n, t, "--schedule", make(t, sampler=None)), "'sampler' must be an object"),
        (f"schedule steps text{version}", lambda t, n, r, make=make: _sample(
            n, t, "--schedule", make(t, sampler={"steps": "five"})), "sampler.steps"),
        (f"schedule format version 4{version}", lambda t, n, r, make=make: _sample(
            n, t, "--schedule", make(t, version=4)), "format version 4"),
    ]],
    ("schedule unknown solver", lambda t, n, r: _sample(n, t, "--schedule", _schedule_v3(t, solver={"name": "heun"})),
     "unknown solver 'heun'"),
    ("schedule solver option it lacks", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule_v3(t, solver={"name": "unipc", "eta": 0.5})), "takes no eta"),
    ("schedule solver order 4", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule_v3(t, solver={"name": "dpmsolver++", "order": 4})), "order must be 1, 2 or 3"),
    ("schedule timesteps rising", lambda t, n, r: _sample(n, t, "--schedule", _schedule_v3(
        t, steps=[{"timestep": t, "subnet": {"width": 1.0}} for t in (0, 24, 49, 74, 99)])), "must fall strictly"),
    ("schedule timestep past the process", lambda t, n, r: _sample(n, t, "--schedule", _schedule_v3(
        t, steps=[{"timestep": t, "subnet": {"width": 1.0}} for t in (100, 74, 49, 24, 0)])), "within 0 .. 99"),
    ("schedule step without its timestep", lambda t, n, r: _sample(n, t, "--schedule", _schedule_v3(
        t, steps=[{"subnet": {"width": 1.0}}] * 5)), "steps[0]: expected"),
    ("schedule timesteps list disagrees", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule_v3(t, timesteps=[99, 75, 49, 24, 0])), "not its 'timesteps'"),
    ("schedule widths null", lambda t, n, r: _sample(n, t, "--schedule", _schedule_v1(t, widths=None)), "'widths'"),
    ("schedule widths text", lambda t, n, r: _sample(n, t, "--schedule", _schedule_v1(t, widths=[1.0, "x"])),
     "'widths'"),
    ("schedule subnets null", lambda t, n, r: _sample(n, t, "--schedule", _schedule(t, subnets=None)), "'subnets'"),
    ("schedule subnets empty", lambda t, n, r: _sample(n, t, "--schedule", _schedule(t, subnets=[])), "'subnets'"),
    ("schedule subnet a bare number", lambda t, n, r: _sample(n, t, "--schedule", _schedule(t, subnets=[1.0] * 5)),
     "subnets[0]: expected an object of axis values"),
    ("schedule subnet value text", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, subnets=[{"width": 1.0}] * 4 + [{"width": "half"}])), "subnets[4]"),
    ("schedule subnet unknown axis", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, subnets=[{"colour": 1.0}] * 5)), "subnets[0]: unknown axis 'colour'"),
    ("schedule subnet axis the supernet lacks", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, subnets=[{"width": 1.0, "depth": 2}] * 5)),
     "step 0: this supernet has no axis 'depth'"),
    ("schedule subnet width not in the supernet", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, subnets=[{"width": 1.0}] * 3 + [{"width": 0.3}] * 2)),
     "step 3: width 0.3 is not in the supernet"),
    ("schedule unknown settings", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, settings={"density": 0.5})), "settings ['density'] are not known"),
    ("schedule exit policy not an object", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, settings={"exit": 0.5})), "settings.exit: expected"),
    ("schedule exit policy on a U-Net", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, settings={"exit": {"threshold": 0.5}})), "early exit needs a DiT"),
    ("schedule exit thresholds per step miscounted", lambda t, n, r: _sample(
        n, t, "--schedule", _schedule(t, settings={"exit": {"thresholds": [0.5, None]}})),
     "2 thresholds but the schedule has"),
    ("schedule settings not an object", lambda t, n, r: _sample(n, t, "--schedule", _schedule(t, settings=[1])),
     "'settings' must be an object"),
    ("sample --subnet unknown axis", lambda t, n, r: _sample(n, t, "--subnet", "colour=1"), "is not a subnet"),
    ("sample --subnet axis the supernet lacks", lambda t, n, r: _sample(n, t, "--subnet", "depth=2"),
     "this supernet has no axis 'depth'"),
    ("sample --subnet not a number", lambda t, n, r: _sample(n, t, "--subnet", "width=abc"), "is not a number"),
    ("sample --subnet nan", lambda t, n, r: _sample(n, t, "--subnet", "width=nan"), "must be a finite float"),
    ("sample --subnet no value", lambda t, n, r: _sample(n, t, "--subnet", "width"), "is not a subnet"),
    ("sample --subnet not in the supernet", lambda t, n, r: _sample(n, t, "--subnet", "width=0.3"),
     "width 0.3 is not in the supernet (width choices: 1.0, 0.75, 0.5)"),
    ("sample --width not in the supernet", lambda t, n, r: _sample(n, t, "--width", "0.3"),
     "width 0.3 is not in the supernet (width choices: 1.0, 0.75, 0.5)"),
    ("sample --subnet and --width", lambda t, n, r: _sample(n, t, "--subnet", "width=1", "--width", "1"),
     "not allowed with argument"),
    ("evaluate --subnet not in the supernet", lambda t, n, r: ["evaluate", str(n), "--subnet", "width=0.3",
                                                               "--json", str(t / "r.json")], "width 0.3 is not in"),
    ("evaluate --subnet not a number", lambda t, n, r: ["evaluate", str(n), "--subnet", "width=x",
                                                        "--json", str(t / "r.json")], "is not a number"),
    ("meta.json edited (hash)", lambda t, n, r: ["sample", _meta_edited(n, t, rehash=False, hashed=True), "--width", "1",
                                                 "--out", str(t / "g.png")], "meta_sha256"),
    ("meta.json edited (no hash, wrong shape)", lambda t, n, r: ["sample", _meta_edited(n, t, rehash=False),
                                                                 "--width", "1", "--out", str(t / "g.png")],
     "does not fit the model"),
    ("meta.json missing field", lambda t, n, r: ["sample", _meta_dropped(n, t, "image_shape"), "--width", "1",
                                                 "--out", str(t / "g.png")], "image_shape"),
    *[(f"meta.json FLOPs {what}", lambda t, n, r, entry=entry: ["sample", _meta_flops(n, t, entry), "--width", "1",
                                                                "--out", str(t / "g.png")], "FLOPs table")
      for what, entry in [("of another width", {"width=0.3": 1}), ("of another width (version-1 key)", {"0.3": 1}),
                          ("of an axis the supernet lacks", {"width=1.0,depth=2": 1}),
                          ("under a key that is no subnet", {"wide": 1}),
                          ("not a whole number", {"width=1.0": 1.5})]],
    ("meta.json FLOPs of a width missing", lambda t, n, r: ["sample", _meta_flops(n, t, drop="width=0.5"), "--width",
                                                            "1", "--out", str(t / "g.png")], "lacks subnets width=0.5"),
    ("data.limit 1 at evaluate", lambda t, n, r: ["evaluate", _limit_one(n, t), "--width", "1", "--n", "4"],
     "data.limit"),
    ("data.limit 1 at search", lambda t, n, r: ["search", _config(t, search=SEARCH), "--supernet", _limit_one(n, t),
                                                "--out", str(t / "run")], "data.limit"),
    ("search steps beyond the supernet's timesteps", lambda t, n, r: [
        "search", _config(t, diffusion={"timesteps": 1000}, search={**SEARCH, "steps": 200, "segments": 2}),
        "--supernet", str(n), "--out", str(t / "run")], "search.steps"),
    ("population larger than the space", lambda t, n, r: [
        "search", _config(t, search={**SEARCH, "steps": 1, "segments": 1, "population": 5}), "--supernet", str(n),
        "--out", str(t / "run")], "search.population"),
    ("search --device cuda without CUDA", lambda t, n, r: ["search", _config(t, search=SEARCH), "--supernet", str(n),
                                                           "--out", str(t / "run"), "--device", "cuda"], "CUDA"),
    ("search --out is a file", lambda t, n, r: ["search", _config(t, search=SEARCH), "--supernet", str(n),
                                                "--out", _file(t / "taken")], "is a file"),
    ("report: corrupt run.json", lambda t, n, r: ["report", _run_edited(r(), t, "run.json", "{not json")], "run.json"),
    ("report: binary run.json", lambda t, n, r: ["report", _run_edited(r(), t, "run.json", b"\xff\xfe\x00")],
     "not a text file"),
    ("report: a column missing", lambda t, n, r: ["report", _run_column_dropped(r(), t, "fid")], "lacks columns"),
    ("report: killed in generation 0", lambda t, n, r: ["report", _run_killed_early(r(), t)], "no finished generation"),
    ("report --budget abc", lambda t, n, r: ["report", _run_copy(r(), t), "--budget", "abc"], "--budget"),
    ("report: supernet moved, wrong one given", lambda t, n, r: ["report", _run_copy(r(), t), "--supernet",
                                                                 _other_supernet(n, t)], "hash differs"),
    ("export: supernet moved away", lambda t, n, r: ["export", _run_supernet_gone(r(), n, t), "--budget", "100%",
                                                     "--out", str(t / "x.json")], "--supernet"),
    ("train.sparsity.method unknown", lambda t, n, r: ["train", _config(t, train={"sparsity": {"method": "prune"}}),
                                                       "--out", str(t / "o")], "train.sparsity.method"),
    ("train.sparsity.density 0", lambda t, n, r: ["train", _config(t, train={"sparsity": {"density": 0.0}}),
                                                  "--out", str(t / "o")], "train.sparsity.density"),
    ("train.sparsity unknown key", lambda t, n, r: ["train", _config(t, train={"sparsity": {"densty": 0.5}}),
                                                    "--out", str(t / "o")], "train.sparsity.densty"),
    ("search.solvers unknown", lambda t, n, r: ["search", _config(t, search={**SEARCH, "solvers": ["ddim", "heun"]}),
                                                "--supernet", str(n), "--out", str(t / "run")], "search.solvers"),
    ("search.solvers the same twice", lambda t, n, r: [
        "search", _config(t, search={**SEARCH, "solvers": ["ddim", "ddim(eta=0)"]}), "--supernet", str(n), "--out",
        str(t / "run")], "are the same solver (ddim)"),
    ("search.step_choices past the process", lambda t, n, r: [
        "search", _config(t, search={**SEARCH, "step_choices": [4, 500]}), "--supernet", str(n), "--out",
        str(t / "run")], "search.step_choices"),
    ("search.spacings unknown", lambda t, n, r: ["search", _config(t, search={**SEARCH, "spacings": ["karras"]}),
                                                 "--supernet", str(n), "--out", str(t / "run")], "search.spacings"),
    ("sample --solver unknown", lambda t, n, r: _sample(n, t, "--width", "1", "--solver", "heun"), "unknown solver"),
    ("sample --solver bad option", lambda t, n, r: _sample(n, t, "--width", "1", "--solver", "unipc(order=x)"),
     "order='x' is not a number"),
    ("sample --eta with unipc", lambda t, n, r: _sample(n, t, "--width", "1", "--solver", "unipc", "--eta", "0.5"),
     "takes no eta"),
    ("search.cost unknown", lambda t, n, r: ["search", _config(t, search={**SEARCH, "cost": "cheap"}), "--supernet",
                                             str(n), "--out", str(t / "run")], "search.cost"),
    ("masks.safetensors tampered", lambda t, n, r: _sample(_sparse_tampered(t), t, "--width", "1"),
     "masks.safetensors does not match the hash"),
]


def _binary(path: Path) -> str:
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


def _file(path: Path, text: str = "not a directory\n") -> str:
    path.write_text(text)
    return str(path)


def _meta_edited(net: Path, tmp: Path, *, rehash: bool, hashed: bool = False) -> str:
    copy = _copy_supernet(net, tmp)
    if hashed:  # a hand edit of a file that carries its own hash: the hash catches it
        meta = json.loads((copy / META).read_text())
        meta["step"] = meta["step"] + 1
        (copy / META).write_text(json.dumps(meta))
    else:  # no hash to check (an older file): the weights must still fit the config
        _edit_meta(copy, lambda m: m["config"]["model"].update(base_channels=16), rehash=rehash)
    return str(copy)


def _meta_dropped(net: Path, tmp: Path, field: str) -> str:
    copy = _copy_supernet(net, tmp)
    _edit_meta(copy, lambda m: m.pop(field), rehash=True)
    return str(copy)


def _meta_flops(net: Path, tmp: Path, entry: dict | None = None, drop: str | None = None) -> str:
    copy = _copy_supernet(net, tmp)

    def change(meta):
        assert meta["version"] == 2 and "width=1.0" in meta["flops_per_image"]
        meta["flops_per_image"].update(entry or {})
        if drop:
            del meta["flops_per_image"][drop]

    _edit_meta(copy, change, rehash=True)
    return str(copy)


def _limit_one(net: Path, tmp: Path) -> str:
    copy = _copy_supernet(net, tmp)
    _edit_meta(copy, lambda m: m["config"]["data"].update(limit=1), rehash=True)
    return str(copy)


def _other_supernet(net: Path, tmp: Path) -> str:
    copy = tmp / "other"
    shutil.copytree(net, copy)
    from safetensors.torch import load_file, save_file

    from ddsm_search.checkpoint import meta_digest
    from ddsm_search.io import sha256_file

    weights = load_file(str(copy / "supernet.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + 1.0
    save_file(weights, str(copy / "supernet.safetensors"))
    meta = json.loads((copy / META).read_text())
    meta["sha256"] = sha256_file(copy / "supernet.safetensors")
    meta["meta_sha256"] = meta_digest(meta)
    (copy / META).write_text(json.dumps(meta))
    return str(copy)


def _run_copy(run: Path, tmp: Path) -> str:
    copy = tmp / "run"
    shutil.copytree(run, copy)
    return str(copy)


def _run_edited(run: Path, tmp: Path, name: str, content) -> str:
    copy = Path(_run_copy(run, tmp))
    (copy / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(copy)


def _run_column_dropped(run: Path, tmp: Path, column: str) -> str:
    import pandas as pd

    copy = Path(_run_copy(run, tmp))
    table = pd.read_csv(copy / "evaluations.csv")
    table.drop(columns=[column]).to_csv(copy / "evaluations.csv", index=False)
    return str(copy)


def _run_killed_early(run: Path, tmp: Path) -> str:
    import pandas as pd

    copy = Path(_run_copy(run, tmp))
    for name in ("generations.csv", "front.csv"):
        (copy / name).unlink()
    table = pd.read_csv(copy / "evaluations.csv")
    table.iloc[:2].to_csv(copy / "evaluations.csv", index=False)  # two evaluations landed, then kill -9
    return str(copy)


def _run_supernet_gone(run: Path, net: Path, tmp: Path) -> str:
    copy = Path(_run_copy(run, tmp))
    info = json.loads((copy / "run.json").read_text())
    info["supernet"]["path"] = str(tmp / "moved-away")
    (copy / "run.json").write_text(json.dumps(info))
    return str(copy)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tiny_supernet, tmp_path_factory):
    """A finished one-generation tiny search (module-scoped; cases copy it before changing anything)."""
    root = tmp_path_factory.mktemp("bad-inputs-run")
    config = _yaml(root / "exp.yaml", tiny_dict(search=SEARCH))
    cache = root / "cache"
    assert main(["search", str(config), "--supernet", str(tiny_supernet), "--out", str(root / "run"), "--quiet"]) == 0
    shutil.rmtree(cache, ignore_errors=True)
    return root / "run"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_supernet, request, tmp_path, capsys, monkeypatch):
    name, build, match, *patch = case
    if name.endswith("without CUDA") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("DDSM_SEARCH_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path, tiny_supernet, lambda: request.getfixturevalue("finished_run"))
    before = _snapshot(tmp_path)
    for apply in patch:
        apply(monkeypatch, tmp_path)
    assert main(argv + (["--quiet"] if argv[0] in ("train", "search", "sample", "evaluate") else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddsm-search: error:"), err
    assert match in err[0], err[0]
    assert _snapshot(tmp_path) == before, "a failed command must write nothing"


def _sparse_tampered(tmp: Path) -> str:
    """A tiny sparse supernet (2 steps, static masks) whose masks file was changed after training."""
    from safetensors.torch import load_file, save_file

    from ddsm_search.config import config_from_dict
    from ddsm_search.training import train

    net = train(config_from_dict(tiny_dict(train={"steps": 2, "sparsity": {"method": "static"}})), tmp / "net",
                progress=False, grids=False)
    masks = load_file(str(net / "masks.safetensors"))
    first = next(iter(masks))
    masks[first] = ~masks[first]
    save_file(masks, str(net / "masks.safetensors"))
    return net
