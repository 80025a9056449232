"""vLLM prepare/finalize classes over our transports (the only package beside
`vllm_plugin.py` that imports vLLM)."""

from moe_plugin.prepare_finalize.base import TransportPrepareAndFinalize
from moe_plugin.prepare_finalize.decode import DecodePrepareAndFinalize
from moe_plugin.prepare_finalize.per_batch import PerBatchPrepareAndFinalize
from moe_plugin.prepare_finalize.prefill import PrefillPrepareAndFinalize

PREPARE_FINALIZE_CLASSES = {
    "decode": DecodePrepareAndFinalize,
    "prefill": PrefillPrepareAndFinalize,
}

__all__ = [
    "DecodePrepareAndFinalize",
    "PREPARE_FINALIZE_CLASSES",
    "PerBatchPrepareAndFinalize",
    "PrefillPrepareAndFinalize",
    "TransportPrepareAndFinalize",
]
