#!/usr/bin/env bash
# The whole test suite, in the project's own virtual environment. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python -m pytest "$@"
