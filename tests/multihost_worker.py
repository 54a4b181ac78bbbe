"""One process of a multi-process test run (tests/test_multihost.py):

    python tests/multihost_worker.py train ARGS... [--then infer ARGS... [--then train ARGS...]]

runs train.py's or infer.py's main, one command after the other in the same process (one start-up for
several runs), with two test hooks read from the environment:

- IVTLR_TEST_DECODED=PREFIX: for every decoded image (`LazyImage.materialize`), append a line to
  PREFIX.<command number>.<process>, to check that each process decodes only its share of every batch;
- IVTLR_TEST_PAUSE=RUN:N:MARK: once the checkpoint of micro-step N of the run named RUN is complete,
  write MARK.<process> and wait to be killed (a deterministic window for `kill -9`);
- IVTLR_TEST_FAIL=RUN:N:P: process P raises once the checkpoint of micro-step N of the run named RUN is
  complete (the other processes go on into the next step's collectives);
- IVTLR_TEST_STALL=TAG:P:MARK: process P, reaching the agreement `distributed.agree(..., TAG)`, writes
  MARK and waits to be killed (the others wait for it in the exchange).
"""

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
command_number = [0]


def hooks() -> None:
    import jax

    from ivtlr_jax.data import examples
    from ivtlr_jax.train import checkpoint

    if os.environ.get("IVTLR_TEST_DECODED"):
        prefix = os.environ["IVTLR_TEST_DECODED"]
        real = examples.LazyImage.materialize

        def counted(self):
            with open(f"{prefix}.{command_number[0]}.{jax.process_index()}", "a") as f:
                f.write(f"{len(self._data)}\n")
            return real(self)

        examples.LazyImage.materialize = counted
    if os.environ.get("IVTLR_TEST_PAUSE"):
        run, step, mark = os.environ["IVTLR_TEST_PAUSE"].split(":", 2)
        real_save = checkpoint.TrainCheckpointer.save

        def save_then_pause(self, at, *args, **kwargs):
            real_save(self, at, *args, **kwargs)
            if at == int(step) and self.directory.parent.name == run:
                self.wait()
                Path(f"{mark}.{jax.process_index()}").write_text("")
                time.sleep(600)

        checkpoint.TrainCheckpointer.save = save_then_pause
    if os.environ.get("IVTLR_TEST_FAIL"):
        run, step, process = os.environ["IVTLR_TEST_FAIL"].split(":")
        real_save_too = checkpoint.TrainCheckpointer.save

        def save_then_fail(self, at, *args, **kwargs):
            real_save_too(self, at, *args, **kwargs)
            if at == int(step) and self.directory.parent.name == run and jax.process_index() == int(process):
                self.wait()
                raise RuntimeError(f"injected failure after micro-step {at}")

        checkpoint.TrainCheckpointer.save = save_then_fail
    if os.environ.get("IVTLR_TEST_STALL"):
        stall_hook(*os.environ["IVTLR_TEST_STALL"].split(":", 2))


def stall_hook(tag: str, process: str, mark: str) -> None:
    import jax

    from ivtlr_jax import distributed

    real_agree = distributed.agree

    def stall_then_agree(fn, name="agree"):
        if name == tag and jax.process_index() == int(process):
            Path(mark).write_text("")
            time.sleep(600)
        return real_agree(fn, name)

    distributed.agree = stall_then_agree


def commands(argv: list[str]) -> list[list[str]]:
    out = [[]]
    for arg in argv:
        if arg == "--then":
            out.append([])
        else:
            out[-1].append(arg)
    return out


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's stack dump of a stalled launch
    hooks()
    for number, (command, *args) in enumerate(commands(sys.argv[1:])):
        command_number[0] = number
        if command == "train":
            import train

            train.main(args)
        else:
            import infer

            infer.main(args)
