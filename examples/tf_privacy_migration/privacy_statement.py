"""TensorFlow Privacy's `compute_dp_sgd_privacy_statement`, here.

TF Privacy:

    from tensorflow_privacy import compute_dp_sgd_privacy_statement
    print(compute_dp_sgd_privacy_statement(
        number_of_examples=60000, batch_size=256, num_epochs=15,
        noise_multiplier=1.1, delta=1e-5, used_microbatching=False))

JAX Privacy: the same arguments, both numbers (shuffled batches: proven;
Poisson: proven only for Poisson batches, which our samplers draw), and a
calibration the other way round (the noise for a target epsilon).

Run: python examples/tf_privacy_migration/privacy_statement.py
"""

from jax_privacy import accounting


def main() -> None:
  statement = accounting.statements.dp_sgd_privacy_statement(
      number_of_examples=60000,
      batch_size=256,
      num_epochs=15,
      noise_multiplier=1.1,
      delta=1e-5,
      used_microbatching=False,
  )
  print(statement)
  print()
  # The same run drawn with Poisson batches (our default samplers): the
  # Poisson number is then the proven guarantee. The calibrator finds the
  # noise multiplier for a target epsilon instead.
  sigma = accounting.calibrate.calibrate_noise_multiplier(
      target_epsilon=statement.epsilon_poisson,
      accountant=accounting.analysis.DpsgdTrainingAccountant(
          accounting.accountants.RdpAccountantConfig()),
      batch_sizes=256,
      num_updates=statement.num_steps,
      num_samples=60000,
      target_delta=1e-5,
  )
  print(f'noise multiplier for epsilon {statement.epsilon_poisson:.3g} with'
        f' Poisson batches: {sigma:.4f}')


if __name__ == '__main__':
  main()
