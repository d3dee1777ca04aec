#!/usr/bin/env bash
# The main job: build the guests, then ask two Wasm guests through wasi-nn (load_by_name):
# a chat guest on SmolLM2-135M-Instruct (llama.cpp), and an image classifier on the pretrained
# EfficientNet-Lite0 (ONNX Runtime). Both models come from PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python guests/build.py build/guests
python examples/classify/prepare.py build/example
echo "--- classify.wasm on scikit-image's cat photo (EfficientNet-Lite0, ONNX Runtime):"
wasinn run \
    --nn-preload efficientnet-lite0:onnx:cpu:build/example/efficientnet-lite0/model.onnx \
    --dir build/example:/data \
    build/guests/classify.wasm efficientnet-lite0 /data/chelsea.ppm /data/imagenet_labels.txt
echo "--- chat.wasm, one question to SmolLM2-135M-Instruct (GGUF, llama.cpp), streamed:"
wasinn run \
    --nn-preload "default:GGML:AUTO:$(python examples/chat/model.py)" \
    build/guests/chat.wasm --stream --n-predict 64 --temp 0 \
    "What is the capital of France? Answer in one sentence."
