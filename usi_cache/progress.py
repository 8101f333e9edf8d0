"""The one progress bar of the package (tqdm: rate and ETA), used by shard writing, ingest and the
stages.
"""
from __future__ import annotations


def progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None, initial: int = 0):
    """A tqdm bar (rate and ETA), or a silent stand-in with the same update/close."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not enabled,
                smoothing=0.1)
