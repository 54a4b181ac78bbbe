"""optim.loss_scale=token_mean: each micro-batch's loss denominator, from the supervised tokens of the
optimizer step it belongs to.

The optimizer (`optax.MultiSteps`) counts micro-steps over the whole run, not per epoch: its windows are
`accumulation` consecutive micro-steps from the run's start, or from the last optimizer reset
(`optim.reset_optimizer`: every stage's first micro-step). A window may therefore span two epochs; one cut
short by a reset or by the end of the run is partial (its gradients never make an optimizer step, but its
losses are still scaled by its own tokens). A micro-batch's denominator is its window's supervised tokens /
the window's micro-batches, so the mean that MultiSteps takes of the window's gradients is the gradient of
(the window's summed token losses / its supervised tokens).
"""

from __future__ import annotations

from typing import Callable


def micro_batch_tokens(labels_of: Callable[[int], list[int]], order, rows_per_micro_step: int) -> list[int]:
    """Supervised tokens (labels != -100) of each micro-batch of an epoch's order (whole micro-batches).
    `labels_of(i)`: example i's labels at the epoch's stage."""
    per_example = {i: sum(1 for t in labels_of(i) if t != -100) for i in set(order.tolist())}
    return [sum(per_example[i] for i in order[b : b + rows_per_micro_step].tolist())
            for b in range(0, len(order), rows_per_micro_step)]


def optimizer_window(micro_step: int, accumulation: int, resets: tuple[int, ...], total: int) -> tuple[int, int]:
    """[start, end) of the optimizer window holding `micro_step` (0-based, counted over the run); `resets`:
    the micro-steps where the optimizer state starts afresh (0 first); `total`: micro-steps of the run."""
    base = max(r for r in resets if r <= micro_step)
    following = min([r for r in resets if r > micro_step] + [total])
    start = base + (micro_step - base) // accumulation * accumulation
    return start, min(start + accumulation, following)


class TokenWindows:
    """The token_mean denominators of a run. `epoch_tokens(epoch)`: supervised tokens of each of the epoch's
    `micro_per_epoch` micro-batches (computed once per epoch while its windows are used)."""

    def __init__(self, epoch_tokens: Callable[[int], list[int]], micro_per_epoch: int, accumulation: int,
                 resets: tuple[int, ...], total: int):
        self._epoch_tokens, self._cache = epoch_tokens, {}
        self.micro_per_epoch, self.accumulation, self.resets, self.total = micro_per_epoch, accumulation, resets, total

    def tokens_at(self, micro_step: int) -> int:
        """Supervised tokens of the micro-batch at `micro_step` (0-based)."""
        epoch, index = divmod(micro_step, self.micro_per_epoch)
        if epoch not in self._cache:
            span = self.accumulation // self.micro_per_epoch + 2  # the epochs one window can touch
            self._cache = {e: v for e, v in self._cache.items() if abs(e - epoch) <= span}
            self._cache[epoch] = self._epoch_tokens(epoch)
        return self._cache[epoch][index]

    def denominator(self, micro_step: int) -> float:
        """The denominator of the micro-batch at `micro_step` (0-based): its window's supervised tokens /
        the window's micro-batches (at least 1)."""
        start, end = optimizer_window(micro_step, self.accumulation, self.resets, self.total)
        return max(sum(self.tokens_at(m) for m in range(start, end)) / (end - start), 1.0)
