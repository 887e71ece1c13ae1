"""Sampling: a schedule resolved against a supernet into a plan (`plan`), run from a named seed's noise
(`generation`), and timed side by side (`timing`)."""

from .generation import PrefixCache, describe_executed, executed_summary, generate
from .plan import Plan, Runtime, resolve_device
from .timing import time_against_full, time_plans

__all__ = ["Plan", "PrefixCache", "Runtime", "describe_executed", "executed_summary", "generate", "resolve_device",
           "time_against_full", "time_plans"]
