"""Evaluate a model folder: `python infer.py --config C --checkpoint DIR [section.key=value ...]`.

The same command as `ivtlr-infer` (ivtlr_jax/cli/infer.py); `python infer.py --help` lists the options."""

from ivtlr_jax.cli.infer import main as _main


def main(argv=None) -> None:
    _main(argv, prog="infer.py")


if __name__ == "__main__":
    main()
