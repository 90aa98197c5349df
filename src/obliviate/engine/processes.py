"""Which process of a data-parallel launch this is (``accelerate launch`` or ``torchrun`` set
``RANK`` and ``WORLD_SIZE``), its device, and the two collective steps the store needs: the main
process shares what to apply, and every process waits at the end of each request until the main
one has committed it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> "Processes":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        """Where this process trains: its own GPU in a launch, else the GPU if there is one."""
        import torch
        if self.count > 1:
            return _joined().device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def share(self, value):
        """The main process's ``value``, in every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list
        _joined()
        return broadcast_object_list([value], from_process=0)[0]

    def barrier(self) -> None:
        if self.count > 1:
            _joined().wait_for_everyone()


def _joined():
    """accelerate's process state, which joins the launch's process group (gloo without GPUs)."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())
