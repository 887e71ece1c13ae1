"""`export-onnx`: a schedule as ONNX graphs and a manifest that numpy and onnxruntime alone run."""

from __future__ import annotations

import argparse

from .args import add_device, add_quiet, device_of


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Write one ONNX graph per distinct step network of a schedule, and its manifest."""
    from ..deploy.onnx_export import export_onnx

    out, manifest = export_onnx(args.schedule, args.out, supernet=args.supernet, device=device_of(args),
                                progress=not args.quiet)
    graphs, solver, linear = manifest["graphs"], manifest["solver"], manifest.get("linear")
    worst = max(g["max_error"] for g in graphs.values())
    form = "" if linear is None else f", its update as a linear form matching torch's within {linear['max_error']:.1e}"
    print(f"wrote {len(graphs)} ONNX graph(s) for {solver['steps']} {solver['key']} steps{form} and "
          f"{out / 'manifest.json'}; onnxruntime matches torch within {worst:.1e} (relative); sample with "
          "ddsm_search.deploy.onnx_sampler.OnnxSampler (numpy + onnxruntime)")
    return 0


def add_parsers(sub) -> None:
    """Add `export-onnx` to the CLI's sub-parsers."""
    p = sub.add_parser("export-onnx", help="write a schedule as ONNX graphs (one per distinct subnet) and a "
                       "manifest that runs with numpy and onnxruntime alone (no torch)")
    p.add_argument("schedule", help="schedule JSON (from export); one with an exit policy is refused")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the graphs and manifest.json")
    p.add_argument("--supernet", help="the schedule's supernet directory (default: the schedule's supernet.path)")
    add_device(p, "cpu")
    add_quiet(p)
    p.set_defaults(func=cmd_export_onnx)
