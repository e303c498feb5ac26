"""What every benchmark script shares: the description of the machine a result was measured on, and writing the
result (JSON, atomically, so that an interrupted run never leaves half a file in ``benchmarks/results/``).

The scripts import it as ``from _common import ...``: run as ``python benchmarks/<name>.py``, the script's own
folder is first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # `vlp` from the checkout even without an editable install
    sys.path.insert(0, str(ROOT))

__all__ = ["RESULTS", "ROOT", "machine", "write_json"]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def machine(device: str = "cpu") -> dict:
    """Where a figure was measured: OS, CPU, cores, library versions, the load when the benchmark started (these
    machines are shared, and a ratio measured in one run is what survives a busy machine), and the GPU when
    ``device`` is a CUDA device."""
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    for lib in ("transformers", "timm", "lightning"):
        module = sys.modules.get(lib)
        if module is not None:
            info[lib] = module.__version__
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def write_json(path: str | Path, result: dict) -> Path:
    """``result`` as indented JSON at ``path`` (parents created, written atomically), with the 1-minute load
    average at the end beside the one at the start when ``result["machine"]`` has it."""
    from vlp.utils.io import atomic_write_text

    if "loadavg_1m_at_start" in result.get("machine", {}):
        result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    path = Path(path)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path
