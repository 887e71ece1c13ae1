"""The `export-onnx` command: its arguments and the call into the exporter.

Kept apart from the exporter so that building the CLI's parser imports neither torch nor onnx;
cli.py adds it with `add_export_onnx_parser(subparsers)`.
"""

from __future__ import annotations

import argparse


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Write one ONNX graph per distinct step network of a schedule, and its manifest."""
    from ..deploy.onnx_export import export_onnx

    out, manifest = export_onnx(args.schedule, args.out, supernet=args.supernet, progress=not args.quiet)
    graphs, sampler = manifest["graphs"], manifest["sampler"]
    worst = max(g["max_error"] for g in graphs.values())
    print(f"wrote {len(graphs)} ONNX graph(s) for {sampler['steps']} {sampler['name']} steps (eta {sampler['eta']:g}) "
          f"and {out / 'manifest.json'}; onnxruntime matches torch within {worst:.1e} (relative); sample with "
          "ddsm_search.deploy.onnx_sampler.OnnxSampler (numpy + onnxruntime)")
    return 0


def add_export_onnx_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export-onnx` command to the CLI's subparsers; return its parser."""
    p = subparsers.add_parser("export-onnx", help="write a schedule as ONNX graphs (one per distinct subnet) and a "
                              "manifest that runs with numpy and onnxruntime alone (no torch)")
    p.add_argument("schedule", help="schedule JSON (from export); one with an exit policy is refused")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the graphs and manifest.json")
    p.add_argument("--supernet", help="the schedule's supernet directory (default: the schedule's supernet.path)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_export_onnx)
    return p
