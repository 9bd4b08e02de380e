"""What `torch.compile` would buy a non-private step of the dpdm cpu U-Net (issue 21's "Compile" item).

A ceiling, not an engine change: the eager and the compiled (inductor) forward + backward of the dpdm ``cpu``
preset's U-Net with the EDM loss on one physical chunk, interleaved, medians. The DP engine's book-keeping
clipping takes gradients with respect to layer outputs through module hooks, which one compiled region hides
from autograd, so the DP step itself is not compiled here. ``first_compiled_call_s`` includes compilation: about
a minute with a cold inductor cache, seconds with a warm one.

    python benchmarks/compile_step.py [--threads 1,2] [--batch 512] [--repeats 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from dpsgd_overhead import _edm_case, interleaved_medians

from dpimages.allocator import keep_freed_memory

RESULTS = Path(__file__).parent / "results" / "compile_step.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, one row each")
    ap.add_argument("--batch", type=int, default=512, help="one physical chunk of the dpdm cpu preset")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    keep_freed_memory()  # as `fit_run` does: without it every step page-faults its large tensors back in
    rows = [measure(int(t), args.batch, args.repeats) for t in args.threads.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


def measure(threads: int, batch_size: int, repeats: int) -> dict:
    """Eager against compiled forward + backward at `threads` torch threads: medians of `repeats` interleaved."""
    torch.set_num_threads(threads)
    make, loss_fn, batch, _ = _edm_case({}, batch_size, torch.Generator().manual_seed(0), k=1)
    eager, compiled = make(), make()
    compiled_call = torch.compile(compiled)

    def step(model: torch.nn.Module, call: object) -> object:
        def run() -> None:
            loss_fn(call, *batch).sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    steps = {"eager": step(eager, eager), "compiled": step(compiled, compiled_call)}
    t0 = time.perf_counter()
    steps["compiled"]()
    compile_s = time.perf_counter() - t0
    med = interleaved_medians(steps, repeats, warmup=1)
    row = {"model": "dpdm cpu U-Net, EDM loss, K 1", "batch": batch_size, "threads": threads,
           "eager_s": round(med["eager"], 4), "compiled_s": round(med["compiled"], 4),
           "speed_up": round(med["eager"] / med["compiled"], 3), "first_compiled_call_s": round(compile_s, 1),
           "repeats": repeats, "torch": torch.__version__,
           "machine": f"{os.cpu_count()}-core {platform.machine()} CPU", "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
