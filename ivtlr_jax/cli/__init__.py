"""The command-line entry points (`[project.scripts]` in pyproject.toml). Each module has a
`main(argv=None, prog=...)`; `train.py`, `infer.py` and `convert/*.py` at the repository root are thin
wrappers around them with the same flags.

| command | module | wrapper |
| --- | --- | --- |
| `ivtlr-train` | `cli/train.py` | `train.py` |
| `ivtlr-infer` | `cli/infer.py` | `infer.py` |
| `ivtlr-convert-hf-to-flax` | `cli/hf_to_flax.py` | `convert/hf_to_flax.py` |
| `ivtlr-convert-flax-to-hf` | `cli/flax_to_hf.py` | `convert/flax_to_hf.py` |
| `ivtlr-convert-official` | `cli/official.py` | `convert/ivtlr_pth_to_flax.py` |
| `ivtlr-plan` | `plan.py` | `python -m ivtlr_jax.plan` |
| `ivtlr-report` | `report.py` | `python -m ivtlr_jax.report` |

Importing this package imports no JAX (`ivtlr-plan` sets its host device count before JAX loads).
"""

from __future__ import annotations

import argparse
import shutil
import sys

HELP_WIDTH = 100  # columns of --help at most (wider terminals get the same layout)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Docstrings and epilogs kept as written; option help wrapped to the terminal, at most HELP_WIDTH."""

    def __init__(self, prog):
        width = min(HELP_WIDTH, shutil.get_terminal_size((HELP_WIDTH, 24)).columns) - 2
        super().__init__(prog, max_help_position=30, width=width)


def make_parser(prog: str, usage: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose usage line is written by hand (`usage`, with %(prog)s): argparse's own wrapping of a
    long usage splits an option from its value ('--checkpoint' at the end of a line, 'DIR' on the next).
    `{cmd}` in the epilog's examples becomes the command as typed (`command_line`)."""
    return argparse.ArgumentParser(prog=prog, usage=usage, description=description,
                                   epilog=epilog.replace("{cmd}", command_line(prog)) if epilog else None,
                                   formatter_class=HelpFormatter)


def converter_parser(prog: str, usage: str, doc: str) -> argparse.ArgumentParser:
    """A converter's parser: its module docstring's first paragraph describes it, the rest is the epilog."""
    head, _, rest = doc.partition("\n\n")
    return make_parser(prog, usage, head, rest)


def add_output_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="new output folder")


def run_converter(parser: argparse.ArgumentParser, prog: str, convert, errors: tuple[type[Exception], ...]) -> None:
    """`convert()` -> the folder it wrote, printed; one of `errors` is one line and exit status 2."""
    try:
        out = convert()
    except errors as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    print(f"wrote {out}")


def command_line(prog: str) -> str:
    """How the command is typed: `python train.py` for a script, `ivtlr-train` for an entry point."""
    return f"python {prog}" if prog.endswith(".py") else prog


def fail(parser: argparse.ArgumentParser, message: str) -> None:
    """One message and exit status 2 (several processes: printed once, by process 0, with status 1 as
    every error of `distributed.fail_together`)."""
    from .. import distributed

    if distributed.process_count() > 1:
        sys.exit(message.rstrip())
    parser.exit(2, message)
