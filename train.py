"""Train IVT-LR: `python train.py --config configs/qwen2vl_m3cot.yaml [section.key=value ...]`.

The same command as `ivtlr-train` (ivtlr_jax/cli/train.py); `python train.py --help` lists the options."""

from ivtlr_jax.cli.train import main as _main


def main(argv=None) -> None:
    _main(argv, prog="train.py")


if __name__ == "__main__":
    main()
