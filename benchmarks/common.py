"""Helpers shared by every benchmark: arguments, device and machine facts, timing, memory, output.

Every benchmark module exposes ``main(argv) -> int`` and is run as ``python -m benchmarks.<name>``.
It prints a table and writes a JSON result (by default ``benchmarks/results/<name>.json``, atomically)
holding the machine, the command line, the settings, one entry per row and the target verdict.
Timings are always reported as ratios against a baseline measured in the same process, on the same
data and model sizes; absolute seconds are kept in the JSON for reference only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medsynth.device import resolve_device as pick_device
from medsynth.errors import MedsynthError

if TYPE_CHECKING:  # only for annotations: these imports cost seconds (MONAI)
    from medsynth.config.schema import MedsynthConfig
    from medsynth.generator import MaskGenerator

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository root (benchmarks run with it as working directory; configs are relative to it)."""
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
"""Default folder of the JSON results."""
JSON_MARKER = "BENCH_JSON "
"""Prefix of the one stdout line a worker subprocess reports its result on."""
DEVICES = ("cpu", "cuda", "auto")


class BenchmarkError(Exception):
    """A problem the user can fix (missing outputs, bad option); printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------
# arguments, device, threads
# ----------------------------------------------------------------------------------------------


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes.

    Args:
        name: Benchmark name (module ``benchmarks.<name>``; default result ``results/<name>.json``).
        description: One paragraph on what the benchmark measures.

    Returns:
        A parser with ``--device``, ``--threads`` and ``--out``.
    """
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--device", choices=DEVICES, default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's default; 1 is immune to other busy processes)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON result file")
    return p


def add_set_arg(
    p: argparse.ArgumentParser, help_text: str = "config override, as `medsynth --set` (repeatable)"
) -> None:
    """Add repeatable ``--set key=value`` config overrides (collected in ``args.overrides``) to ``p``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def add_config_args(p: argparse.ArgumentParser, default: str, what: str = "network sizes") -> None:
    """Add ``--config`` (default ``default``) and repeatable ``--set key=value`` overrides to ``p``."""
    p.add_argument("--config", default=default, help=f"medsynth config giving the {what} (default: {default})")
    add_set_arg(p)


def resolve_device(choice: str) -> torch.device:
    """The torch device for ``--device`` (``auto``: CUDA when available, else CPU).

    Raises:
        BenchmarkError: If ``cuda`` is requested but not available, or the choice is unknown.
    """
    if choice not in DEVICES:
        raise BenchmarkError(f"--device must be one of {DEVICES}, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda was requested but torch sees no CUDA device")
    return pick_device(None if choice == "auto" else choice)


def apply_threads(n: int | None) -> None:
    """Set torch's CPU thread count (None keeps torch's default)."""
    if n is not None:
        if n < 1:
            raise BenchmarkError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``; the first thing every benchmark does."""
    apply_threads(args.threads)
    return resolve_device(args.device)


def load_cfg(path: str | Path, overrides: Sequence[str] = ()) -> MedsynthConfig:
    """A validated medsynth config (relative paths are taken from the repository root if not found here)."""
    from medsynth.config.loader import load_config

    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    return load_config(p, list(overrides))


def shared_root() -> Path:
    """The shared folder: ``$MEDSYNTH_SHARED``, else ``../shared`` next to the repository."""
    env = os.environ.get("MEDSYNTH_SHARED")
    return Path(env).resolve() if env else (REPO_ROOT.parent / "shared").resolve()


# ----------------------------------------------------------------------------------------------
# machine facts
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (the GPU's name, or the CPU model)."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return cpu_model()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Facts about the machine a result was measured on (JSON-ready)."""
    try:
        import monai

        monai_version: str | None = str(monai.__version__)
    except ImportError:  # pragma: no cover - monai is a dependency
        monai_version = None
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "monai": monai_version,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def command_line(name: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run: ``python -m benchmarks.<name> <argv>``."""
    return " ".join(["python", "-m", f"benchmarks.{name}", *(shlex.quote(a) for a in argv)])


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device | None) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU or None)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up.

    Attributes:
        seconds: Seconds of each timed repeat.
        warmup: Untimed calls made first.
    """

    seconds: tuple[float, ...]
    warmup: int

    @property
    def total(self) -> float:
        """Sum over the repeats."""
        return float(sum(self.seconds))

    @property
    def median(self) -> float:
        """Median repeat (robust to a repeat slowed by another process)."""
        s = sorted(self.seconds)
        mid = len(s) // 2
        return float(s[mid]) if len(s) % 2 else float((s[mid - 1] + s[mid]) / 2)

    @property
    def best(self) -> float:
        """Fastest repeat."""
        return float(min(self.seconds))

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"seconds": list(self.seconds), "median": self.median, "best": self.best, "warmup": self.warmup}


def time_call(
    fn: Callable[[], object], *, repeats: int = 1, warmup: int = 0, device: torch.device | None = None
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA synchronised).

    Args:
        fn: The work to time.
        repeats: Timed calls (>= 1).
        warmup: Untimed calls first (allocator, lazy initialisation, caches).
        device: Device to synchronise before reading the clock.

    Returns:
        The :class:`Timing`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return Timing(tuple(out), warmup)


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing, not finite, or ``den`` is zero."""
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den == 0:
        return None
    return float(num) / float(den)


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage`` ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def reset_peak_device_memory(device: torch.device) -> None:
    """Reset CUDA's peak-allocation counter (no-op on CPU, where RSS peaks cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory_mb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on a CUDA ``device`` since the last reset, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.max_memory_allocated(device)) / 2**20


def run_json_subprocess(module: str, args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process and return the JSON it reports.

    The child inherits the environment (thread variables included), runs in the repository root and
    reports one stdout line ``BENCH_JSON {...}`` (:func:`emit_json`); a fresh process per measurement
    keeps peak-memory counters from mixing.

    Raises:
        BenchmarkError: If the child fails or reports nothing.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchmarkError(f"worker `python -m {module} {shlex.join(args)}` failed (exit {proc.returncode}): {tail}")
    data: dict[str, Any] = json.loads(lines[-1][len(JSON_MARKER) :])
    return data


def emit_json(obj: Mapping[str, Any]) -> None:
    """Print ``obj`` as the one ``BENCH_JSON`` line a worker subprocess reports."""
    print(JSON_MARKER + json.dumps(clean_json(obj)), flush=True)


# ----------------------------------------------------------------------------------------------
# random-init networks and data of a config (throughput and memory do not need trained weights)
# ----------------------------------------------------------------------------------------------


def num_classes_of(cfg: MedsynthConfig) -> int:
    """One-hot mask channels of a config's cache: max label + 1 (a derived label included)."""
    from medsynth.data.preprocess import output_labels

    return max(output_labels(cfg)) + 1


def with_spatial_size(cfg: MedsynthConfig, size: Sequence[int]) -> MedsynthConfig:
    """A copy of ``cfg`` whose images are ``size`` (``preprocess.spatial_size``); networks unchanged."""
    if len(size) != cfg.preprocess.spatial_dims:
        raise BenchmarkError(f"size {list(size)} does not have {cfg.preprocess.spatial_dims} entries")
    pre = cfg.preprocess.model_copy(update={"spatial_size": [int(s) for s in size]})
    return cfg.model_copy(update={"preprocess": pre})


def size_multiple(cfg: MedsynthConfig) -> int:
    """Image sides must be multiples of this: autoencoder factor x the UNet's total downsampling."""
    from medsynth.models.autoencoder import downsample_factor

    return int(downsample_factor(cfg.autoencoder) * 2 ** (len(cfg.diffusion.network.channels) - 1))


def random_masks(n: int, spatial: Sequence[int], num_classes: int, seed: int = 0) -> torch.Tensor:
    """``(n, 1, *spatial)`` uint8 label maps: blocky random labels in ``[0, num_classes)`` (4-voxel blocks)."""
    g = torch.Generator().manual_seed(seed)
    coarse = [max(1, int(s) // 4) for s in spatial]
    low = torch.randint(0, num_classes, (n, 1, *coarse), generator=g).float()
    up = torch.nn.functional.interpolate(low, size=[int(s) for s in spatial], mode="nearest")
    return up.to(torch.uint8)


def random_images(n: int, spatial: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``(n, 1, *spatial)`` float32 images uniform in ``[0, 1]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, *[int(s) for s in spatial]), generator=g)


def random_generator(cfg: MedsynthConfig, num_classes: int, device: torch.device, seed: int = 0) -> MaskGenerator:
    """A :class:`MaskGenerator` of randomly initialised networks with the config's sizes.

    The ControlNet is initialised from the (random) UNet as in training; its zero convolutions stay
    zero, which changes no cost.
    """
    from medsynth.generator import (
        MaskGenerator,
        build_controlled,
        latent_channels,
        latent_spatial_shape,
        make_objective,
    )
    from medsynth.models.autoencoder import build_autoencoder
    from medsynth.models.unet import build_diffusion_unet

    torch.manual_seed(seed)
    dims = cfg.preprocess.spatial_dims
    ae = build_autoencoder(cfg.autoencoder, dims).to(device).eval()
    unet = build_diffusion_unet(cfg.diffusion, dims, latent_channels(cfg))
    controlled = build_controlled(cfg, unet, num_classes).to(device).eval()
    objective = make_objective(cfg, latent_spatial_shape(cfg))
    return MaskGenerator(ae, controlled, objective, 1.0, num_classes, latent_channels(cfg), device, {})


# ----------------------------------------------------------------------------------------------
# output: table and JSON
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A table column: row key, header and format (``"{:.2f}"``-style, applied to numbers)."""

    key: str
    header: str
    fmt: str = "{}"


def format_cell(value: Any, fmt: str = "{}") -> str:
    """Format one cell: None/NaN as ``-``, numbers with ``fmt``, anything else with ``str``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value)


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> None:
    """Print ``rows`` as a table (rich), one line per row, cells formatted by :func:`format_cell`."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c.header, overflow="fold")
    for r in rows:
        table.add_row(*(format_cell(r.get(c.key), c.fmt) for c in columns))
    width = None if sys.stdout.isatty() else 200  # no wrapping of tables in logs
    Console(width=width).print(table)


def clean_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and tuples/Paths/tensors made JSON-friendly."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return clean_json(obj.tolist())
    return obj


def verdict(passed: bool | None) -> str:
    """``PASS``, ``FAIL`` or ``n/a`` (target not measurable)."""
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def write_result(
    path: Path,
    name: str,
    argv: Sequence[str],
    device: torch.device,
    settings: Mapping[str, Any],
    baseline: str,
    rows: Sequence[Mapping[str, Any]],
    target: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a benchmark's JSON result atomically (:func:`medsynth.fileio.write_json_atomic`) and print its path.

    Args:
        path: Output file.
        name: Benchmark name.
        argv: Its arguments (for the reproducing command line).
        device: Device measured on.
        settings: Resolved settings (sizes, steps, batch sizes, ...).
        baseline: What the ratios are relative to.
        rows: One mapping per table row.
        target: ``{"text": ..., "passed": bool | None, ...}``.
        notes: Caveats that belong with the numbers.
        extra: Further top-level entries.

    Returns:
        ``path``.
    """
    from medsynth.fileio import write_json_atomic

    payload = {
        "benchmark": name,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(name, argv),
        "machine": machine_info(device),
        "settings": dict(settings),
        "baseline": baseline,
        "rows": [dict(r) for r in rows],
        "target": dict(target) if target is not None else None,
        "notes": list(notes),
        **(dict(extra) if extra else {}),
    }
    out = write_json_atomic(path, clean_json(payload))
    print(f"result: {out}")
    return out


def run_main(body: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    """Run a benchmark's ``body(argv)``; a user-fixable error becomes one line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(args)
    except (BenchmarkError, MedsynthError) as exc:
        hint = getattr(exc, "hint", "")
        print(f"error: {exc}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
        return 2
