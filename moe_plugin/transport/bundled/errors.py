"""The device-side error record of the bundled kernels (`ErrorRecord` in csrc/common.cuh):
written by a kernel whose bounded wait for a peer gave up, read by `BundledTransport.check`."""

from __future__ import annotations

import torch

PHASE_NAMES = {
    1: "decode dispatch",
    2: "decode combine",
    3: "prefill layout",
    4: "prefill dispatch",
    5: "prefill combine",
}
"""MOE_PHASE_* codes of csrc/common.cuh."""

ERROR_TIMEOUT = 1
_FIELDS = 8  # int32 words of struct ErrorRecord


class ErrorRecord:
    """One zeroed ErrorRecord in device memory; pass `.tensor` to kernels as its pointer."""

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(_FIELDS, dtype=torch.int32, device=device)

    def message(self, timeout_s: float) -> str | None:
        """A description of the recorded failure, or None if there is none (syncs)."""
        words = self.tensor.cpu().tolist()
        code, waiting_rank, peer, phase = words[:4]
        if code == 0:
            return None
        seq = (words[4] & 0xFFFFFFFF) | (words[5] << 32)
        slot = words[6]
        phase_name = PHASE_NAMES.get(phase, f"phase {phase}")
        if code == ERROR_TIMEOUT:
            return (
                f"rank {waiting_rank}: {phase_name} (slot {slot}, call {seq}) timed out "
                f"after {timeout_s:g} s waiting for peer rank {peer}; did every rank of the "
                "group make the same calls in the same order?"
            )
        return (
            f"rank {waiting_rank}: {phase_name} (slot {slot}, call {seq}) failed with "
            f"code {code} involving peer rank {peer}"
        )
