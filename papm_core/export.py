"""Export a papm checkpoint (base or device model) to ONNX for an edge runtime, checked
against PyTorch on real images before the file appears.

The graph takes normalised float32 images [batch, 3, 32, 32] (``loader.normalize``: the
mean and std ride in the file's metadata, with the class names and the papm spec) and
returns logits [batch, num_classes]; the batch dimension is dynamic. The parity check runs
both models on ``images`` real images spread evenly over the classes (training images:
parity is not an accuracy figure, so no evaluation split is spent on it) and refuses a file
whose logits differ by more than ``tolerance`` anywhere; nothing is written then.

Needs the ``edge`` extra (``pip install -e ".[edge]"``: onnx, onnxscript, onnxruntime).

Example: ``papm export checkpoints/pruned_class3-5_th77.pt --format onnx --out device.onnx``
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import load_dataset, subsample
from .loader import MEAN, STD, normalize
from .util import PapmError, atomic_write

TOLERANCE = 1e-3  # max |logit difference| against PyTorch (fp32 on CPU: about 1e-5 in practice)


def _runtime():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise PapmError(f"papm export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                        "pip install -e '.[edge]'") from None
    return onnx, onnxruntime


def parity_images(data: str | None, n: int) -> torch.Tensor:
    """``n`` real training images, spread evenly over the classes, normalised."""
    ds = load_dataset(data)
    x = subsample(ds.train, math.ceil(n / len(ds.classes)), seed=0).x[:n]
    return normalize(x)


def _write(model: torch.nn.Module, meta: dict, path: Path) -> None:
    onnx, _ = _runtime()
    x = torch.zeros(2, 3, 32, 32)
    prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    prog.save(str(path))
    proto = onnx.load(str(path))
    for key, value in {"papm_spec": json.dumps(meta.get("spec")), "class_names": json.dumps(meta.get("class_names")),
                       "input_mean_255": json.dumps([m * 255 for m in MEAN]),
                       "input_std_255": json.dumps([s * 255 for s in STD])}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def parity(path: Path, model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Max |Δ logit| and top-1 agreement (%) of the ONNX file against the PyTorch model on ``x``."""
    _, ort = _runtime()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"images": x[i:i + 256].numpy()})[0] for i in range(0, len(x), 256)])
    with torch.no_grad():
        want = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()
    return {"max_abs_logit_diff": float(np.abs(got - want).max()),
            "top1_agreement": 100.0 * float((got.argmax(1) == want.argmax(1)).mean()), "images": len(x)}


def export_onnx(ckpt: str | Path, out: str | Path, data: str | None = None, images: int = 512,
                tolerance: float = TOLERANCE) -> dict:
    """Write ``out`` (ONNX, fp32) from checkpoint ``ckpt`` if it matches PyTorch within
    ``tolerance`` on ``images`` real images; returns the parity figures and the file size."""
    model, meta = checkpoint.load(ckpt, "cpu")
    model = model.float().eval()
    x = parity_images(data, images)
    result: dict = {}

    def write(tmp: Path) -> None:
        scratch = tmp.with_name(tmp.name + ".d")  # the exporter's own side files stay out of out's folder
        scratch.mkdir()
        try:
            _write(model, meta, scratch / "model.onnx")
            result.update(parity(scratch / "model.onnx", model, x))
            if not result["max_abs_logit_diff"] <= tolerance:
                raise PapmError(f"{ckpt}: ONNX logits differ from PyTorch by {result['max_abs_logit_diff']:.2e} "
                                f"(> {tolerance:g}) on {len(x)} images; nothing written")
            shutil.copyfile(scratch / "model.onnx", tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    path = atomic_write(Path(out), write)
    return {**result, "path": str(path), "mb": path.stat().st_size / 2 ** 20}
