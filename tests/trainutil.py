"""Run the trainer in-process or under torchrun, and read what it wrote."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from higgs_min.train.run import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--max-steps", "4", "--save-steps", "100", "--log-every", "1", "--batch-size", "4",
        "--warmup-steps", "2", "--lora-rank", "4", "--log-samples", "0"]


def train_args(out: Path, *extra) -> list[str]:
    args = list(FAST)
    args += ["--output-dir", str(out), *map(str, extra)]
    return args


def run(out: Path, *extra) -> int:
    return main(train_args(out, *extra))


def run_cli(out: Path, *extra, timeout: float = 300) -> subprocess.CompletedProcess:
    """The trainer as a user runs it, in a fresh process (same thread count as other CLI runs)."""
    return subprocess.run([sys.executable, "-m", "higgs_min.train"] + train_args(out, *extra), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def torchrun(nproc: int, args: list[str], nnodes: int = 1, port: int | None = None, script=None,
             timeout: float = 240, node_rank: int | None = None, **popen) -> subprocess.Popen:
    """nnodes > 1: one launcher per call (a "node"); with node_rank, a static rendezvous that fixes which
    node holds rank 0, else c10d (first come, first ranked)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1 or node_rank is not None:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
        cmd += [f"--node-rank={node_rank}"] if node_rank is not None else []
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=higgs-test"]
    cmd += [script] if script else ["-m", "higgs_min.train"]
    return subprocess.Popen(cmd + args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)
