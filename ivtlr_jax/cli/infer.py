"""Evaluate a model folder on M3CoT / ScienceQA with batched, jitted IVT-LR generation."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import distributed
from ..compilation_cache import enable_compilation_cache
from ..config import Batching, ConfigError, EvalSection, load_config
from ..data import DataSourceError, PromptFormat
from ..eval.run import eval_config_from_run, evaluate
from ..eval.setup import EvalSetupError, default_output, setup_path, summary_path
from ..io.lock import OutputInUseError
from ..models.common.choices import names
from ..models.common.layers import DType
from ..events import check_backends
from . import fail, make_parser

USAGE = "%(prog)s --config YAML --checkpoint DIR [options] [section.key=value ...]"
EPILOG = """\
examples:
  {cmd} --config configs/qwen2vl_m3cot.yaml --checkpoint runs/qwen2vl_m3cot/stage_3 --batch-size 32
  {cmd} --config configs/tiny.yaml --checkpoint outputs/tiny/runs/tiny/stage_3 --limit 16 \\
      --save-attention /tmp/pictures latent.num_selected_patches=8 model.dtype=float32

The config supplies the dataset (data.dataset, data.source, data.eval_split), the latent settings
(latent.num_selected_patches, latent.patch_order, latent.rope, latent.patch_deepstack), model.scan_layers
and the precision (model.dtype for compute, model.param_dtype for storing the weights); section.key=value
overrides change any of them, as for training.

Writes one JSON line per example to --out (default: <run>/eval/stage_<s>/eval_<split>.jsonl for a stage
export <run>/stage_<s>, outside the folder a re-export replaces; <checkpoint>/eval_<split>.jsonl for
another folder; evals/<owner>--<name>/eval_<split>.jsonl for a hub id), its setup to <out
stem>.setup.json before the first line and a summary to <out stem>.summary.json. Re-running
with the same --out skips the examples already written if the setup (model weights, data, prompt
format, latents, dtype, sampling, limit) is the same, and refuses otherwise. While one evaluation
writes an output, a second one into it is refused at once (status 2, naming the first's pid and host;
the lock file <out>.lock is taken over when its process is gone).

Several processes (hosts; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or a SLURM job):
each evaluates its share of every batch, process 0 writes the output, the setup and the summary.

The accuracy also goes to TensorBoard (log.tensorboard, default on): into <run>/tensorboard/eval/
for a stage export <run>/stage_<s> (at the micro-step where the stage ended), else into
tensorboard/eval/ beside --out; and to Weights & Biases with log.wandb=true. Compiled programs are
cached in $IVTLR_JAX_CACHE (default ~/.cache/ivtlr_jax/xla; IVTLR_JAX_CACHE=off turns it off).
"""


EVAL = EvalSection()  # the defaults of the run config's eval section, named in the help


def main(argv=None, prog: str = "ivtlr-infer") -> None:
    p = make_parser(prog, USAGE, __doc__, EPILOG)
    p.add_argument("--config", required=True, metavar="YAML", help="run configuration (as for training)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model folder: a stage export of a training run, a converted or a Hugging Face folder")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.dtype=float32")
    p.add_argument("--split", default=None, help="dataset split (default: data.eval_split of the config)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"rows per batch over all devices (default: eval.batch_size of the config, {EVAL.batch_size} "
                        "when unset)")
    p.add_argument("--batching", choices=[b.value for b in Batching], default=None,
                   help="continuous: a finished row's slot takes the next example (the slots split over the "
                        "processes and each process's over its devices); static: batches decode until their longest "
                        f"answer ends; auto: continuous (default: eval.batching of the config, {EVAL.batching} when "
                        "unset)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="split each batch over the first N local devices (default: all)")
    p.add_argument("--dtype", choices=names(DType), default=None,
                   help="compute and weight-storage dtype (default: model.dtype and model.param_dtype of the config)")
    p.add_argument("--latents", type=int, default=None, metavar="N",
                   help="<|latent|> tokens after the question (default: eval.num_latents of the config, "
                        f"{EVAL.num_latents} when unset, as the official evaluation)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"default: eval.max_new_tokens of the config, {EVAL.max_new_tokens} when unset")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="JSONL output (default: beside a stage export in <run>/eval/stage_<s>/, else in the "
                        "checkpoint folder, or evals/<owner>--<name>/ for a hub id)")
    p.add_argument("--save-attention", default=None, metavar="DIR",
                   help="write one PNG per example: the patches selected at each latent step")
    p.add_argument("--prompt-format", choices=[f.value for f in PromptFormat], default=None,
                   help="train: the training prompt; official: the official evaluation scripts' prompt (default: "
                        f"eval.prompt_format of the config, {EVAL.prompt_format} when unset)")
    args = p.parse_args(argv)
    try:
        distributed.initialize()
    except distributed.DistributedSetupError as err:
        p.exit(2, f"{prog}: error: {err}\n")
    with distributed.fail_together():  # an error in any process stops all; process 0 prints it once
        run(p, args, prog)


def run(p: argparse.ArgumentParser, args, prog: str) -> None:
    try:
        cfg = load_config(args.config, args.overrides, training=False)  # float16 may evaluate
        check_backends(cfg.log)
    except (ConfigError, FileNotFoundError) as err:  # a bad or missing config: one line
        fail(p, f"{prog}: error: {err}\n")
    enable_compilation_cache(log=print)
    given = lambda **options: {k: v for k, v in options.items() if v is not None}  # None: the config's
    try:
        eval_cfg = eval_config_from_run(
            cfg, limit=args.limit, devices=args.devices, data=given(eval_split=args.split or None),
            model=given(dtype=args.dtype, param_dtype=args.dtype),
            eval=given(num_latents=args.latents, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       prompt_format=args.prompt_format, batching=args.batching))
    except ConfigError as err:  # an option out of range (--batch-size 0): one line
        fail(p, f"{prog}: error: {err}\n")
    out = Path(args.out) if args.out else default_output(args.checkpoint, eval_cfg.data.eval_split)
    try:
        evaluate(args.checkpoint, eval_cfg, out, save_attention=args.save_attention, events=cfg.log)
    # another setup's output, a damaged one, one in use; no such model folder or data source: one line
    except (EvalSetupError, OutputInUseError, FileNotFoundError, DataSourceError, distributed.DisagreementError) as err:
        fail(p, f"{prog}: error: {err}\n")
    if distributed.is_writer():  # evaluate() printed the result line
        where = f"records in {out}, summary in {summary_path(out).name}, setup in {setup_path(out).name}"
        pictures = f"; patch pictures in {args.save_attention}" if args.save_attention else ""
        print(f"wrote {where}{pictures}")


if __name__ == "__main__":
    main()
