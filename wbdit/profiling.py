"""Where training time and memory go: NVTX ranges, peak memory, and ``wbdit profile``.

- ``PeakMemory``: peak memory between resets, CUDA (max allocated) or CPU (peak RSS).
- ``profile_training``: a few warm-up and measured steps of the real training loop
  (``wbdit.train``) under ``torch.profiler`` (Chrome trace + top-ops table), or, for
  Nsight Systems, bracketed by ``cudaProfilerStart``/``Stop`` (see ``nsys_command``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import time
from pathlib import Path

import torch

from wbdit import datasets, ops
from wbdit.atomic import atomic_path
from wbdit.distributed import default_device
from wbdit.model import PRESETS, build_model
from wbdit.run import TrainConfig
from wbdit.trainer import train


def describe_machine(device: torch.device | str) -> dict[str, object]:
    """What a timing was measured on: device name, CPU, core and thread counts, library versions."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info: dict[str, object] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
        cpu=cpu,
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    return info


class PeakMemory:
    """Peak memory of one device between ``reset()`` calls, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the allocator's cache).
    CPU: the process's peak resident set size. Linux lets a process reset its peak RSS
    (``VmHWM``, by writing 5 to ``/proc/self/clear_refs``); where that is refused, the
    peak is ``ru_maxrss``, the maximum over the process's whole life, and ``scope`` says
    so: run each measured workload in a fresh process then.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.scope = "since reset"
        self.reset()

    @property
    def kind(self) -> str:
        """What is measured: "cuda max allocated" or "cpu peak rss"."""
        return "cuda max allocated" if self.device.type == "cuda" else "cpu peak rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.scope = "process lifetime"

    def peak(self) -> int:
        """Peak bytes since the last ``reset()`` (or over the process's life, see ``scope``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.scope == "since reset":
            with contextlib.suppress(OSError, StopIteration, ValueError):
                return _proc_status_bytes("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def current(self) -> int:
        """Bytes in use now: allocated tensors (CUDA) or the resident set (CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        with contextlib.suppress(OSError, StopIteration, ValueError):
            return _proc_status_bytes("VmRSS")
        return self.peak()


def _proc_status_bytes(key: str) -> int:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", given in KiB) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def nsys_command(out_dir: str | os.PathLike, program: list[str]) -> str:
    """The Nsight Systems command line that records ``program``'s cudaProfilerStart..Stop window.

    ``-t cuda,nvtx`` traces CUDA API calls, kernels and our NVTX ranges;
    ``--capture-range=cudaProfilerApi`` starts recording at ``cudaProfilerStart`` (after
    the warm-up steps) and ``--capture-range-end=stop`` ends it at ``cudaProfilerStop``.
    """
    report = os.path.join(os.fspath(out_dir), "wbdit-nsys")
    return shlex.join(
        [
            "nsys",
            "profile",
            "-t",
            "cuda,nvtx",
            "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop",
            "-o",
            report,
            "-f",
            "true",
            *program,
        ]
    )


class _StepWindow:
    """Trainer hook: step the torch profiler, bracket the measured steps, time each step.

    Steps 1..warmup warm up; steps warmup+1..warmup+steps are measured. With ``cuda_range``
    the measured window is bracketed by ``torch.cuda.profiler.start()``/``stop()``
    (cudaProfilerStart/Stop), which is what ``nsys --capture-range=cudaProfilerApi`` records.
    """

    def __init__(self, warmup: int, steps: int, prof, cuda_range: bool, device: torch.device):
        self.warmup, self.steps, self.prof, self.cuda_range, self.device = warmup, steps, prof, cuda_range, device
        self.ends: list[float] = []  # wall clock at the end of each step, synchronized

    def on_step_end(self, step: int, loss: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        if self.prof is not None:
            self.prof.step()
        if self.cuda_range and step == self.warmup:
            torch.cuda.profiler.start()
        if self.cuda_range and step == self.warmup + self.steps:
            torch.cuda.profiler.stop()

    def on_epoch_end(self, record: dict) -> None:
        pass

    def step_ms(self) -> list[float]:
        """Wall time of each measured step in milliseconds."""
        window = self.ends[self.warmup - 1 : self.warmup + self.steps]
        return [1e3 * (b - a) for a, b in zip(window, window[1:])]


def profile_training(
    out_dir: str | os.PathLike,
    arch: str = "wbdit",
    fused: bool = True,
    preset: str | None = None,
    n_genes: int = 2000,
    batch_size: int | None = None,
    warmup: int = 3,
    steps: int = 5,
    nsys: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
    row_limit: int = 30,
    model_overrides: dict | None = None,
) -> dict:
    """Profile ``warmup + steps`` steps of ``wbdit.train`` on simulated cells; return a summary.

    The data are ``batch_size * (warmup + steps)`` cells of ``wbdit.datasets.synthetic`` with
    ``n_genes`` genes and 10 cell types (fewer below 100 genes), trained for one epoch, so every step is the real
    trainer's (data loading, bf16 autocast on CUDA, backward, clipping, AdamW, EMA).
    Defaults: the seed configuration (``preset="seed"``) at batch 256 on CUDA, the
    ``"small"`` preset at batch 32 on CPU.

    Writes into ``out_dir``: without ``nsys``, ``trace.json`` (Chrome trace of the measured
    steps; open in chrome://tracing or https://ui.perfetto.dev) and ``top_ops.txt`` (the ops
    with the most self time), and always ``profile.json`` (settings, machine, measured
    milliseconds per step). With ``nsys`` the torch profiler stays off and, on CUDA, the
    measured steps are bracketed by cudaProfilerStart/Stop for ``nsys_command`` (on a CPU
    there is nothing to bracket: the steps just run and are timed).
    """
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup and steps must be >= 1, got {warmup} and {steps}")
    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    preset = preset or ("seed" if cuda else "small")
    batch_size = batch_size or (256 if cuda else 32)
    size = {**PRESETS[preset], **(model_overrides or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # the throwaway checkpoint of the profiled epoch

    n_types = max(1, min(10, n_genes // 10))  # synthetic() gives each type 10 marker genes
    adata = datasets.synthetic(batch_size * (warmup + steps), n_genes, n_types=n_types, seed=seed)
    torch.manual_seed(seed)
    model = build_model(arch, n_genes=n_genes, num_classes=n_types, fused=fused, **size)
    config = TrainConfig(epochs=1, batch_size=batch_size, seed=seed)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    trace = out / "trace.json"
    profiler = (
        contextlib.nullcontext()
        if nsys
        else torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(trace)),
        )
    )
    with profiler as prof:
        window = _StepWindow(warmup, steps, prof, cuda_range=nsys and cuda, device=device)
        train(
            adata,
            model,
            label_key="cell_type",
            out_dir=out / "run",
            config=config,
            device=device,
            progress=False,
            hook=window,
            fused=fused,
        )
    step_ms = window.step_ms()
    summary = dict(
        arch=arch,
        fused=fused,
        preset=preset,
        model=size,
        n_genes=n_genes,
        batch_size=batch_size,
        warmup_steps=warmup,
        measured_steps=steps,
        device=str(device),
        machine=describe_machine(device),
        step_ms=step_ms,
        median_step_ms=sorted(step_ms)[len(step_ms) // 2],
        cells_per_s=batch_size * len(step_ms) / (sum(step_ms) / 1e3),
        implementations=ops.report(),
        files={},
    )
    if not nsys:
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
        header = (
            f"wbdit profile: {arch} fused={fused} preset={preset} {size} genes={n_genes} batch={batch_size}\n"
            f"{summary['machine']['device']}; {steps} measured steps after {warmup} warm-up, "
            f"median {summary['median_step_ms']:.1f} ms/step; sorted by {sort_by}\n\n"
        )
        with atomic_path(out / "top_ops.txt") as tmp:
            Path(tmp).write_text(header + table + "\n")
        summary["files"] = dict(trace=str(trace), top_ops=str(out / "top_ops.txt"))
    shutil.rmtree(out / "run", ignore_errors=True)
    with atomic_path(out / "profile.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary
