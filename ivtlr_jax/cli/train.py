"""Train IVT-LR with the staged latent curriculum, or resume a run.

Runs (or resumes from its latest checkpoint) the run folder save_path/name of the configuration:
config.yaml, metrics.jsonl (one JSON line per micro-step), checkpoints/, one merged Hugging Face export
per stage (stage_<s>/) and TensorBoard event files (tensorboard/train/). Re-run the same command to
resume after an interruption (refused, in one line, when the base model's or the training data's
contents changed since the run began: fingerprints.json). SIGTERM (a scheduler's preemption notice)
or Ctrl-C saves a checkpoint at the next micro-step, prints `preempted at micro-step N; ...` and
exits with status 75 (EX_TEMPFAIL). One trainer per run folder: while it runs, a second one is
refused at once (status 2, naming the first's pid and host; the lock file save_path/name.lock is
taken over when its process is gone).

Several processes (hosts): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a SLURM
job (README); each process runs the same command, process 0 writes the run folder.

After a NaN or inf stop (or a diverged run) a resume may go on differently: --allow-change KEY lets
the learning rate, its schedule or the clipping differ from the run's configuration, --resume-from STEP
goes back to an older checkpoint (the later ones are set aside, not deleted), --skip-batch N leaves the
optimizer step holding micro-step N untrained; each is recorded in <run>/changes.jsonl (ivtlr-report
lists them).
"""

from __future__ import annotations

import sys

from ..config import CHANGEABLE_ON_RESUME
from . import fail, make_parser

USAGE = "%(prog)s --config YAML [options] [section.key=value ...]"
EPILOG = """\
examples:
  {cmd} --config configs/qwen2vl_m3cot.yaml
  {cmd} --config configs/tiny.yaml optim.lr=1e-3 name=tiny_lr
  {cmd} --config configs/tiny.yaml optim.lr=5e-4 --allow-change optim.lr --resume-from 40

logging (the config's log section; none of it blocks a resume):
  log.tensorboard=true   TensorBoard event files in <run>/tensorboard/ (default on):
                         tensorboard --logdir <save_path>
  log.wandb=true         also Weights & Biases (pip install wandb; log.wandb_project, log.wandb_entity)

compilation cache: compiled XLA programs are kept in $IVTLR_JAX_CACHE (default ~/.cache/ivtlr_jax/xla),
so a re-run or a resume starts without recompiling; IVTLR_JAX_CACHE=off turns it off.
"""


def main(argv=None, prog: str = "ivtlr-train") -> None:
    p = make_parser(prog, USAGE, __doc__, EPILOG)
    p.add_argument("--config", required=True, metavar="YAML", help="run configuration (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.lr=1e-4 (value parsed as YAML)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N micro-batches in this invocation (a later run resumes)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help=f"on resume, let KEY differ from the run's config.yaml (repeatable; one of "
                        f"{', '.join(CHANGEABLE_ON_RESUME)}); recorded in <run>/changes.jsonl")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="resume from the older checkpoint STEP; later checkpoints and exports are moved to "
                        "<run>/set_aside/, metrics.jsonl is cut back to STEP (a copy set aside)")
    p.add_argument("--skip-batch", type=int, default=None, metavar="N",
                   help="do not train the optimizer step holding micro-step N (its accumulation window); recorded")
    args = p.parse_args(argv)

    from .. import distributed
    from ..compilation_cache import enable_compilation_cache
    from ..config import ConfigError, load_config
    from ..data import DataSourceError
    from ..io.lock import OutputInUseError, output_lock
    from ..io.fingerprint import FingerprintError
    from ..train.checkpoint import CheckpointReadError
    from ..train.fingerprints import RunContentError
    from ..train.loop import NonFiniteError, RunFolderError, train
    from ..train.preemption import PREEMPTED_EXIT_STATUS, Preempted
    from ..train.resume_options import ResumeOptions

    try:
        distributed.initialize()  # first: every process then checks the configuration and the run folder
    except distributed.DistributedSetupError as e:
        sys.exit(f"error: {e}")
    enable_compilation_cache(log=print)
    preempted = None
    with distributed.fail_together():  # an error in any process stops all; process 0 prints it once
        try:
            cfg = load_config(args.config, args.overrides)
            options = ResumeOptions(tuple(args.allow_change), args.resume_from, args.skip_batch)
            with output_lock(cfg.run_dir):  # <save_path>/<name>.lock: one trainer per run folder
                result = train(cfg, max_steps=args.max_steps, options=options)
        except OutputInUseError as e:  # refused before anything is loaded
            fail(p, f"error: {e}\n")
        except (ConfigError, RunFolderError, NonFiniteError, CheckpointReadError, DataSourceError, FileNotFoundError,
                distributed.DisagreementError, RunContentError, FingerprintError) as e:  # one message, no traceback
            sys.exit(f"error: {e}")
        except Preempted as e:  # every process saved the same step: they leave fail_together together
            preempted = e
        if distributed.is_writer() and preempted:
            print(preempted, file=sys.stderr, flush=True)
        elif distributed.is_writer():
            print(result.summary())
    if preempted:
        sys.exit(PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
    main()
