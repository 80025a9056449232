"""Build the bundled CUDA kernels (`csrc/*.cu`) into one shared library with nvcc.

The library is built on first use and cached under `~/.cache/moe_plugin/<name>` (override
the root with `MOE_PLUGIN_CACHE_DIR`), where the name holds a hash of the sources and flags,
a hash of the nvcc version and the target GPU architectures; a file lock makes concurrent
processes build it once. A GPU uses any cached build of the same sources whose
architectures include its own (one built by the same nvcc, or by any nvcc where none is
installed), so a library prebuilt elsewhere for several architectures serves it. The
sources include no torch header, so the library also builds on a machine without a GPU:

    python -m moe_plugin.kernels.build              # for the visible GPU, into the cache
    python -m moe_plugin.kernels.build --arch 90    # sm_90, no GPU needed
    python -m moe_plugin.kernels.build --arch 90 --out-dir /tmp/x   # compile check only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
LIBRARY_NAME = "libmoe_plugin_kernels.so"
NVCC_FLAGS = (
    "-O3",
    "-lineinfo",
    "-std=c++17",
    "-Xcompiler",
    "-fPIC",
    "-Xcompiler",
    "-fvisibility=hidden",
)


def find_nvcc() -> str | None:
    """Path of nvcc: `$CUDA_HOME/bin/nvcc`, else the one on PATH, else /usr/local/cuda's."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def nvcc_version(nvcc: str) -> str:
    """The last line of `nvcc --version` (the release and build)."""
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def nvcc_archs(nvcc: str) -> list[str]:
    """Architectures nvcc can compile for, as numbers without the prefix ("90", "100")."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], check=True, capture_output=True, text=True)
    return [line.strip().removeprefix("compute_") for line in out.stdout.split() if line]


def device_arch(device: int | None = None) -> str:
    """The compute capability of a visible CUDA device as "MAJORMINOR" (e.g. "90")."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def default_archs(nvcc: str) -> list[str]:
    """sm_90, plus sm_100 where this nvcc has it (for prebuilding without a GPU)."""
    return ["90"] + (["100"] if "100" in nvcc_archs(nvcc) else [])


def sources() -> list[Path]:
    """Every .cu file compiled into the library."""
    return sorted(SOURCE_DIR.glob("*.cu"))


def cache_root() -> Path:
    """Root of the build cache: `$MOE_PLUGIN_CACHE_DIR`, else ~/.cache/moe_plugin."""
    env = os.environ.get("MOE_PLUGIN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moe_plugin"


def source_key() -> str:
    """Hash of the sources and the compiler flags."""
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:20]


def nvcc_key(version: str) -> str:
    """Hash of an nvcc version line."""
    return hashlib.sha256(version.encode()).hexdigest()[:8]


def build_name(archs: Sequence[str], version: str) -> str:
    """The cache folder of the sources built for `archs` by nvcc `version`:
    `<source key>-<nvcc key>-sm<arch>_<arch>...` (architectures in a fixed order)."""
    ordered = sorted(set(archs), key=lambda a: (len(a), a))
    return f"{source_key()}-{nvcc_key(version)}-sm{'_'.join(ordered)}"


def find_cached(arch: str, version: str | None, root: Path | None = None) -> Path | None:
    """A cached library of these sources whose architectures include `arch`, built by nvcc
    `version` (None: by any nvcc); of several, the one for the fewest architectures."""
    prefix = source_key() + "-"
    want = None if version is None else nvcc_key(version)
    found = []
    for lib in (root or cache_root()).glob(f"{prefix}*/{LIBRARY_NAME}"):
        tag, sep, archs = lib.parent.name.removeprefix(prefix).partition("-sm")
        built_for = archs.split("_")
        if sep and arch in built_for and want in (None, tag):
            found.append((len(built_for), lib.parent.name, lib))
    return min(found)[2] if found else None


def _gencode_flags(archs: Sequence[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def compile_library(
    archs: Sequence[str],
    out_dir: Path,
    *,
    nvcc: str | None = None,
    jobs: int | None = None,
    ptxas_verbose: bool = False,
) -> Path:
    """Compile every .cu for `archs` in parallel and link them into `out_dir`/LIBRARY_NAME.

    Raises RuntimeError with nvcc's output when a step fails."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    if not archs:
        raise ValueError("archs must name at least one GPU architecture, e.g. ['90']")
    out_dir.mkdir(parents=True, exist_ok=True)
    common = [
        nvcc,
        *NVCC_FLAGS,
        *_gencode_flags(archs),
        "-I",
        str(SOURCE_DIR),
        "--threads",
        str(len(archs)),
    ]
    if ptxas_verbose:
        common += ["-Xptxas", "-v"]
    srcs = sources()
    objs = [out_dir / (s.stem + ".o") for s in srcs]
    jobs = jobs or max(1, min(len(srcs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        runs = list(
            pool.map(
                lambda so: subprocess.run(
                    [*common, "-c", str(so[0]), "-o", str(so[1])], capture_output=True, text=True
                ),
                zip(srcs, objs, strict=True),
            )
        )
    for src, run in zip(srcs, runs, strict=True):
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src.name}:\n{run.stdout}{run.stderr}")
        if ptxas_verbose:
            print(f"== {src.name}\n{run.stderr}", file=sys.stderr)
    lib = out_dir / LIBRARY_NAME
    link = subprocess.run(
        [nvcc, "-shared", *_gencode_flags(archs), *map(str, objs), "-o", str(lib)],
        capture_output=True,
        text=True,
    )
    if link.returncode != 0:
        raise RuntimeError(f"nvcc failed to link {lib.name}:\n{link.stdout}{link.stderr}")
    return lib


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(archs: Sequence[str] | None = None, *, verbose: bool = False) -> Path:
    """Path of the cached library for `archs`, building it first if absent. By default, any
    cached build that includes the current CUDA device's architecture (see `find_cached`),
    else one built for it. Safe to call from many processes at once."""
    nvcc = find_nvcc()
    version = nvcc_version(nvcc) if nvcc else None
    if not archs:
        arch = device_arch()
        cached = find_cached(arch, version)
        if cached is not None:
            return cached
        archs = [arch]
    if version is None:
        raise RuntimeError(
            f"nvcc not found and no library for sm_{','.join(archs)} cached under "
            f"{cache_root()}: the bundled kernels are built on first use, so set CUDA_HOME "
            "or put nvcc on PATH (or prebuild with `python -m moe_plugin.kernels.build` "
            "where nvcc exists and share MOE_PLUGIN_CACHE_DIR)"
        )
    target = cache_root() / build_name(archs, version)
    lib = target / LIBRARY_NAME
    if lib.is_file():
        return lib
    with _file_lock(target.with_suffix(".lock")):
        if lib.is_file():
            return lib
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            built = compile_library(archs, Path(tmp), nvcc=nvcc)
            target.mkdir(parents=True, exist_ok=True)
            os.replace(built, lib)
        if verbose:
            print(
                f"built {lib} for sm_{','.join(archs)} in {time.monotonic() - start:.1f} s",
                file=sys.stderr,
            )
    return lib


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_plugin.kernels.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="comma-separated architectures, e.g. 90 or 90,100 (default: the "
        "visible GPU, or 90 plus 100 where nvcc has it)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="compile into this folder instead of the cache"
    )
    parser.add_argument(
        "--ptxas-verbose",
        action="store_true",
        help="print register and spill counts of every kernel",
    )
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 1
    if args.arch:
        archs = [a.strip().removeprefix("sm_") for a in args.arch.split(",") if a.strip()]
    else:
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        archs = [device_arch()] if has_gpu else default_archs(nvcc)
    start = time.monotonic()
    if args.out_dir is not None or args.ptxas_verbose:
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="moe_plugin_build_"))
        lib = compile_library(archs, out_dir, nvcc=nvcc, ptxas_verbose=args.ptxas_verbose)
    else:
        lib = ensure_built(archs)
    print(f"{lib} (sm_{',sm_'.join(archs)}, {time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
