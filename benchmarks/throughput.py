"""Training throughput (images/s) of the base model on this machine.

Times full SGD steps (forward, backward, optimizer) of the project's own training
loop pieces at batch 256 for each width, fp32 on CPU (bf16 autocast on CUDA), with
and without channels_last memory layout.

Example: ``python benchmarks/throughput.py --widths 1.0 0.25 --steps 6``
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from papm_core.loader import augment, normalize
from papm_core.models import build_model, resnet18_spec
from papm_core.util import provenance, resolve_device


def step_rate(width: float, batch: int, steps: int, channels_last: bool, device) -> float:
    torch.manual_seed(0)
    model = build_model(resnet18_spec(width)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x8 = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    gen = torch.Generator().manual_seed(0)

    def one():
        x = normalize(augment(x8, gen), channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    rows = []
    for w in args.widths:
        for cl in (True, False):
            ips = step_rate(w, args.batch_size, args.steps, cl, dev)
            rows.append({"width": w, "channels_last": cl, "images_per_s": round(ips, 1)})
            print(f"width {w:<5} channels_last={cl!s:<5} {ips:8.1f} img/s (batch {args.batch_size}, "
                  f"{dev}, {torch.get_num_threads()} threads)", flush=True)
    print(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))


if __name__ == "__main__":
    main()
