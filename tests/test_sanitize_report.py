"""The sanitizer report filter of tests/gpu/sanitize.py: findings in our kernels or library
are told apart from the rest, and error counts beyond the printed records are not lost."""

from __future__ import annotations

from tests.gpu.sanitize import parse_report

LOG = """\
========= COMPUTE-SANITIZER
workload: 13 calls per rank, 0 mismatching elements
========= Program hit cudaErrorNotSupported (error 801) on CUDA API call to cudaGetDriverEntryPoint.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: [0x1234] in libtorch_cuda.so
=========
========= Invalid __global__ write of size 16 bytes
=========     at (anonymous namespace)::decode_dispatch_kernel<2>(Params)+0x1f0 in decode.cu:431
=========     by thread (3,0,0) in block (0,0,0)
=========
========= Uninitialized __global__ memory read of size 4 bytes
=========     at void at::native::index_elementwise_kernel<128, 4>(...)+0x90
=========         Host Frame: [0x99] in libmoe_plugin_kernels.so
=========
========= ERROR SUMMARY: 3 errors
========= ERROR SUMMARY: 1 error
"""


def test_sorts_ours_from_others() -> None:
    report = parse_report(LOG)
    assert report.ours == [
        "========= Invalid __global__ write of size 16 bytes",
        "========= Uninitialized __global__ memory read of size 4 bytes",
    ]
    assert len(report.others) == 1 and "cudaErrorNotSupported" in report.others[0]
    # 4 counted by the summaries, 3 printed.
    assert report.unprinted == 1


def test_clean_log() -> None:
    report = parse_report("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert (report.ours, report.others, report.unprinted) == ([], [], 0)
