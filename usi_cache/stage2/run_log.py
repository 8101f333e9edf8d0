"""Stage 2's one output channel, on rank 0: the `usi_cache` logger, log.jsonl and TensorBoard.

* Messages: the package logger `usi_cache` (messages.py) prints INFO and above to stdout on
  rank 0 for the length of a run; the other ranks are silent.
* log.jsonl: one JSON record per epoch (no "step" key) and, every `log_every` optimizer steps,
  a step record {"step", "epoch", "loss", "lr"} (rank 0's loss). Readers tell them apart by
  the "step" key. A resume drops every record of an epoch after the checkpoint's.
* TensorBoard (`tensorboard: true`): the same numbers as event files in the run folder, steps
  as x (epoch records at the epoch's last step).
"""
from __future__ import annotations

import importlib.util
import json

import torch

from usi_cache import storage
from usi_cache.messages import Messages
from usi_cache.stage2.state import TrainError


class RunLog:
    def __init__(self, out: str, *, main: bool, tensorboard: bool):
        # every rank checks, so that no rank waits in a collective for one that failed here
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise TrainError("train.tensorboard: the tensorboard package is not installed "
                             "(pip install 'usi-cache[tensorboard]')")
        if tensorboard and storage.is_url(out):
            raise TrainError(f"train.tensorboard: event files need a local run folder, not {out}")
        self.out, self.main, self.tensorboard = out, main, tensorboard
        self.path = storage.join(out, "log.jsonl")
        self.pending: list[tuple[int, int, torch.Tensor, float]] = []  # step records, loss on the device
        self.unwritten = ""  # step records held back on object storage until the epoch record
        self.writer = None
        self.messages = Messages(main)

    def start(self, resumed_epoch: int | None, resumed_step: int) -> None:
        """A new run's empty log, or a resumed run's log cut back to the checkpoint's epoch."""
        if not self.main:
            return
        if resumed_epoch is None:
            storage.write_bytes(self.path, b"")
        elif storage.is_file(self.path):
            lines = storage.read_bytes(self.path).decode(errors="replace").splitlines()
            kept = [ln for ln in lines if (r := _record(ln)) is not None and r["epoch"] <= resumed_epoch]
            storage.write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events a killed run wrote past the checkpoint are dropped
            self.writer = SummaryWriter(self.out, purge_step=resumed_step + 1 if resumed_epoch is not None else None)

    def step(self, step: int, epoch: int, loss: torch.Tensor, lr: float) -> None:
        """Queue a step record; its loss stays on the device until `flush_steps`."""
        if self.main:
            self.pending.append((step, epoch, loss, lr))

    def flush_steps(self) -> None:
        """Write the queued step records: reading their losses is a CPU-GPU sync point, so the
        loop calls this where it syncs anyway (the non-finite check)."""
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).tolist()
        records = [{"step": s, "epoch": e, "loss": loss, "lr": lr}
                   for (s, e, _, lr), loss in zip(self.pending, losses)]
        self.pending.clear()
        text = "".join(json.dumps(r) + "\n" for r in records)
        if storage.is_url(self.path):  # an append there rewrites the whole object: once per epoch
            self.unwritten += text
        else:
            storage.append_text(self.path, text)
        if self.writer is not None:
            for r in records:
                self.writer.add_scalar("train/loss", r["loss"], r["step"])
                self.writer.add_scalar("train/lr", r["lr"], r["step"])

    def epoch(self, record: dict, step: int) -> None:
        """Append an epoch record (before last.pth is saved: resume trims records past it)."""
        if not self.main:
            return
        storage.append_text(self.path, self.unwritten + json.dumps(record) + "\n")
        self.unwritten = ""
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.writer.add_scalar(f"epoch/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.messages.close()


def _record(line: str) -> dict | None:
    """A log.jsonl line as a record, or None for a blank line or one torn by a kill or a full disk
    (its epoch is past the checkpoint's anyway: it was being written when the run stopped)."""
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        return None
    return r if isinstance(r, dict) and isinstance(r.get("epoch"), int) else None
