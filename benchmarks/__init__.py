"""Reproducible performance benchmarks of medsynth, each run as ``python -m benchmarks.<name>``.

* ``sampling``: network evaluations, wall time and plausibility Dice of the samplers vs DDPM-1000.
* ``training``: ControlNet training throughput on cached latents vs MONAI's latent-diffusion inferer.
* ``preprocessing``: cold and warm preprocessing throughput vs a plain MONAI ``Dataset`` pipeline.
* ``memory``: peak memory of a ControlNet training step and of sampling, by image size.

See ``benchmarks/README.md``.
"""
