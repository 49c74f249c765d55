"""The machine line of every benchmark table: CPU model, cores, torch threads, load, torch version, commit; and
how a table names a run."""
import os
import platform
import subprocess
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what `platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """'<cpu>, N cores visible (shared with other jobs), T torch thread(s), load average L at the end, torch V'."""
    return (f"{cpu_name()}, {os.cpu_count()} cores visible (shared with other jobs), {torch.get_num_threads()} torch "
            f"thread(s), load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}")


def commit() -> str:
    """The short hash of the checked-out commit ('+ changes' when the code differs from it: anything tracked
    but bench/results/)."""
    root = Path(__file__).resolve().parent.parent
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # results files being written by the benchmarks themselves are not a change of the code that measured
    return head + (" + changes" if git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                       ":(exclude)bench/results") else "")


def shown(run: Path) -> Path:
    """A run's path as a table names it: relative to the repository when inside it (runs/tiny, never /home/...)."""
    root = Path(__file__).resolve().parent.parent
    run = Path(run)
    return run.relative_to(root) if run.is_absolute() and run.is_relative_to(root) else run
