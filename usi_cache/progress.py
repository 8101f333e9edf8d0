"""The progress bar of long shard jobs (tqdm: rate and ETA, or a silent stand-in): writing tars,
the parallel writer and indexing. A module of its own at the top so that any folder can show one
without importing shards/.
"""
from __future__ import annotations


def progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None, initial: int = 0):
    """A tqdm bar (rate and ETA), or a silent stand-in with the same update/close."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not enabled,
                smoothing=0.1)
