"""train_student.py under torchrun, with a real `--add-views` grow of the cache committed on rank 1
between rank 0's read of the cache and rank 1's own: the fault injection of
test_stage2.py::test_a_grow_between_ranks_reads_cannot_split_the_ranks. Each rank writes the V its
target source trains with to RUN/views.rank<r>.

usage: python tests/grow_between_reads.py GROW_ARGS_JSON -- TRAIN_ARGS...
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from usi_cache import cache_format as schema
from usi_cache.stage2 import loop as train  # noqa: E402

TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                 "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE"}
grow_args, train_args = json.loads(sys.argv[1]), sys.argv[3:]
rank = int(os.environ["RANK"])
run = Path(train_args[train_args.index("--out") + 1])
real_open, real_resolve = schema.open_cache, train.resolve_targets
grown = []


def open_cache(path, mode="r"):
    if rank == 1 and not grown:  # rank 1's first read comes after a grow has committed
        grown.append(True)
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
        r = subprocess.run([sys.executable, str(ROOT / "cache_teacher.py"), *grow_args], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    return real_open(path, mode)


def resolve_targets(cfg, world, manifest):
    source = real_resolve(cfg, world, manifest)
    run.mkdir(parents=True, exist_ok=True)
    (run / f"views.rank{rank}").write_text(str(source.layout.views))
    return source


schema.open_cache, train.resolve_targets = open_cache, resolve_targets
from usi_cache.cli.main import train_command  # noqa: E402

train_command(train_args, prog_name="train_student.py")
