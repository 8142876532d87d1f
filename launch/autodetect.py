"""Runs a module as a program after jax.distributed.initialize() detects the cluster by itself.

    python -m launch.autodetect vla.train --config FILE --workdir DIR [--config.key=value ...]

On Cloud TPU VMs (one slice, or several joined by a queued resource) JAX finds the coordinator,
the process count and this host's process id in the TPU metadata (MEGASCALE_* for multislice),
so the pod launcher (launch.tpu) sets no JAX_* variables. The trainer then sees jax.distributed
already initialized and runs unchanged. Where JAX_COORDINATOR_ADDRESS is set (launch.local,
launch.slurm) the trainer initializes from the environment instead and needs no wrapper.
"""
import runpy
import sys

import jax


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -m launch.autodetect MODULE [ARGS...]\n{__doc__}")
    jax.distributed.initialize()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
