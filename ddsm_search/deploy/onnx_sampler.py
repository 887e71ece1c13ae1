"""Sample a schedule exported by `ddsm-search export-onnx` with numpy and onnxruntime only (no torch).

The folder holds `manifest.json` and one ONNX graph per distinct step network. Every graph has
  inputs   x    float32 (batch, C, H, W)   the latent as the network sees it
           t    float32 (batch,)           the timestep of each image (whole numbers 0 .. T-1)
  output   eps  float32 (batch, C, H, W)   the predicted noise
with `batch` a dynamic axis. The update from one step to the next is the schedule's solver's:
- DDIM (eta 0 or above) and ancestral DDPM over the respaced chain, written out here as
  ddsm_search/solvers/ddim.py writes them: x0 clipped to [-1, 1], eps recomputed from the clipped x0, the
  last step returning x0 (the images are in [-1, 1]);
- every other solver (DPM-Solver++ 2M/3M and SDE, UniPC, Euler) as the fixed linear maps around its
  predicted x0 that the manifest holds (`linear`, read off diffusers' scheduler at export,
  ddsm_search/solvers/linear.py): step i predicts x0_i = a_i * x_i + b_i * eps_i, clipped to [-1, 1] if
  `linear.clip` (the solver's clip, diffusers' thresholding at 1), and the latent after step i is
  c_i * x_T + sum_j d_ij * x0_j (+ sum_k e_ik * z_k, step noises) over the initial latent and the x0
  predictions so far, each evaluated in float64; the network sees s_i * x_i, and x_T is
  init_noise_sigma times the initial noise. The images are the solver's last latent, as `generate`
  returns them (in [-1, 1] when the solver clips: its last step returns its clipped x0).

Noise: `sample(n, seed=S)` draws from numpy's default_rng(S): the initial noise (n, C, H, W) first,
then, for a stochastic solver (DDPM, DDIM with eta > 0, SDE-DPM-Solver++), one (n, C, H, W) array per
step that draws noise (every step but the last). These are not torch's numbers: to reproduce
`ddsm_search.sampling.generate` exactly, pass its draws as `noise` and `step_noise` (the initial noise,
then one array per step but the last, in the order it draws them from its CPU generator).

Manifest versions: 3 names the solver (`solver`, and `linear` for the others, around x0 as above);
version 2 wrote `linear` for unclipped solvers only, its latent rows over x_T and the model outputs
eps_j themselves (no `x0`, no `clip`: read here as a_j = 0, b_j = 1, no clip); version 1 (DDIM and DDPM
only, under `sampler`). Versions 1 and 2 still load and sample as before.

This file imports nothing of ddsm_search but its error type (and works copied on its own beside the
graphs), so a deployment needs only numpy and onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

try:
    from ..errors import DDSMError
except ImportError:  # this file copied on its own, outside the package
    class DDSMError(Exception):
        """A problem with the exported folder or the inputs: the message names it."""

FORMAT = "ddsm-search/onnx"
VERSION = 3
# version 1: DDIM and DDPM only, the solver under "sampler"; 2: `linear` over eps (unclipped solvers only)
VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
CLIPPED = ("ddim", "ddpm")  # the solvers this file writes out; the others run as the manifest's linear form
INPUTS, OUTPUT = ("x", "t"), "eps"

StepNoise = Union[np.ndarray, Sequence[np.ndarray], Callable[[int], np.ndarray], None]


def manifest_digest(manifest: dict) -> str:
    """Return the SHA-256 of a manifest's content (every field but this digest, in canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def solver_section(manifest: dict) -> dict:
    """Return a checked manifest's solver: `name`, `timesteps`, `eta` (DDIM) and the other options
    (version 1 wrote it as `sampler`)."""
    return manifest["sampler"] if manifest["version"] == 1 else manifest["solver"]


def read_manifest(folder: str | Path) -> dict:
    """Return the checked manifest of an exported folder, or raise DDSMError naming what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DDSMError(f"ONNX export folder not found: {folder}")
    if not path.is_file():
        raise DDSMError(f"{folder} is not an ONNX export (no {MANIFEST}; write one with 'ddsm-search export-onnx')")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DDSMError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DDSMError(f"{path} is not a {FORMAT} manifest")
    version = manifest.get("version")
    if version not in VERSIONS or isinstance(version, bool):
        raise DDSMError(f"{path} has format version {version!r}; this sampler reads "
                        f"{', '.join(map(str, VERSIONS))}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise DDSMError(f"{path} was changed after export (its manifest_sha256 does not match its content)")

    def fail(message: str) -> DDSMError:
        return DDSMError(f"{path}: {message}")

    shape = manifest.get("image_shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(_whole(v) and v > 0 for v in shape):
        raise fail(f"image_shape must be three positive whole numbers, got {shape!r}")
    where = "sampler" if version == 1 else "solver"
    solver, noise = manifest.get(where), manifest.get("noise_schedule")
    if not isinstance(solver, dict) or not isinstance(solver.get("name"), str) \
            or (version == 1 and solver["name"] not in CLIPPED):
        raise fail(f"{where}.name must be {'one of ' + ', '.join(CLIPPED) if version == 1 else 'a solver name'}")
    if (solver["name"] == "ddim" or version == 1) and (not _number(solver.get("eta")) or solver["eta"] < 0):
        raise fail(f"{where}.eta must be a finite number >= 0, got {solver.get('eta')!r}")
    abar = noise.get("alphas_cumprod") if isinstance(noise, dict) else None
    if not isinstance(abar, list) or not abar or not all(_number(a) and 0 < a <= 1 for a in abar):
        raise fail("noise_schedule.alphas_cumprod must be a list of numbers in (0, 1]")
    graphs, steps, timesteps = manifest.get("graphs"), manifest.get("steps"), solver.get("timesteps")
    if not isinstance(graphs, dict) or not graphs:
        raise fail("graphs must be a non-empty object")
    for key, graph in graphs.items():
        name = graph.get("file") if isinstance(graph, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            raise fail(f"graphs[{key!r}].file must be a plain file name in the folder, got {name!r}")
        sha = graph.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise fail(f"graphs[{key!r}].sha256 must be 64 hex digits")
    if not isinstance(steps, list) or not steps or any(not isinstance(k, str) or k not in graphs for k in steps):
        raise fail("steps must be a non-empty list of keys of graphs (one per sampling step)")
    if (not isinstance(timesteps, list) or len(timesteps) != len(steps)
            or not all(_whole(t) and 0 <= t < len(abar) for t in timesteps)):
        raise fail(f"{where}.timesteps must be one timestep in 0 .. {len(abar) - 1} per step ({len(steps)})")
    if version > 1 and solver["name"] not in CLIPPED:
        _check_linear(manifest.get("linear"), len(steps), fail, version, solver)
    return manifest


def linear_section(manifest: dict) -> dict | None:
    """Return a checked manifest's linear form as version 3 writes it (a version-2 form read as x0_j =
    eps_j, unclipped), or None for DDIM and DDPM."""
    if solver_section(manifest)["name"] in CLIPPED:
        return None
    linear = manifest["linear"]
    if manifest["version"] == 2:  # its rows are over eps_j: take x0_j = 0 * x_j + 1 * eps_j, unclipped
        return {**linear, "x0": [[0.0, 1.0]] * len(linear["latent"]), "clip": False}
    return linear


def _numbers(value, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(_number(v) for v in value)


def _check_linear(linear, steps: int, fail: Callable[[str], DDSMError], version: int, solver: dict) -> None:
    """Raise fail(...) unless `linear` is a linear form of `steps` steps as `version` writes it (see the
    module's docstring)."""
    if not isinstance(linear, dict):
        raise fail("linear must be an object (the solver's coefficients): export again")
    sigma = linear.get("init_noise_sigma")
    if not _number(sigma) or sigma <= 0:
        raise fail(f"linear.init_noise_sigma must be a finite number > 0, got {sigma!r}")
    if not _numbers(linear.get("model_input_scale"), steps):
        raise fail(f"linear.model_input_scale must be {steps} finite numbers (one per step)")
    latent, noise_steps, noise = linear.get("latent"), linear.get("noise_steps"), linear.get("noise")
    if (not isinstance(latent, list) or len(latent) != steps
            or not all(_numbers(r, i + 2) for i, r in enumerate(latent))):
        over = "eps_0 .. eps_i" if version == 2 else "x0_0 .. x0_i"
        raise fail(f"linear.latent must hold {steps} rows, row i of i + 2 finite numbers (x_T, {over})")
    if (not isinstance(noise_steps, list) or not all(_whole(k) and 0 <= k < steps for k in noise_steps)
            or any(a >= b for a, b in zip(noise_steps, noise_steps[1:]))):
        raise fail(f"linear.noise_steps must be rising step numbers in 0 .. {steps - 1}")
    if (not isinstance(noise, list) or len(noise) != steps
            or not all(_numbers(r, sum(k <= i for k in noise_steps)) for i, r in enumerate(noise))):
        raise fail(f"linear.noise must hold {steps} rows, row i one finite number per noise step up to step i")
    if version == 2:
        return
    x0 = linear.get("x0")
    if not isinstance(x0, list) or len(x0) != steps or not all(_numbers(r, 2) for r in x0):
        raise fail(f"linear.x0 must hold {steps} rows of two finite numbers (a_i, b_i: x0_i = a_i x_i + b_i eps_i)")
    if not isinstance(linear.get("clip"), bool) or linear["clip"] != solver.get("clip", linear["clip"]):
        raise fail(f"linear.clip must be true or false, the solver's clip ({solver.get('clip')!r}), "
                   f"got {linear.get('clip')!r}")


def ddim_ddpm_step(x: np.ndarray, eps: np.ndarray, a_t: float, a_prev: float, sampler: str, eta: float,
                   z: np.ndarray | None) -> np.ndarray:
    """Return x at the previous timestep from x_t and the predicted noise (x0 clipped to [-1, 1]), as
    ddsm_search.solvers.ddim.ddim_step computes it (float32 arrays, float64 coefficients)."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    np.clip(x0, -1, 1, out=x0)
    if a_prev >= 1.0:
        return x0
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # consistent with the clipped x0
    if sampler == "ddpm":
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        return mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * z
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    return x_prev + sigma * z if sigma > 0 else x_prev


def predicted_x0(coefficients: Sequence[float], clip: bool, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Return a linear solver's x0 at one step, a * x + b * eps for coefficients (a, b) from its latent x
    and model output eps (float32 arrays), clipped to [-1, 1] if `clip`: computed in float64, as float32."""
    a, b = coefficients
    if a == 0 and b == 1 and not clip:  # a version-2 form: over the model outputs themselves
        return eps
    x0 = np.multiply(x, a, dtype=np.float64)
    x0 += np.multiply(eps, b, dtype=np.float64)
    if clip:
        np.clip(x0, -1, 1, out=x0)
    return x0.astype(np.float32)


def linear_latent(coefficients: Sequence[float], arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Return sum_k coefficients[k] * arrays[k] (float32 arrays), summed in float64, as float32: one
    latent of a linear solver (the module's docstring)."""
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    term = np.empty_like(total)
    for c, a in zip(coefficients, arrays, strict=True):
        if c != 0:
            np.multiply(a, c, out=term, dtype=np.float64)  # in float64: a Python float times float32 is float32
            total += term
    return total.astype(np.float32)


def _bounds(n: int, parts: int) -> list[slice]:
    """Return up to `parts` contiguous, non-empty slices of n images, as equal as can be."""
    edges = [round(k * n / parts) for k in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class OnnxSampler:
    """An exported schedule loaded into onnxruntime: `sample(n, ...)` returns its images (in [-1, 1]
    under DDIM, DDPM and the solvers that clip x0).

    `sessions` > 1 splits every batch into that many contiguous parts, each run by its own
    onnxruntime session in its own thread (with one intra-op thread each unless `threads` says
    otherwise); the images do not depend on `sessions`. `threads` is the intra-op thread count of
    each session (default: onnxruntime's own for one session, 1 for several).
    """

    def __init__(self, manifest_dir: str | Path, threads: int | None = None, sessions: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DDSMError("onnxruntime is not installed (pip install 'ddsm-search[deploy]')") from None
        if not _whole(sessions) or sessions < 1:
            raise DDSMError(f"sessions must be a whole number >= 1, got {sessions!r}")
        if threads is not None and (not _whole(threads) or threads < 1):
            raise DDSMError(f"threads must be a whole number >= 1, got {threads!r}")
        self.folder = Path(manifest_dir)
        self.manifest = read_manifest(self.folder)
        solver = solver_section(self.manifest)
        self.sampler, self.eta = solver["name"], float(solver.get("eta", 0.0))
        self.timesteps = list(solver["timesteps"])
        self.image_shape = tuple(self.manifest["image_shape"])
        self.steps = list(self.manifest["steps"])
        self.sessions = sessions
        # the linear form of a solver other than DDIM and DDPM (as version 3 writes it), None for those two
        self.linear = linear_section(self.manifest)
        abar = [float(a) for a in self.manifest["noise_schedule"]["alphas_cumprod"]]
        # (graph key, t, a_t, a_prev) per step: a_prev of the last step is 1 (it returns x0)
        self.plan = [(key, t, abar[t], abar[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else 1.0)
                     for i, (key, t) in enumerate(zip(self.steps, self.timesteps))]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else (0 if sessions == 1 else 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.runners: dict[str, list] = {}
        for key in dict.fromkeys(self.steps):
            blob = self._verified_graph(key)
            try:
                self.runners[key] = [ort.InferenceSession(blob, options, providers=list(providers))
                                     for _ in range(sessions)]
            except Exception as exc:  # onnxruntime raises its own classes, not exported in a stable place
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DDSMError(f"{self.folder / self.manifest['graphs'][key]['file']} does not load in "
                                f"onnxruntime: {first}") from None
            names = ([i.name for i in self.runners[key][0].get_inputs()],
                     [o.name for o in self.runners[key][0].get_outputs()])
            if sorted(names[0]) != sorted(INPUTS) or names[1] != [OUTPUT]:
                raise DDSMError(f"graph {key!r} has inputs {names[0]} and outputs {names[1]}, not x, t -> eps")

    def _verified_graph(self, key: str) -> bytes:
        """Return a graph's bytes after checking them against the manifest's SHA-256 (the bytes checked
        are the bytes loaded)."""
        path = self.folder / self.manifest["graphs"][key]["file"]
        try:
            blob = path.read_bytes()
        except OSError:
            raise DDSMError(f"graph file missing: {path}") from None
        if hashlib.sha256(blob).hexdigest() != self.manifest["graphs"][key]["sha256"]:
            raise DDSMError(f"{path} does not match its SHA-256 in {MANIFEST} (changed or replaced); export again")
        return blob

    @property
    def noise_steps(self) -> list[int]:
        """Return the steps that draw noise: every step but the last for DDPM and DDIM with eta > 0, the
        steps whose noise reaches the images for a linear solver, none for a deterministic solver."""
        if self.linear is not None:
            return list(self.linear["noise_steps"])
        return list(range(len(self.plan) - 1)) if self.sampler == "ddpm" or self.eta > 0 else []

    @property
    def stochastic(self) -> bool:
        """Return True if some step draws noise (DDPM, DDIM with eta > 0, SDE-DPM-Solver++)."""
        return bool(self.noise_steps)

    def sample(self, n: int, seed: int | None = None, noise: np.ndarray | None = None,
               step_noise: StepNoise = None, batch_size: int | None = None,
               callback: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Return n images (float32, (n, C, H, W)) sampled along the exported schedule.

        `noise`: the initial noise (n, C, H, W), else drawn from default_rng(seed); a linear solver's
        initial latent is it times init_noise_sigma. `step_noise`: for a stochastic solver, the noise of
        step i as `step_noise[i]` (an array (steps - 1, n, C, H, W)) or `step_noise(i)`, for each step
        that draws noise (`noise_steps`, every step but the last), else drawn from the same generator
        after the initial noise. `batch_size` bounds the images per graph call (default: each session's
        whole share). `callback(i, x)` sees the latent after step i.
        """
        if not _whole(n) or n < 1:
            raise DDSMError(f"the number of images must be at least 1, got {n!r}")
        if batch_size is not None and (not _whole(batch_size) or batch_size < 1):
            raise DDSMError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        shape = (n, *self.image_shape)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape, dtype=np.float32) if noise is None else self._checked(noise, shape, "noise")
        linear, noise_steps = self.linear, set(self.noise_steps)
        if linear is not None:
            x = (x * linear["init_noise_sigma"]).astype(np.float32)  # torch: noise * run.init_noise_sigma
        start, x0_of, noise_of = x, [], []  # x_T, and every step's x0 and noise so far (a linear solver)
        parts = _bounds(n, self.sessions)
        pool = ThreadPoolExecutor(len(parts)) if len(parts) > 1 else None
        try:
            for i, (key, t, a_t, a_prev) in enumerate(self.plan):
                z = self._noise_of_step(i, step_noise, rng, shape) if i in noise_steps else None
                out = np.empty_like(x)
                if linear is None:
                    def advance(k: int, part: slice) -> None:
                        eps = self._eps(self.runners[key][k], x[part], t, batch_size)
                        out[part] = ddim_ddpm_step(x[part], eps, a_t, a_prev, self.sampler, self.eta,
                                                   None if z is None else z[part])
                else:
                    scale, x0 = linear["model_input_scale"][i], np.empty_like(x)
                    seen = x if scale == 1 else np.multiply(x, scale, dtype=np.float64).astype(np.float32)
                    x0_of.append(x0)
                    if z is not None:
                        noise_of.append(z)
                    to_x0, terms = linear["x0"][i], linear["latent"][i] + linear["noise"][i]

                    def advance(k: int, part: slice) -> None:
                        eps = self._eps(self.runners[key][k], seen[part], t, batch_size)
                        x0[part] = predicted_x0(to_x0, linear["clip"], x[part], eps)
                        out[part] = linear_latent(terms, [a[part] for a in [start, *x0_of, *noise_of]])

                if pool is None:
                    advance(0, parts[0])
                else:
                    for job in [pool.submit(advance, k, part) for k, part in enumerate(parts)]:
                        job.result()
                x = out
                if callback is not None:
                    callback(i, x)
        finally:
            if pool is not None:
                pool.shutdown()
        return x

    @staticmethod
    def _eps(session, x: np.ndarray, t: int, batch_size: int | None) -> np.ndarray:
        """Return the graph's predicted noise for x at timestep t, in chunks of at most batch_size."""
        size = batch_size or len(x)
        chunks = [x[a:a + size] for a in range(0, len(x), size)]
        outs = [session.run([OUTPUT], {"x": c, "t": np.full(len(c), t, dtype=np.float32)})[0] for c in chunks]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _noise_of_step(self, i: int, step_noise: StepNoise, rng: np.random.Generator, shape) -> np.ndarray:
        if step_noise is None:
            return rng.standard_normal(shape, dtype=np.float32)
        if callable(step_noise):
            return self._checked(step_noise(i), shape, f"step_noise({i})")
        if i >= len(step_noise):
            raise DDSMError(f"step_noise holds {len(step_noise)} steps' noise, but step {i} needs one "
                            f"({len(self.noise_steps)} steps draw noise, the last of them step "
                            f"{self.noise_steps[-1]})")
        return self._checked(step_noise[i], shape, f"step_noise[{i}]")

    @staticmethod
    def _checked(array, shape, what: str) -> np.ndarray:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.shape != tuple(shape):
            raise DDSMError(f"{what} has shape {array.shape}, expected {tuple(shape)}")
        return array
