"""Deployment targets of an exported schedule.

`onnx_export` (needs torch, onnx, onnxruntime) writes one ONNX graph per distinct step network of a
schedule and a manifest; `onnx_sampler` (numpy and onnxruntime only: it never imports torch) runs
them with the same DDIM / DDPM steps as `ddsm_search.diffusion`. Nothing is imported here, so that
importing the sampler stays light.
"""
