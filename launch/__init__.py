"""Launching the trainer: locally in several processes (local), on TPU pods (tpu), on SLURM GPU
clusters (slurm), and sweeps of runs from a config file's sweep() (sweep, grid, summary).
Distribution is JAX's own multi-controller runtime, jax.distributed, everywhere."""
