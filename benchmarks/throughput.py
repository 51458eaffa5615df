"""Training throughput (images/s) of the base model on this machine.

Times full SGD steps (forward, backward, optimizer) of the project's own training
loop pieces at batch 256 for each width and precision (fp32, and bf16 autocast as the
training loops run it: ``papm_core.util.autocast``), with and without channels_last
memory layout. Prints the CPU's native-bf16 flags (AMX, AVX512-BF16) with the figures:
``--precision auto`` picks bf16 where they exist.

Example: ``python benchmarks/throughput.py --widths 1.0 0.25 --steps 6 --precisions fp32 bf16``
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from papm_core.loader import augment, normalize
from papm_core.models import build_model, resnet18_spec
from papm_core.util import autocast, provenance, resolve_device, resolve_precision


def cpu_flags() -> str:
    """The CPU's native bf16 support as torch sees it."""
    have = [n for probe, n in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
            if getattr(torch.cpu, probe, lambda: False)()]
    return ", ".join(have) or "no native bf16 (no AMX, no AVX512-BF16)"


def step_rate(width: float, batch: int, steps: int, channels_last: bool, device, precision: str) -> float:
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
        with autocast(device, precision):
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
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--layouts", nargs="+", default=["channels_last", "contiguous"],
                    choices=["channels_last", "contiguous"])
    args = ap.parse_args()
    dev = resolve_device(args.device)
    print(f"{dev}: {cpu_flags() if dev.type == 'cpu' else 'CUDA'}; --precision auto resolves to "
          f"{' '.join(resolve_precision(dev))}; {torch.get_num_threads()} threads", flush=True)
    rows = []
    for w in args.widths:
        for prec in args.precisions:
            for layout in args.layouts:
                ips = step_rate(w, args.batch_size, args.steps, layout == "channels_last", dev, prec)
                rows.append({"width": w, "precision": prec, "layout": layout, "images_per_s": round(ips, 1)})
                print(f"width {w:<5} {prec:<5} {layout:<13} {ips:8.1f} img/s (batch {args.batch_size})", flush=True)
    print(json.dumps({"rows": rows, "cpu": cpu_flags(), "provenance": provenance()}, indent=1))


if __name__ == "__main__":
    main()
