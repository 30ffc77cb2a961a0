"""Shared set-up for the benchmarks: data, device, machine description."""

import os
import platform
import sys
from pathlib import Path

import torch

import pyvae
from pyvae.data import load_dataset, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the baselines beside this file


def add_common_arguments(parser):
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--data-dir", help="data root (else $PYVAE_DATA, else ./data)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine(device))
    return device


def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), pyro {__import__('pyro').__version__}, pyvae "
        f"{pyvae.__version__}, device {device}{gpu}"
    )


def static_mnist(split, data_dir=None):
    """Static binarized MNIST as a float tensor (N, 784)."""
    return load_dataset("binarized_mnist", split, data_dir=data_dir, download=False).images


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
