"""The device-side error record of the bundled kernels (`ErrorRecord` in csrc/api.h):
written by a kernel whose bounded wait for a peer gave up, read by `BundledTransport.check`.
Its fields, phase codes and error codes are the library's (`binding.struct`, `constant`)."""

from __future__ import annotations

import torch

from moe_plugin.kernels import binding

_PHASE_PREFIX = "phase_"


def phase_names() -> dict[int, str]:
    """The library's phase codes (constants phase_*), named as in messages."""
    return {
        value: name.removeprefix(_PHASE_PREFIX).replace("_", " ")
        for name, value in binding.library().constants.items()
        if name.startswith(_PHASE_PREFIX)
    }


class ErrorRecord:
    """One zeroed ErrorRecord in device memory; pass `.tensor` to kernels as its pointer."""

    def __init__(self, device: torch.device) -> None:
        self._struct = binding.struct("error_record")
        nbytes = binding.constant("sizeof_error_record")
        self.tensor = torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def message(self, timeout_s: float) -> str | None:
        """A description of the recorded failure, or None if there is none (syncs)."""
        rec = self._struct.from_buffer_copy(self.tensor.cpu().numpy().tobytes())
        if rec.code == 0:
            return None
        phase = phase_names().get(rec.phase, f"phase {rec.phase}")
        where = f"rank {rec.waiting_rank}: {phase} (slot {rec.slot}, call {rec.seq})"
        if rec.code == binding.constant("error_timeout"):
            return (
                f"{where} timed out after {timeout_s:g} s waiting for peer rank {rec.peer}; "
                "did every rank of the group make the same calls in the same order?"
            )
        return f"{where} failed with code {rec.code} involving peer rank {rec.peer}"
