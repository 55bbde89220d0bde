#!/usr/bin/env bash
# The default test suite (slow tests excluded). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` runs the slow tests instead.
EXTRAS=dev
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/python -m pytest -q -n 2 "$@"
