# Sourced by the scripts in this folder: makes .venv (once) and installs the
# project into it with the extras named in $EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS}]"
# keras-hub (the language-model tests and examples) without its declared
# tensorflow-text dependency, which the JAX backend does not need.
if [[ ",${EXTRAS}," == *",dev,"* ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --no-deps keras-hub==0.32.0
fi
