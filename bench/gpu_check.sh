#!/usr/bin/env bash
# The one call for a GPU machine: make pydantic importable from the carried wheels, then run
# bench/gpu_check.py (see its docstring and docs/speed.md). Arguments go to gpu_check.py.
#
#   bash bench/gpu_check.sh                           # on the GPU: ~5 minutes, writes gpu_check.json
#                                                     (part f, packed seeds, about 1 of them; --skip pack)
#   bash bench/gpu_check.sh --allow-cpu --tiny        # anywhere: the same checks at tiny sizes
#
# The GPU machine has torch, numpy, typer, rich and pyyaml but no pydantic and no network. Copy the
# wheels of ../shared/device-wheels/ into .device-wheels/ (ignored by git, never committed) and carry
# that folder with the working tree; BNCTL_WHEELS names another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    wheels=${BNCTL_WHEELS:-.device-wheels}
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: pydantic is missing and $wheels/ holds no wheels to install it from" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/bnctl-site.XXXXXX)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bnctl from this tree, installed or not
exec "$PYTHON" bench/gpu_check.py "$@"
