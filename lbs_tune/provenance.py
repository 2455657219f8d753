"""Where and with what a run of a sweep ran: the versions of Python and of the libraries that
decide the results (torch, torchvision, Ray, Optuna, CUDA, cuDNN), the CPU, the GPUs and the
host of the driver. The sweep record keeps one per run (lbs_tune.record.record_start); where
each trial ran (host, Ray node, GPU ids, device name) is in its reports.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata
from typing import Any

# The distributions whose versions a run records, by the name it is recorded under.
PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "ray": "ray",
    "optuna": "optuna",
    "pyarrow": "pyarrow",
    "numpy": "numpy",
}


def provenance() -> dict[str, Any]:
    """{python, platform, host, packages: {name: version or None}, cuda, cudnn, cpu:
    {model, cores}, gpus: [{name, memory_bytes}]} of this process and machine. cuda and cudnn
    are the versions torch was built with (None for a CPU build); gpus is [] without CUDA."""
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": {name: _version(dist) for name, dist in PACKAGES.items()},
        **_torch_facts(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_facts() -> dict[str, Any]:
    """CUDA and cuDNN versions and the GPUs, from torch (imported here if it is installed)."""
    try:
        import torch
    except ImportError:
        return {"cuda": None, "cudnn": None, "gpus": []}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory)})
    return {"cuda": torch.version.cuda, "cudnn": cudnn, "gpus": gpus}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's `model name`; elsewhere what platform
    knows, e.g. 'arm' or 'x86_64')."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary_lines(facts: dict[str, Any]) -> list[str]:
    """A run's provenance as short lines for people (the report, `status`): Python and the
    libraries, CUDA/cuDNN, the CPU, the GPUs, the host. Missing facts (a run recorded before
    they were kept) are left out."""
    lines = []
    packages = facts.get("packages") or {}
    libraries = ", ".join(f"{name} {v}" for name, v in packages.items() if v)
    if facts.get("python"):
        lines.append(f"Python {facts['python']}" + (f"; {libraries}" if libraries else ""))
    if "cuda" in facts:
        cuda = facts.get("cuda") or "none (CPU build)"
        lines.append(f"CUDA {cuda}, cuDNN {cudnn_version(facts.get('cudnn'))}")
    cpu = facts.get("cpu") or {}
    if cpu:
        lines.append(f"CPU {cpu.get('model')}, {cpu.get('cores')} cores")
    if "gpus" in facts:
        gpus = facts["gpus"] or []
        names = [f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in gpus]
        lines.append("GPUs " + (", ".join(names) if names else "none"))
    if facts.get("host"):
        lines.append(
            f"host {facts['host']}" + (f" ({facts['platform']})" if facts.get("platform") else "")
        )
    return lines


def cudnn_version(number: int | None) -> str:
    """torch's cuDNN version number as text: 90100 -> '9.1.0' (cuDNN 9 counts minor versions
    by 100), 8902 -> '8.9.2'; 'none' for None."""
    if not number:
        return "none"
    if number >= 10000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"
