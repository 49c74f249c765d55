"""The machine line of every benchmark table: CPU model, cores, torch threads, load, torch version."""
import os
import platform
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
