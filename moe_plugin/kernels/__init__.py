"""The bundled CUDA kernels: sources in `csrc/`, built by `build`, called through `binding`."""
