"""GPU check of the sharing policy's mechanics (run by hand on a GPU box; not collected by pytest).

    PYTHONPATH=shared python tests/gpu_sharing_check.py

Two processes share GPU 0 with budgets (0.30 and 0.20 of the card, as ``dreamframe up`` gives them
through models.gpu_memory_fraction): each allocates within its budget; the first then asks for more than
its budget and gets RESOURCE_EXHAUSTED naming the setting, while the second keeps allocating. Then a
ModelHolder with idle release drops a 20 GiB "model" and gives the memory back to the device.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

GIB = 1024**3


def worker(fraction: float, over: bool) -> None:
    import torch

    from dreamframe.errors import ResourceExhausted
    from dreamframe.models import device as gpu

    dev = torch.device("cuda", 0)
    gpu.apply_memory_budget(fraction, dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    out: dict = {"fraction": fraction, "budget_gib": round(fraction * total / GIB, 1)}
    within = torch.empty(int(fraction * total * 0.8), dtype=torch.uint8, device=dev)
    out["allocated_within_gib"] = round(within.numel() / GIB, 1)
    out["free_within_budget_gib"] = round(gpu.free_memory(dev) / GIB, 1)
    time.sleep(2)  # both processes hold their share at once
    if over:
        try:
            with gpu.over_budget_errors("keyframe-renderer"):
                torch.empty(int(fraction * total * 0.5), dtype=torch.uint8, device=dev)
            out["over"] = "allocated (budget not enforced!)"
        except ResourceExhausted as exc:
            out["over"] = f"RESOURCE_EXHAUSTED field={exc.field}: {exc.message[:160]}"
    else:
        time.sleep(1)
        more = torch.empty(int(fraction * total * 0.1), dtype=torch.uint8, device=dev)
        out["neighbour_still_allocates_gib"] = round(more.numel() / GIB, 1)
    print(json.dumps(out))


def holder_check() -> None:
    import torch

    from dreamframe.models.holder import ModelHolder

    dev = torch.device("cuda", 0)

    def load(key: str) -> torch.nn.Module:
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(torch.empty(20 * GIB // 2, dtype=torch.bfloat16, device=dev))
        return module

    holder = ModelHolder(load, name="check", idle_release_s=1.0)
    with holder.use("big"):
        loaded = torch.cuda.memory_reserved(dev) / GIB
    free_loaded = torch.cuda.mem_get_info(dev)[0] / GIB
    deadline = time.monotonic() + 10
    while holder.loaded() and time.monotonic() < deadline:
        time.sleep(0.1)
    released = torch.cuda.memory_reserved(dev) / GIB
    free_released = torch.cuda.mem_get_info(dev)[0] / GIB
    with holder.use("big"):
        reloaded = torch.cuda.memory_reserved(dev) / GIB
    print(
        json.dumps(
            {
                "reserved_loaded_gib": round(loaded, 1),
                "device_free_loaded_gib": round(free_loaded, 1),
                "reserved_after_idle_release_gib": round(released, 2),
                "device_free_after_release_gib": round(free_released, 1),
                "reserved_after_reload_gib": round(reloaded, 1),
                "loads": holder.loads,
                "releases": holder.releases,
            }
        )
    )
    holder.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(float(sys.argv[2]), sys.argv[3] == "over")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "holder":
        holder_check()
        return
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    print("gpu:", smi.stdout.strip())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", "0.30", "over"], stdout=subprocess.PIPE, text=True
        ),
        subprocess.Popen(
            [sys.executable, __file__, "worker", "0.20", "stay"], stdout=subprocess.PIPE, text=True
        ),
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        print("process:", out.strip(), "rc", p.returncode)
    done = subprocess.run([sys.executable, __file__, "holder"], capture_output=True, text=True, timeout=300)
    print("holder:", done.stdout.strip(), done.stderr.strip()[-2000:])


if __name__ == "__main__":
    main()
