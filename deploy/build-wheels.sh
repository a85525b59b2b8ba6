#!/usr/bin/env bash
# Build dfs's wheel and the wheels of all its dependencies into DIR (default ./wheels), for
# `pip install --no-index --find-links DIR dfs` on machines without network access.
#
#   deploy/build-wheels.sh [DIR]
#
# Needs network access to PyPI (for the dependencies) and, for pyfuse3 (no binary wheels),
# the Debian packages gcc, pkg-config, python3-dev and libfuse3-dev. Wheels are built for this
# machine's Python and architecture: build them on the Debian release the nodes run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$ROOT/wheels}")
PY=${DFS_PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
mkdir -p "$OUT"
rm -f "$OUT"/dfs-*.whl
"$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$OUT" "$ROOT"
echo "wheels in $OUT:" >&2
ls "$OUT" >&2
