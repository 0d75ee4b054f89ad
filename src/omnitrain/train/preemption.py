"""Preemption signals: SIGUSR1 (Slurm's ``--signal=USR1@120`` before preemption or the time limit: save,
then requeue) and SIGTERM (``scancel``, the kill: save, no requeue) -> a flag the training loop reads.

Installed as early as possible: ``omnitrain train`` installs it before it imports torch (``cli.main``) and
``train()`` takes that instance over (``Preemption.install``), so a signal that arrives while the job
starts up (imports, the strategy launch, the model build, the resume) is kept, not fatal: the loop stops
before its first step. Importing this module imports nothing heavy (torch only when ranks agree).

Ranks agree on one decision (``requested``): Slurm may deliver USR1 to some tasks and TERM to others
(a TERM that follows the USR1 quickly, or tasks signalled by different means). Each rank contributes a
priority (USR1 2, TERM 1, none 0) and the maximum wins, so a USR1 anywhere means save *and requeue*
on every rank, never a silent end without requeue.
"""

from __future__ import annotations

import signal
from typing import Any

# the signal that wins when ranks received different ones: requeue beats a plain stop
PRIORITY = {signal.SIGUSR1: 2, signal.SIGTERM: 1}
_BY_PRIORITY = {p: s for s, p in PRIORITY.items()}


class Preemption:
    """SIGUSR1 / SIGTERM -> ``self.signal`` (the highest-priority one received), read by the loop."""

    _active: Preemption | None = None  # the installed instance (one per process)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PRIORITY}
        Preemption._active = self

    @classmethod
    def install(cls) -> Preemption:
        """The installed instance (keeping what it has received so far), or a new one."""
        return cls._active if cls._active is not None else cls()

    def restore(self) -> None:
        """Give the signals back to the handlers they had before (the training is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if Preemption._active is self:
            Preemption._active = None

    def _handle(self, signum: int, frame: Any) -> None:
        if PRIORITY[signum] > PRIORITY.get(self.signal, 0):  # a TERM after a USR1 keeps the requeue
            self.signal = signum

    def slots(self) -> list[float]:
        """This rank's signal as two indicators (USR1 received, TERM received), summed over the ranks inside the training
        step's one collective (``loop.train_step``): ``agreed`` of the sums is ``requested``'s answer, without a
        collective and a host read of its own every step."""
        return [float(self.signal == signal.SIGUSR1), float(self.signal == signal.SIGTERM)]

    @staticmethod
    def agreed(summed: list[float]) -> int:
        """The signal all ranks act on from the ranks' summed ``slots``: USR1 anywhere wins, as in ``requested``."""
        return int(signal.SIGUSR1 if summed[0] > 0 else signal.SIGTERM if summed[1] > 0 else 0)

    def requested(self, fabric: Any) -> int:
        """The signal all ranks act on (0: none): the highest priority any rank received (one process: no sync)."""
        mine = PRIORITY.get(self.signal, 0)
        if fabric.world_size > 1:
            import torch  # (this module stays light to import: cli installs it before torch is loaded)

            flag = torch.tensor([mine], device=fabric.device)
            mine = int(fabric.all_reduce(flag, reduce_op="max").item())
        return int(_BY_PRIORITY.get(mine, 0))
