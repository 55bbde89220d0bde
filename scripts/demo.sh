#!/usr/bin/env bash
# The main job: DP-SGD on scikit-learn's bundled digits data set.
# Extra arguments go to `jax-privacy train` (see `--help`).
EXTRAS=demo
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/jax-privacy train "$@"
