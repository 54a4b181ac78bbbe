"""Train IVT-LR: `python train.py --config configs/qwen2vl_m3cot.yaml [section.key=value ...]`.

Resumes automatically from the run folder's latest checkpoint (save_path/name/checkpoints). Several
processes (hosts): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a SLURM job (README)."""

import argparse
import sys

from ivtlr_jax import distributed
from ivtlr_jax.config import ConfigError, load_config
from ivtlr_jax.train.loop import NonFiniteError, RunFolderError, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run configuration")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many micro-batches (testing)")
    args = p.parse_args(argv)
    try:
        distributed.initialize()  # first: every process then checks the configuration and the run folder
    except distributed.DistributedSetupError as e:
        sys.exit(f"error: {e}")
    with distributed.fail_together():  # an error in any process stops all; process 0 prints it once
        try:
            cfg = load_config(args.config, args.overrides)
            result = train(cfg, max_steps=args.max_steps)
        except (ConfigError, RunFolderError, NonFiniteError, FileNotFoundError) as e:  # one message, no traceback
            sys.exit(f"error: {e}")
        if distributed.is_writer():
            print(result.summary())


if __name__ == "__main__":
    main()
