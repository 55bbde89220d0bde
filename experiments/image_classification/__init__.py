"""DP image classification: the pipeline of De et al. 2022 and Berrada et al. 2023.

Run a config with ``python -m experiments.image_classification --config
experiments/image_classification/configs/<row>.toml`` from the repository
root. See docs/image_classification.md.
"""
