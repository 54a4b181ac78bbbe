"""`python serve.py ...`: the same command as `ivtlr-serve` (ivtlr_jax/cli/serve.py).

`python serve.py --help` lists the options."""

from ivtlr_jax.cli.serve import main as _main


def main(argv=None) -> None:
    _main(argv, prog="serve.py")


if __name__ == "__main__":
    main()
