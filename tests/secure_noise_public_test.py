"""The public module jax_privacy.secure_noise exposes the tested pieces."""

import numpy as np
import pytest

import jax_privacy
from jax_privacy import secure_noise


def test_public_names_work():
  assert jax_privacy.secure_noise is secure_noise
  # Published value (CKS conversion) for rho = 1/32, delta = 1e-3.
  assert secure_noise.zcdp_epsilon(1 / 32, 1e-3) == pytest.approx(
      0.6880024554878086, abs=1e-12)
  draws = secure_noise.sample_discrete_gaussian(4, (20000,))
  assert draws.dtype.kind == 'i'
  assert abs(float(np.mean(draws))) < 0.1
  # The discrete Gaussian's variance is at most sigma^2 (and close to it).
  assert 3.7 < float(np.var(draws)) <= 4.2
  assert secure_noise.effective_noise_multiplier(1.0, 10**6) < 1.0
