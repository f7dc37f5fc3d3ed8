"""Which torch device to run on, and how fast it can go.

    parse_device("auto")    -> cuda if available, else mps if available, else cpu
    parse_device("cuda:1")  -> that device, or a one-line UserError if this machine has no CUDA
    peak_flops(device)      -> the FLOP/s that MFU is measured against (one stable figure per machine)
    autocast_dtype, autocast, to_device, use_free_cores: how training runs on the device it got

One parser for every command (train, generate, eval, serve, export).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tinystories.errors import UserError
from tinystories.files import write_json_atomic

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def parse_device(requested: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; an explicit device must exist on this machine."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    text = str(requested).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {requested!r}: expected {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {requested!r}: expected {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available in this torch build or machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps_available():
        raise UserError(f"--device {requested}: MPS is not available on this machine")
    return device


# --------------------------------------------------------------------------------------------------
# Running on the device


_MKL_STARTED = False


def start_mkl_on_this_thread() -> None:
    """Make MKL's first call of the process here, single-threaded, before any parallel region does.

    MKL picks its code paths lazily, on its first call. When two OpenMP threads make that first call
    together (a 2-thread cos of the RoPE tables, a matmul inside attention) one of them can get
    another path, and the process computes some values 1 ulp off from the next process: a run then
    cannot repeat itself bit for bit. Measured on an Intel Xeon (2 cores): a 2-thread float64 cos as a
    fresh process's first op came out different in 7 of 60 processes, in 0 of 60 after one 8 x 8
    matmul first (benchmarks/RESULTS.md). Cheap, and only the first call does anything."""
    global _MKL_STARTED
    if not _MKL_STARTED:
        torch.ones(8, 8) @ torch.ones(8, 8)
        torch.ones(8, dtype=torch.float64).cos()
        _MKL_STARTED = True


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of TrainConfig.dtype, or None for plain fp32: 'auto' is bf16 on CUDA, fp32 elsewhere."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy batch on `device`: through pinned memory and without waiting, on CUDA."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def use_free_cores(device: torch.device, saved_threads: int | None = None, free: int | None = None) -> int | None:
    """Set torch's CPU thread count for training and return it (None off the CPU; TF32 matmuls on CUDA).

    OMP_NUM_THREADS, if the user set it, wins; then the count a resumed run trained with (so it repeats
    the uninterrupted run bit for bit); else every core that no other program is keeping busy. On a
    2-core laptop with one core taken, 2 threads train at half speed (the thread sharing a core holds
    up every parallel region), 1 thread at ~95% of its quiet speed (benchmarks/contention.py).
    `free`: free_cores() as measured earlier (before torch.compile starts its busy compile workers)."""
    if device.type == "cuda":  # tensor cores for the fp32 matmuls that remain outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type != "cpu":
        return None
    threads = pinned_threads() or saved_threads or free or free_cores()
    torch.set_num_threads(threads)
    return threads


def free_cores() -> int:
    """Usable cores less those other programs keep busy (a core counts from ~0.6 busy), at least 1."""
    return max(1, usable_cores() - round(cores_busy_elsewhere() - 0.1))


def pinned_threads() -> int | None:
    """The thread count the user chose the usual way (OMP_NUM_THREADS), or None."""
    pinned = os.environ.get("OMP_NUM_THREADS", "")
    return int(pinned) if pinned.isdigit() and int(pinned) > 0 else None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cores_busy_elsewhere(seconds: float = 0.3) -> float:
    """Cores kept busy by other programs over a short look: the machine's busy time (Linux /proc/stat)
    less this process's own, per second of wall time. 0.0 where /proc/stat cannot be read."""
    first, own_first, started = _busy_core_seconds(), time.process_time(), time.perf_counter()
    if first is None:
        return 0.0
    time.sleep(seconds)
    last, own_last, elapsed = _busy_core_seconds(), time.process_time(), time.perf_counter() - started
    if last is None:
        return 0.0
    return max(0.0, ((last - first) - (own_last - own_first)) / elapsed)


def _busy_core_seconds() -> float | None:
    """Core-seconds the machine has spent not idle since boot (/proc/stat's first line), or None."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# Peak FLOP/s, for MFU

# bf16 dense peak FLOP/s of known GPUs (no sparsity), matched against torch.cuda.get_device_name().
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A6000": 155e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s for MFU: a known GPU's bf16 peak; on CPU the fp32 matmul rate measured once per
    machine and thread count and cached (so a busy moment never lowers it mid-run); else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((value for key, value in GPU_BF16_PEAK_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        return cached_cpu_peak_flops()
    return None


def _cache_file() -> Path:
    root = os.environ.get("TINYSTORIES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinystories")
    return Path(root) / "cpu_peak_flops.json"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_key(threads: int, model: str | None = None) -> str:
    return f"{model or _cpu_model()} | {threads} threads | torch {torch.__version__}"


def cached_cpu_peak_flops() -> float:
    """The best fp32 matmul FLOP/s seen on this CPU at this thread count (measured the first time).

    A measurement taken while another program was busy comes out low and would stay cached (MFU
    above 100% then): N threads can always do what fewer do, so the best cached figure at up to N
    threads counts."""
    threads, model = torch.get_num_threads(), _cpu_model()
    path, key = _cache_file(), _cpu_key(threads, model)
    cache: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    if not isinstance(cache.get(key), (int, float)):
        cache[key] = measure_cpu_matmul_flops()
        with contextlib.suppress(OSError):  # a read-only home only costs a re-measurement next time
            write_json_atomic(path, cache)
    fewer = [cache.get(_cpu_key(n, model)) for n in range(1, threads)]
    return float(max([cache[key]] + [value for value in fewer if isinstance(value, (int, float))]))


def measure_cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square fp32 matmul on this CPU, the fastest of several timings (a practical peak)."""
    generator = torch.Generator().manual_seed(0)  # its own: measuring must not move the training RNG
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b  # warm-up: thread pool start, first-call allocations
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * size ** 3 / fastest
