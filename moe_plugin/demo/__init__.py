"""The README's main job (`python -m moe_plugin.demo`): a small MoE layer through vLLM's
modular kernel with this package's prepare/finalize, checked against the dense MoE."""
