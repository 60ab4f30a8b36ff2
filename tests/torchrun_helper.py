"""Run a script under ``torchrun`` on two CPU processes and fail with every rank's own output."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def run_two_ranks(script: Path, log_dir: Path) -> None:
    """Two gloo ranks on a free loopback port; asserts both exit 0, else shows each rank's stderr tail."""
    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "--redirects", "3", "--log-dir", str(log_dir),
                           str(script)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if proc.returncode != 0:
        ranks = "\n".join(f"--- {p.relative_to(log_dir)}:\n{p.read_text(errors='replace')[-1500:]}"
                          for p in sorted(log_dir.rglob("std*.log")))
        raise AssertionError(f"torchrun exit {proc.returncode}\n{proc.stderr[-800:]}\n{ranks}")
