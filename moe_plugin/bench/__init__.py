"""The benchmark command (`python -m moe_plugin.bench`, `moe-plugin-bench`)."""

from moe_plugin.bench.cli import main

__all__ = ["main"]
