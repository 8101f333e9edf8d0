#!/usr/bin/env python
"""Stage 1: cache a teacher's top-k logits over augmented views (same as `usi cache`).

    python cache_teacher.py --config configs/usi.yaml --shards DIR --teacher NAME \
        --teacher-checkpoint PATH --views V --topk K --out CACHE.zarr
    torchrun --nproc_per_node=N cache_teacher.py ...   # ranks take disjoint shards
"""
from usi_cache.cli.main import cache_command

if __name__ == "__main__":
    cache_command(prog_name="cache_teacher.py")
