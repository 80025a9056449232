"""Which experts can take what our prepare returns (DESIGN.md section 7).

`prepare` hands the experts GLOBAL int64 expert ids with -1 wherever a choice is not this
rank's and on padding rows, together with vLLM's `expert_map`; experts must map the ids
through `expert_map` (or their own range check) and skip -1. Nothing in vLLM's experts
interface says whether an experts class does that, so the rule is:

- modular experts in the Standard activation format (what our classes produce);
- not declaring `supports_expert_map() == False` (vLLM's own marker, where a class has it);
- on the CPU platform, not one of vLLM's own experts: they all run vLLM's CPU fused-MoE
  ops, which take int32 LOCAL ids, ignore `expert_map`, and corrupt the heap on a -1.

vLLM's DeepEP v2 prepare/finalize hands Standard experts the same convention (global ids,
-1 kept), so vLLM's GPU experts pass on that ground (no probe: a -1 is what breaks the
experts that cannot take it); so do experts from outside vLLM, such as
`moe_plugin.demo.experts.ReferenceExperts`.
"""

from __future__ import annotations

import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.platforms import current_platform


def _refusal(fused_experts: mk.FusedMoEExperts) -> str | None:
    """Why `fused_experts` cannot take global int64 ids with -1 rows, or None if it can."""
    cls = type(fused_experts)
    if not isinstance(fused_experts, mk.FusedMoEExpertsModular) or (
        cls.activation_format() != mk.FusedMoEActivationFormat.Standard
    ):
        return "it is not a modular experts class in the Standard activation format"
    declared = getattr(fused_experts, "supports_expert_map", None)
    if callable(declared) and not declared():
        return "it declares that it does not honour expert_map"
    if current_platform.is_cpu() and cls.__module__.split(".")[0] == "vllm":
        return (
            "vLLM's CPU experts take int32 local ids, ignore expert_map and cannot skip an id of -1"
        )
    return None


def check_experts(fused_experts: mk.FusedMoEExperts) -> None:
    """Raise ValueError naming the experts class when it cannot take what `prepare`
    returns (see the module docstring); called when vLLM assembles the modular kernel."""
    reason = _refusal(fused_experts)
    if reason is None:
        return
    cls = type(fused_experts)
    raise ValueError(
        f"moe_plugin cannot serve a MoE layer whose experts are {cls.__module__}."
        f"{cls.__qualname__}: {reason}. The plugin's prepare/finalize returns global int64 "
        "expert ids with -1 on rows and choices to skip, for experts that map them through "
        "expert_map. Remove 'moe_plugin' from --additional-config to keep vLLM's own "
        "prepare/finalize for this model."
    )
