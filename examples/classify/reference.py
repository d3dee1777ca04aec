"""Host-side reference for the classify demo: the same pipeline as the guest, in numpy.

    python reference.py MODEL.onnx IMAGE.ppm LABELS.txt

Prints the top-5 classes as ``RANK: LABEL (class IDX, p=0.1234)``, the same
format as ``guests/classify.c``. The guest normalizes pixels in C exactly as
:func:`preprocess` does here; tests compare its top-5 classes with :func:`top5`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def read_ppm(path: str | Path) -> np.ndarray:
    """Read a binary PPM (P6, maxval 255) into a uint8 HWC array; comments are allowed."""
    data = Path(path).read_bytes()
    fields: list[bytes] = []
    pos = 0
    # Header: magic, width, height, maxval; whitespace-separated, '#' starts a comment.
    while len(fields) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if pos >= len(data):
            raise ValueError(f"{path}: truncated PPM header")
        if data[pos : pos + 1] == b"#":
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace() and data[pos : pos + 1] != b"#":
            pos += 1
        fields.append(data[start:pos])
    if fields[0] != b"P6":
        raise ValueError(f"{path}: not a binary PPM (P6)")
    try:
        width, height, maxval = (int(f) for f in fields[1:])
    except ValueError:
        raise ValueError(f"{path}: malformed PPM header") from None
    if maxval != 255:
        raise ValueError(f"{path}: maxval {maxval}, expected 255")
    pos += 1  # exactly one whitespace byte separates the header from the pixels
    size = width * height * 3
    if len(data) - pos < size:
        raise ValueError(f"{path}: truncated pixel data")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=pos).reshape(height, width, 3)


def preprocess(ppm_path: str | Path) -> np.ndarray:
    """PPM -> float32 [1, 3, H, W]: (pixel / 255 - mean) / std per channel, HWC -> CHW."""
    pixels = read_ppm(ppm_path).astype(np.float32) / np.float32(255.0)
    normalized = (pixels - MEAN) / STD
    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def load_labels(path: str | Path) -> list[str]:
    """One label per line, in class-index order."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


def top5(model_path: str | Path, ppm_path: str | Path, labels: list[str]) -> list[tuple[int, float, str]]:
    """Run the model on the image with onnxruntime (CPU); return (class, probability, label) x 5."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: preprocess(ppm_path)})
    probs = softmax(np.asarray(logits).reshape(-1))
    best = np.argsort(-probs, kind="stable")[:5]
    return [(int(i), float(probs[i]), labels[i] if i < len(labels) else "?") for i in best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX model, input [1,3,224,224], output [1,1000] logits")
    parser.add_argument("image", help="binary PPM (P6, maxval 255), 224x224")
    parser.add_argument("labels", help="labels file, one per line")
    args = parser.parse_args(argv)
    for rank, (idx, prob, label) in enumerate(top5(args.model, args.image, load_labels(args.labels)), 1):
        print(f"{rank}: {label} (class {idx}, p={prob:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
