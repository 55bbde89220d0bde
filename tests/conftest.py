"""Shared pytest set-up for the test suite."""

import os

# Keras picks its backend when it is first imported; the Keras front end
# runs on JAX only, so the tests select it before any test module loads.
os.environ.setdefault('KERAS_BACKEND', 'jax')
