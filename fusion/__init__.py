"""LoRA fusion: one runtime (`LoRARuntime`) that runs any method, and the methods as schedules.

A plan (`Plan`, from the Python API or the A1111 ``<lora:...>`` syntax) names the LoRAs, weights, block weights
and the method; `build_schedule(plan)` gives the schedule; `LoRARuntime.activate(names, schedule)` runs it.
"""
from .blockweights import BLOCK_IDS, PRESETS, BlockWeightError, block_id, layer_rule, parse_weights
from .plan import METHODS, LoRARef, Plan
from .runtime import LoRARuntime
from .schedules import (SCHEDULES, Binding, BlockWise, Composite, Merge, MergeOptions, Pass, Schedule, Switch,
                        build_schedule, resolve_step)
from .cmlora import CMLoRA, frequency_scores
from .gated import Gated, GateParams
from .klora import KLoRA
from .syntax import PromptSyntaxError, format_tag, parse_prompt, plan_from_prompt

__all__ = [
    "BLOCK_IDS", "PRESETS", "BlockWeightError", "block_id", "layer_rule", "parse_weights",
    "METHODS", "LoRARef", "Plan",
    "LoRARuntime",
    "SCHEDULES", "Binding", "BlockWise", "Composite", "Merge", "MergeOptions", "Pass", "Schedule", "Switch",
    "build_schedule", "resolve_step",
    "CMLoRA", "frequency_scores", "Gated", "GateParams", "KLoRA",
    "PromptSyntaxError", "format_tag", "parse_prompt", "plan_from_prompt",
]
