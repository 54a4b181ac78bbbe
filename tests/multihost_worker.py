"""One process of a multi-process test run (tests/test_multihost.py): `python tests/multihost_worker.py
train|infer ARGS...` runs train.py's or infer.py's main with two test hooks, read from the environment:

- IVTLR_TEST_DECODED=FILE: append to FILE (one line per decode) that this process decoded a training
  image (`LazyImage.materialize`), to check that each process decodes only its share of every batch;
- IVTLR_TEST_PAUSE_AFTER=N: once the checkpoint of micro-step N is complete, write FILE.paused<process>
  (FILE: IVTLR_TEST_PAUSE_MARK) and wait to be killed (a deterministic window for `kill -9`).
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hooks() -> None:
    import jax

    from ivtlr_jax.data import examples
    from ivtlr_jax.train import checkpoint

    if os.environ.get("IVTLR_TEST_DECODED"):
        log = os.environ["IVTLR_TEST_DECODED"]
        real = examples.LazyImage.materialize

        def counted(self):
            with open(f"{log}.{jax.process_index()}", "a") as f:
                f.write(f"{len(self._data)}\n")
            return real(self)

        examples.LazyImage.materialize = counted
    if os.environ.get("IVTLR_TEST_PAUSE_AFTER"):
        step, mark = int(os.environ["IVTLR_TEST_PAUSE_AFTER"]), os.environ["IVTLR_TEST_PAUSE_MARK"]
        real_save = checkpoint.TrainCheckpointer.save

        def save_then_pause(self, at, *args, **kwargs):
            real_save(self, at, *args, **kwargs)
            if at == step:
                self.wait()
                Path(f"{mark}.paused{jax.process_index()}").write_text("")
                time.sleep(600)

        checkpoint.TrainCheckpointer.save = save_then_pause


if __name__ == "__main__":
    command, argv = sys.argv[1], sys.argv[2:]
    hooks()
    if command == "train":
        import train

        train.main(argv)
    else:
        import infer

        infer.main(argv)
