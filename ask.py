"""`python ask.py ...`: the same command as `ivtlr-ask` (ivtlr_jax/cli/ask.py).

`python ask.py --help` lists the options."""

from ivtlr_jax.cli.ask import main as _main


def main(argv=None) -> None:
    _main(argv, prog="ask.py")


if __name__ == "__main__":
    main()
