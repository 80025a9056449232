"""Expert-parallel token dispatch and combine for vLLM's fused-MoE layer."""

__version__ = "0.1.0"
