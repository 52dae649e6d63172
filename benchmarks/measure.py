"""Shared by the benchmarks that race bincount against a peer command: interleaved runs (A B A B ...,
so drift in the machine's load hits both), each a child process measured for wall time, peak RSS and
CPU seconds, with the load it ran under printed beside it.

What judges a row is the load the rest of the machine put on it: "others" is the mean number of runnable
tasks (threads in state R, /proc/<pid>/task/<tid>/stat, sampled every 100 ms) of every process that is not
the benchmark's own (this process, the child it measures, the S3 server). A row is comparable only when
others stayed at most one per core in every run. The
1-minute load average is printed too, but it counts the benchmark's own server and clients (and lags a
minute behind): on 2 cores an idle machine showed 2.6 from the benchmark alone. `busy(n)` runs n
busy-looping processes beside a benchmark: the "under load" rows (a busy laptop: half its cores taken).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def others_running(own: set[int]) -> int:
    """Runnable tasks (threads) now of every process outside `own` and their descendants (the benchmark's:
    the child it measures and what that starts, the S3 server), and outside this process (but not its other
    children: the busy processes of busy() are the load), from /proc."""
    return count_others(processes(), own, os.getpid())


def processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, threads running or runnable now)} of every process, from /proc."""
    found: dict[int, tuple[int, int]] = {}
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                parent = int(fh.read().rsplit(b")", 1)[1].split()[1])
            running = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
                    running += fh.read().rsplit(b")", 1)[1][1:2] == b"R"
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found[pid] = (parent, running)
    return found


def count_others(found: dict[int, tuple[int, int]], own: set[int], me: int) -> int:
    """The running threads in `found` outside `me` and outside `own` with all their descendants (busy()'s
    spinners are never own, even as children of `me`)."""
    mine = set(own) - {me} - SPINNERS
    grew = True  # add the descendants of `own`, a generation at a time
    while grew:
        joined = {pid for pid, (parent, _) in found.items() if parent in mine and pid not in mine}
        mine |= joined
        grew = bool(joined)
    return sum(running for pid, (_, running) in found.items() if pid not in mine and pid != me)


class Others:
    """The mean number of runnable tasks of the rest of the machine while something runs: sample() at
    most every `every` seconds (reading /proc costs ~1-3 ms of this process's CPU each time)."""

    def __init__(self, own: Callable[[], set[int]], every: float = 0.1):
        self.own, self.every, self.last, self.total, self.samples = own, every, float("-inf"), 0, 0

    def sample(self, force: bool = False) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and not force:
            return
        self.last = now
        self.total += others_running(self.own())
        self.samples += 1

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else 0.0


@contextmanager
def watching(own: Callable[[], set[int]]) -> Iterator[Others]:
    """Sample the rest of the machine from a thread while the block runs (for in-process work)."""
    others, done = Others(own), threading.Event()

    def loop() -> None:
        while not done.wait(others.every):
            others.sample()

    thread = threading.Thread(target=loop, daemon=True)
    others.sample()
    thread.start()
    try:
        yield others
    finally:
        done.set()
        thread.join()
        others.sample(force=True)  # a short block gets its end seen too


@dataclass
class Run:
    seconds: float
    rss_mib: float
    cpu_s: float
    load: float  # 1-minute load average at the start (the benchmark's own processes included)
    others: float  # runnable tasks of the rest of the machine during the run, on average
    stdout: str = ""


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None, server_pid: int | None = None) -> Run:
    """Run a command as a child; its wall time, peak RSS (VmHWM sampled every 10 ms), CPU and the load around it."""
    cwd.mkdir(parents=True, exist_ok=True)
    out, err = cwd / ".stdout", cwd / ".stderr"
    load_at = load()
    start = time.perf_counter()
    with out.open("wb") as fo, err.open("wb") as fe:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        own = {os.getpid(), child.pid} | ({server_pid} if server_pid else set())
        others = Others(lambda: own)
        peak = 0.0
        while True:  # ru_maxrss would count this process's memory too (Linux keeps it across fork + exec)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _peak_rss_mib(child.pid))  # and the rest of the machine, every 100 ms
            others.sample()
            time.sleep(0.01)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    text = out.read_text(errors="replace")
    if child.returncode != 0:
        tail = err.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(command[0]).name} exited {child.returncode}: {' / '.join(tail)}")
    out.unlink()
    err.unlink()
    return Run(seconds, peak or usage.ru_maxrss / 1024, cpu, load_at, others.mean, text)


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
        return max(r.others for r in self.runs)

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


def calm(others: float) -> bool:
    """The rule every goal row is judged by: the rest of the machine kept at most one task per core runnable."""
    return others <= cores()


def comparable(*series: Series) -> bool:
    """True when every run of these series was calm (see `calm`)."""
    return all(calm(s.others) for s in series)


def load_note(*series: Series) -> str:
    worst = max(s.load for s in series)
    others = max(s.others for s in series)
    verdict = "" if calm(others) else f", above one per core ({cores()} cores): not comparable"
    return f"others {others:.1f} runnable (load average {worst:.1f}, the benchmark's own included{verdict})"


SPINNERS: set[int] = set()  # the pids busy() runs now: the load, never the benchmark's own


@contextmanager
def busy(n: int) -> Iterator[None]:
    """n processes spinning on a core each while the block runs: a machine under load (0: nothing)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
                for _ in range(n)]
    SPINNERS.update(s.pid for s in spinners)
    try:
        if spinners:
            time.sleep(0.5)  # all of them running before the first measurement
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
            SPINNERS.discard(spinner.pid)


def conditions(loaded: int | None = None) -> dict[str, int]:
    """The machine states every goal row is measured in (name: busy processes): idle, and busy with half the
    cores taken (`loaded` busy processes where given; 0 leaves the under-load rows out)."""
    spinners = loaded if loaded is not None else max(1, cores() // 2)
    return {"idle": 0, **({"under load": spinners} if spinners else {})}
