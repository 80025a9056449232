"""GPU tests (marked `gpu`): skipped unless at least two CUDA GPUs are visible."""
