"""Export a papm checkpoint (base or device model) to ONNX for an edge runtime, fp32 or
int8, checked against PyTorch on real images before the file appears; time ONNX files.

The graph takes normalised float32 images [batch, 3, 32, 32] (``loader.normalize``: the
mean and std ride in the file's metadata, with the class names, the served classes and
the papm spec) and returns two outputs: ``logits`` [batch, num_classes] and ``embedding``
(``embedding.device_embedding``: what a device uploads to the fusion head); the batch
dimension is dynamic.

- fp32: both outputs are compared with PyTorch on ``images`` real training images spread
  over the classes (parity is not an accuracy figure, so no evaluation split is spent on
  it); a file whose logits differ by more than ``tolerance`` anywhere is refused.
- int8 (``int8=True``): onnxruntime's static quantisation (QDQ, per-channel int8 weights,
  uint8 activations, min-max calibration) of that checked fp32 graph, calibrated on
  ``calib_images`` training images of the classes the model serves (a device knows only
  its own data). Its top-1 agreement with fp32 and its accuracy change on the model's
  classes and on all classes are measured on the base model's validation split, the
  split whose job is deciding, here whether the int8 runtime is good enough.

Nothing is written when a check fails. Needs the ``edge`` extra (``pip install -e
".[edge]"``: onnx, onnxscript, onnxruntime).

Example: ``papm export checkpoints/pruned_class3-5_th77.pt --format onnx --int8 --out device.int8.onnx``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .data import Split, load_dataset, spread
from .evaluate import quietest_median_ms
from .loader import MEAN, STD, normalize
from .util import PapmError, atomic_write

TOLERANCE = 1e-3  # max |logit difference| against PyTorch (fp32 on CPU: about 1e-5 in practice)
BATCH = 256       # images per onnxruntime call when scoring a split
CALIB_IMAGES = 256  # int8 calibration: training images of the model's own classes


def _runtime():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise PapmError(f"papm export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                        "pip install -e '.[edge]'") from None
    return onnx, onnxruntime


class Exported(nn.Module):
    """What an edge device runs: its logits, and the embedding it uploads to the head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        logits = self.model.get_classifier()(f)
        return logits, torch.cat([f, F.log_softmax(logits, 1)], 1)


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session on ``threads`` intra-op threads (default: torch's count,
    so both runtimes are timed on the same cores)."""
    _, ort = _runtime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # a damaged or foreign file: one line, not onnxruntime's trace
        raise PapmError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:120]})") from None


def run(sess, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) of normalised images ``x``, in batches of BATCH."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    outs = [sess.run(["logits", "embedding"], {"images": x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def metadata(path: str | Path) -> dict:
    """The papm metadata an exported file carries (class names, served classes, spec, ...)."""
    onnx, _ = _runtime()
    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
    except Exception as e:
        raise PapmError(f"{path} is not a readable ONNX file ({str(e).strip().splitlines()[0][:120]})") from None
    meta = {p.key: json.loads(p.value) for p in props if p.key.startswith(("papm_", "class", "served", "input_"))}
    if "class_names" not in meta:
        raise PapmError(f"{path} was not written by papm export (no class names in its metadata)")
    return meta


def _tag(path: Path, meta: dict, precision: str) -> None:
    onnx, _ = _runtime()
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    served = meta.get("served_classes") or meta.get("classes")
    for key, value in {"papm_spec": meta.get("spec"), "class_names": meta.get("class_names"),
                       "classes": meta.get("classes"), "served_classes": served, "papm_precision": precision,
                       "input_mean_255": [m * 255 for m in MEAN], "input_std_255": [s * 255 for s in STD]}.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(path))


def _graph(model: nn.Module, path: Path) -> None:
    _runtime()
    x = torch.zeros(2, 3, 32, 32)
    prog = torch.onnx.export(Exported(model).eval(), (x,), dynamo=True, input_names=["images"],
                             output_names=["logits", "embedding"],
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    prog.save(str(path))


def _write(model: nn.Module, meta: dict, path: Path) -> None:
    _graph(model, path)
    _tag(path, meta, "fp32")


def parity_images(data: str | None, n: int) -> torch.Tensor:
    """``n`` real training images, spread evenly over the classes, normalised."""
    ds = load_dataset(data)
    x = spread(ds.train, n, len(ds.classes)).x
    return normalize(x)


def parity(path: Path, model: nn.Module, x: torch.Tensor) -> dict:
    """Max |Δ| of both outputs and top-1 agreement (%) of the ONNX file against PyTorch on ``x``."""
    got, got_e = run(session(path), x)
    with torch.no_grad():
        want, want_e = (torch.cat(t).numpy() for t in zip(*(Exported(model)(x[i:i + BATCH])
                                                             for i in range(0, len(x), BATCH))))
    return {"max_abs_logit_diff": float(np.abs(got - want).max()),
            "max_abs_embedding_diff": float(np.abs(got_e - want_e).max()),
            "top1_agreement": 100.0 * float((got.argmax(1) == want.argmax(1)).mean()), "images": len(x)}


def _reader(x: np.ndarray, batch: int = 32):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([x[i:i + batch] for i in range(0, len(x), batch)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"images": b}

    return Reader()


def quantize(fp32: Path, out: Path, calib: np.ndarray) -> None:
    """Static int8 quantisation of ``fp32`` into ``out``, calibrated on images ``calib``."""
    _runtime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = fp32.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre))  # shape inference and folding, as onnxruntime advises
    quantize_static(str(pre), str(out), _reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def _splits(meta: dict, data: str | None) -> tuple[Split, Split, list[int]]:
    """(training images of the model's served classes, validation split, served classes),
    labels local to the model's output classes, carved exactly as the model's stages did."""
    from .specialize import base_split, reference_splits

    ds = load_dataset(data)
    if meta.get("class_names") != ds.classes:
        raise PapmError(f"the checkpoint's classes {meta.get('class_names')} differ from the data's "
                        f"{ds.classes}; give the data it was trained on (--data)")
    split = (meta.get("base") or {}).get("split") or base_split(meta)
    c = reference_splits(ds, split)
    classes = meta.get("classes") or list(range(len(ds.classes)))
    served = meta.get("served_classes") or classes
    private, val = c.private, c.val
    if len(classes) < len(ds.classes):  # a model of a class subset: its labels are local
        private, val = private.shard(classes, remap=True), val.shard(classes, remap=True)
    local = [classes.index(k) for k in served]
    return private.shard(local), val, local


def int8_check(fp32: Path, int8: Path, val: Split, served: list[int]) -> dict:
    """Top-1 agreement (%) of int8 with fp32, and both accuracies (%) on all of ``val`` and
    on its images of the ``served`` classes."""
    x, y = normalize(val.x).numpy(), val.y.numpy()
    a, b = run(session(fp32), x)[0].argmax(1), run(session(int8), x)[0].argmax(1)
    own = np.isin(y, served)
    acc = lambda p, m: 100.0 * float((p[m] == y[m]).mean()) if m.any() else float("nan")  # noqa: E731
    every = np.ones(len(y), dtype=bool)
    return {"images": len(y), "own_images": int(own.sum()), "top1_agreement": 100.0 * float((a == b).mean()),
            "fp32_val_acc": acc(a, every), "int8_val_acc": acc(b, every),
            "fp32_own_val_acc": acc(a, own), "int8_own_val_acc": acc(b, own)}


def export_onnx(ckpt: str | Path, out: str | Path, data: str | None = None, images: int = 512,
                tolerance: float = TOLERANCE, int8: bool = False, calib_images: int = CALIB_IMAGES) -> dict:
    """Write ``out`` (ONNX; int8 if ``int8``) from checkpoint ``ckpt`` once its fp32 graph
    matches PyTorch within ``tolerance`` on ``images`` real images; returns the parity
    figures, the int8 figures (``int8``) and the file size."""
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
            final = scratch / "model.onnx"
            if int8:
                calib, val, served = _splits(meta, data)
                calib = spread(calib, calib_images, len(served))
                quantize(final, scratch / "int8.onnx", normalize(calib.x).numpy())
                _tag(scratch / "int8.onnx", meta, "int8")
                result["int8"] = {"calib_images": len(calib),
                                  **int8_check(final, scratch / "int8.onnx", val, served)}
                final = scratch / "int8.onnx"
            shutil.copyfile(final, tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    path = atomic_write(Path(out), write)
    return {**result, "path": str(path), "mb": path.stat().st_size / 2 ** 20}


def onnx_latency_ms(path: str | Path, runs: int = 200, warmup: int = 20, blocks: int = 5) -> dict:
    """Batch-1 time of an ONNX file in onnxruntime, by the method PyTorch models are timed
    with (``evaluate.quietest_median_ms``), on torch's thread count."""
    sess = session(path)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {"images": x})
    return {**quietest_median_ms(lambda: sess.run(None, {"images": x}), runs, blocks),
            "device": "cpu (onnxruntime)", "threads": torch.get_num_threads()}


def _exported(model: nn.Module, int8: bool, calib: torch.Tensor | None, use) -> object:
    """``use(path)`` on ``model`` exported to a scratch ONNX file (int8 calibrated on
    normalised images ``calib`` if ``int8``), removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        _graph(model, path)
        if int8:
            quantize(path, Path(d) / "int8.onnx", calib.float().numpy())
            path = Path(d) / "int8.onnx"
        return use(path)


def candidate_latency_ms(model: nn.Module, int8: bool, calib: torch.Tensor, runs: int = 200) -> list[float]:
    """Two batch-1 timings (ms, fresh sessions) of ``model`` in onnxruntime (int8 if
    ``int8``): the latency search's candidates."""
    return _exported(model, int8, calib, lambda p: [onnx_latency_ms(p, runs)["median_ms"] for _ in range(2)])


def runtime_latency_ms(model: nn.Module, runtime: str, calib: torch.Tensor | None, runs: int = 200) -> dict:
    """The report's batch-1 timing of ``model`` in ``runtime`` (``onnxruntime`` or
    ``onnxruntime-int8``, calibrated on ``calib``): what the evaluate round reports."""
    return {**_exported(model, runtime == "onnxruntime-int8", calib, lambda p: onnx_latency_ms(p, runs)),
            "runtime": runtime}


def evaluate_onnx(path: str | Path, data: str | None = None, runs: int = 200, batch_size: int = 256) -> dict:
    """``papm eval FILE.onnx``: test accuracy (per class), size, batch-1 latency and
    throughput of an exported file in onnxruntime, the figures ``papm eval`` gives a checkpoint."""
    import time

    meta = metadata(path)
    ds = load_dataset(data)
    classes = meta.get("classes") or list(range(len(meta["class_names"])))
    if meta["class_names"] != ds.classes:
        raise PapmError(f"{path}: its classes {meta['class_names']} differ from the data's {ds.classes}; "
                        "evaluate it on the data it was trained for")
    test = ds.test if len(classes) == len(ds.classes) else ds.test.shard(classes, remap=True)
    sess = session(path)
    pred = run(sess, normalize(test.x))[0].argmax(1)
    y = test.y.numpy()
    per = {ds.classes[c]: 100.0 * float((pred[y == i] == i).mean()) for i, c in enumerate(classes) if (y == i).any()}
    xb = np.random.default_rng(0).standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    sess.run(None, {"images": xb})
    t0 = time.perf_counter()
    for _ in range(5):  # as evaluate.throughput
        sess.run(None, {"images": xb})
    thr = {"images_per_s": 5 * batch_size / (time.perf_counter() - t0), "batch_size": batch_size}
    return {"onnx": str(path), "precision": meta.get("papm_precision", "fp32"), "classes": classes,
            "served_classes": meta.get("served_classes"), "test_acc": 100.0 * float((pred == y).mean()),
            "test_per_class": per, "test_images": len(y), "file_mb": Path(path).stat().st_size / 2 ** 20,
            "latency": onnx_latency_ms(path, runs), "throughput": thr}
