"""The real pretrained classifier end to end: the guest's top-5 equals onnxruntime's."""

from __future__ import annotations

import re
from pathlib import Path

import onnxruntime as ort
import pytest

from wasinn import Host

LINE = re.compile(r"^(\d): (.+) \(class (\d+), p=([0-9.]+)\)$")


def parse_top5(text: str) -> list[tuple[int, float, str]]:
    rows = []
    for rank, line in enumerate(text.splitlines(), 1):
        match = LINE.match(line)
        assert match, line
        assert int(match[1]) == rank
        rows.append((int(match[3]), float(match[4]), match[2]))
    assert len(rows) == 5
    return rows


HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def check_classifier(host: Host, guests: dict[str, Path], assets: Path, reference,
                     model: str = "efficientnet-lite0", tolerance: float = 2e-4) -> None:
    """The classify guest on `host`'s `model` (a name, or a path under /data = `assets`):
    its top-5 is onnxruntime's on the ONNX export, labels and probabilities (the guest prints
    four decimals)."""
    out: list[bytes] = []
    code = host.run(guests["classify"], [model, "/data/chelsea.ppm", "/data/imagenet_labels.txt"],
                    dirs=[f"{assets}:/data"], stdout=out.append)
    assert code == 0
    got = parse_top5(b"".join(out).decode())
    expected = reference.top5(assets / "efficientnet-lite0" / "model.onnx", assets / "chelsea.ppm",
                              reference.load_labels(assets / "imagenet_labels.txt"))
    assert [(c, label) for c, _, label in got] == [(c, label) for c, _, label in expected]
    for (_, p_guest, _), (_, p_ref, _) in zip(got, expected):
        assert p_guest == pytest.approx(p_ref, abs=tolerance)
    assert got[0][0] == 285 and got[0][2] == "Egyptian cat"


@pytest.mark.parametrize("load,target", [
    ("by-name", "cpu"),
    ("by-bytes", "cpu"),
    pytest.param("by-name", "gpu", marks=pytest.mark.skipif(
        not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")),
])
def test_classifier_matches_onnxruntime(load: str, target: str, guests: dict[str, Path],
                                        example_assets: Path, reference, tmp_path: Path) -> None:
    model = example_assets / "efficientnet-lite0" / "model.onnx"
    host = Host(models=[f"efficientnet-lite0:onnx:{target}:{model}"], module_cache=tmp_path)
    model_arg = "efficientnet-lite0" if load == "by-name" else "/data/efficientnet-lite0/model.onnx"
    check_classifier(host, guests, example_assets, reference, model_arg)
    if target == "gpu":
        session = host.registry.get("efficientnet-lite0").session
        assert session.get_providers()[0] == "CUDAExecutionProvider"
