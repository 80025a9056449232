"""The serving configs in configs/: each loads through vLLM's own argument parser
(`--config`, as `vllm serve --config` reads it) into EngineArgs with the flags the plugin
needs, and its `additional_config["moe_plugin"]` parses into our settings."""

from __future__ import annotations

import pathlib

import pytest

from moe_plugin.config import PluginSettings

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))
# model -> (GPUs, routed experts): the expert count must split evenly over the GPUs.
EXPECTED = {
    "deepseek-ai/DeepSeek-V3": (8, 256),
    "Qwen/Qwen3-30B-A3B": (4, 128),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (4, 8),
}


def test_every_expected_config_is_present() -> None:
    assert len(CONFIGS) == len(EXPECTED), [c.name for c in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_in_vllm(path: pathlib.Path) -> None:
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--config", str(path)]))

    gpus, experts = EXPECTED[args.model]
    assert args.data_parallel_size == gpus
    assert args.tensor_parallel_size == 1
    assert args.enable_expert_parallel
    assert args.all2all_backend == "allgather_reducescatter"
    assert experts % gpus == 0
    settings = PluginSettings.from_additional_config(args.additional_config)
    assert settings is not None, f"{path.name} does not turn the plugin on"
    assert settings.mode == "auto" and settings.transport == "bundled"
    assert (
        settings.max_tokens_per_rank is None
        or settings.max_tokens_per_rank >= args.max_num_batched_tokens
    )
