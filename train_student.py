#!/usr/bin/env python
"""Stage 2: train a timm student against a teacher cache (same as `usi train`)."""
from usi_cache.cli.main import train_command

if __name__ == "__main__":
    train_command(prog_name="train_student.py")
