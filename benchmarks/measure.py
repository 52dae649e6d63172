"""Shared by the benchmarks that race bincount against a peer command: interleaved runs (A B A B ...,
so drift in the machine's load hits both), each a child process measured for wall time, peak RSS and
CPU seconds, with the load it ran under printed beside it.

A row is comparable only when the 1-minute load average at the start of each of its runs was at most
one runnable process per core (the benchmark's own earlier runs count too, which can only err towards
"not comparable"); "others" is the CPU the rest of the machine used during the runs (all CPU time in
/proc/stat minus this benchmark's: the child, the S3 server and this process), in cores.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def cores() -> int:
    return os.cpu_count() or 1


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine() -> str:
    """CPU model, native bfloat16 or not, core count and load averages: the context every number here needs."""
    loads = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu_name()} ({'with' if bf16() else 'without'} native bfloat16), {cores()} cores, "
            f"load average {loads}")


def _busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat), or nan."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process, or 0 when it cannot be read."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def _peak_rss_mib(pid: int) -> float:
    """The peak RSS (VmHWM) of a running process so far, sampled while it runs; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


@dataclass
class Run:
    seconds: float
    rss_mib: float
    cpu_s: float
    load: float  # 1-minute load average at the start
    others: float  # cores the rest of the machine kept busy during the run
    stdout: str = ""


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None, server_pid: int | None = None) -> Run:
    """Run a command as a child; its wall time, peak RSS (VmHWM sampled every 10 ms), CPU and the load around it."""
    cwd.mkdir(parents=True, exist_ok=True)
    out, err = cwd / ".stdout", cwd / ".stderr"
    load_at = load()
    busy, own = _busy_seconds(), time.process_time()
    server = process_cpu(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    with out.open("wb") as fo, err.open("wb") as fe:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        peak = 0.0
        while True:  # ru_maxrss would count this process's memory too (Linux keeps it across fork + exec)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _peak_rss_mib(child.pid))
            time.sleep(0.01)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    ours = cpu + (time.process_time() - own) + ((process_cpu(server_pid) - server) if server_pid else 0.0)
    others = max(0.0, (_busy_seconds() - busy - ours) / seconds)
    text = out.read_text(errors="replace")
    if child.returncode != 0:
        tail = err.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(command[0]).name} exited {child.returncode}: {' / '.join(tail)}")
    out.unlink()
    err.unlink()
    return Run(seconds, peak or usage.ru_maxrss / 1024, cpu, load_at, others, text)


@dataclass
class Series:
    """The runs of one contestant."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def load(self) -> float:
        return max(r.load for r in self.runs)

    @property
    def others(self) -> float:
        return statistics.mean(r.others for r in self.runs)

    @property
    def rss_mib(self) -> float:
        return max(r.rss_mib for r in self.runs)

    def cpu_ms(self, units: int) -> float:
        """Median CPU milliseconds per unit of work (object, label): what the command costs, whatever the load."""
        return statistics.median(r.cpu_s for r in self.runs) / units * 1000

    def times(self) -> str:
        return ", ".join(f"{r.seconds:.2f}" for r in self.runs)


def interleave(contestants: dict[str, callable], repeat: int, once: tuple[str, ...] = ()) -> dict[str, Series]:
    """Call each contestant(round) -> Run in turn, `repeat` rounds (A B A B ...); those in `once` only in round 0."""
    series = {name: Series(name) for name in contestants}
    for number in range(repeat):
        for name, fn in contestants.items():
            if number == 0 or name not in once:
                series[name].runs.append(fn(number))
    return series


def comparable(*series: Series) -> bool:
    """True when every run of these series started at a load average of at most one per core."""
    return all(s.load <= cores() for s in series)


def load_note(*series: Series) -> str:
    worst = max(s.load for s in series)
    others = max(s.others for s in series)
    verdict = "" if worst <= cores() else f", above {cores()} cores: not comparable"
    return f"load {worst:.1f} (others {others:.1f} cores{verdict})"
