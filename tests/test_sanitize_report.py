"""The sanitizer report filter of tests/gpu/sanitize.py: findings in our kernels or library
are told apart from the rest, initcheck reads of peers' buffers (initialized by another
process, which initcheck cannot see) are counted apart, and error counts beyond the printed
records are not lost. The log format is the one compute-sanitizer 2025 printed on an H200."""

from __future__ import annotations

from pathlib import Path

from tests.gpu.sanitize import parse_report, tool_report

NOISE = """\
========= Program hit cudaErrorNotSupported (error 801) on CUDA API call to cudaGetDriverEntryPoint.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: [0x1234] in libtorch_cuda.so
=========
"""
OURS = """\
========= Invalid __global__ write of size 16 bytes
=========     at (anonymous namespace)::decode_dispatch_kernel<2>(Params)+0x1f0 in decode.cu:431
=========     by thread (3,0,0) in block (0,0,0)
=========
"""
UNINIT = """\
========= Uninitialized __global__ memory read of size 8 bytes
=========     at red_add_sys(unsigned long long *, unsigned long long)+0x5dd0 in common.cuh:151
=========     by thread (33,0,0) in block (2,0,0)
=========     Address {address}
=========         Device Frame: <unnamed>::finish_send(...)+0x5d80 in decode.cu:166
=========         Host Frame: moe_decode_dispatch [0xb5c7] in libmoe_plugin_kernels.so
=========
"""


def test_sorts_ours_from_others() -> None:
    log = NOISE + OURS + UNINIT.format(address="0x7000") + "========= ERROR SUMMARY: 4 errors\n"
    report = parse_report(log)
    assert report.ours == [
        "========= Invalid __global__ write of size 16 bytes",
        "========= Uninitialized __global__ memory read of size 8 bytes",
    ]
    assert len(report.others) == 1 and "cudaErrorNotSupported" in report.others[0]
    assert report.peer == []
    assert (report.unprinted, report.summaries) == (1, 1)  # 4 counted, 3 printed


def test_initcheck_reads_of_peer_buffers_are_counted_apart() -> None:
    log = UNINIT.format(address="0x7f0010") + UNINIT.format(address="0x7f0100")
    report = parse_report(log + "========= ERROR SUMMARY: 2 errors\n", [(0x7F0000, 0x7F0100)])
    assert len(report.peer) == 1 and len(report.ours) == 1 and report.unprinted == 0


def test_tool_report_reads_the_log_and_the_ranks_maps(tmp_path: Path) -> None:
    (tmp_path / "initcheck.log").write_text(
        "workload: 26 calls per rank, 0 mismatching elements\n"
        + UNINIT.format(address="0x5000")
        + UNINIT.format(address="0x9000")
        + "========= ERROR SUMMARY: 2 errors\n"
    )
    (tmp_path / "initcheck.maps").write_text("0x4000 0x6000\n0x7000 0x8000\n")
    report = tool_report(tmp_path, "initcheck")
    assert (len(report.peer), len(report.ours), report.unprinted, report.summaries) == (1, 1, 0, 1)


def test_clean_log() -> None:
    report = parse_report("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert (report.ours, report.others, report.peer, report.unprinted) == ([], [], [], 0)
