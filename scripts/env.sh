# Create or refresh the project's virtual environment (.venv) and activate it. Sourced by
# scripts/demo.sh and scripts/test.sh; pip only installs what changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24,<27" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install --quiet --disable-pip-version-check -e "$root[test]" 2>&1 | grep -v '^WARNING: Location' || true
# MediaPipe's models (a real face detector for the LiteRT tests): 0.10.21 is the last release
# that ships its .tflite files; --no-deps, as it declares numpy<2, jax and OpenCV, unneeded here
python -m pip install --quiet --disable-pip-version-check --no-deps "mediapipe==0.10.21" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import wasinn, onnxruntime, torch, ziglang" # fail here, not later, if an install broke
# The real Wizer (npm), for `wasinn preinit --engine wizer` and its tests; without npm they skip
wizer_version="11.0.3"
npm_prefix="$root/build/npm"
if ! command -v npm >/dev/null 2>&1; then
    echo "env.sh: npm not found: skipping Wizer (the tests that need it will skip)" >&2
elif ! grep -qs "\"version\": \"$wizer_version\"" "$npm_prefix/node_modules/@bytecodealliance/wizer/package.json" \
        || [ ! -x "$npm_prefix/node_modules/.bin/wizer" ]; then
    mkdir -p "$npm_prefix"
    npm install --prefix "$npm_prefix" --no-audit --no-fund --silent --save-exact \
        "@bytecodealliance/wizer@$wizer_version" 2>&1 | grep -v 'nodedir' || true
fi
