"""The quality table: recipes trained by their papers' protocols, their test log p(x) against the
papers'.

    python benchmarks/quality.py configs/recipe_*.yaml --device cuda         # the full protocols
    python benchmarks/quality.py configs/recipe_*.yaml --epochs 20           # a budget in epochs,
    python benchmarks/quality.py configs/recipe_*.yaml --hours 2 --ais 1000  # or hours; AIS too

For each recipe (a ``configs/recipe_*.yaml`` whose header has a line ``# published log p(x):
-88.56``):

1. ``python -m pyvae train --config RECIPE`` in a child process, with ``--epochs N`` when given;
   with ``--hours H`` it gets SIGINT after H hours, stops after the current step and keeps its
   checkpoints (continue it with ``--resume``). The recipe's protocol decides the rest: validation,
   early stopping, schedule, and which checkpoint is the model (``eval_checkpoint``: best.pt by
   default).
2. That checkpoint scored on the test set by importance sampling with the guide as proposal,
   K = ``--num-samples`` (5000) on ``--num-points`` points (0: all 10,000), as the papers do; with
   ``--ais T`` also by annealed importance sampling (T steps, ``--ais-chains`` chains per point).
3. A row of the table: recipe, epochs, training wall time, device, test ELBO (mean_k log w_k from
   the same draws), test log p(x) ± its standard error over points, Pareto k-hat bands, the
   published log p(x) and the difference (ours - published: negative means worse than the paper).

Writes ``OUT/quality.md`` (the table, also printed), ``OUT/quality.json``, ``OUT/curves.png`` (the
validation objective per epoch of each recipe) and the run folders ``OUT/<recipe>/`` with their
evaluations (``eval-quality-K<K>/``).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import arviz
import matplotlib
import torch
import yaml
from common import add_common_arguments, setup

import pyvae
from pyvae.train.protocol import LABELS, best_epoch, objective_key

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after matplotlib.use("Agg")

PUBLISHED = re.compile(r"^#\s*published log p\(x\):\s*(-?\d+(?:\.\d+)?)\s*$", re.MULTILINE)


def published(recipe: Path) -> float:
    """The paper's test log p(x) that the recipe's header states."""
    found = PUBLISHED.search(recipe.read_text())
    if found is None:
        sys.exit(f"error: {recipe} has no line '# published log p(x): NUMBER' in its header")
    return float(found.group(1))


def child_env(args) -> dict:
    """The environment of a child ``python -m pyvae``: the same pyvae as this one, and as many
    torch threads as ``--threads`` gives this process."""
    source = str(Path(pyvae.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
    }
    # the child's torch threads too: on a shared CPU, more threads than free cores thrash
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def train(recipe: Path, run: Path, args, device) -> float:
    """Train ``recipe`` into ``run`` in a child process (the same pyvae as this one); its wall time
    in seconds."""
    command = [
        sys.executable,
        "-m",
        "pyvae",
        "train",
        "--config",
        str(recipe),
        "--out",
        str(run),
        "--eval-samples",
        "0",
        "--device",
        device.type,
    ]
    command += ["--epochs", str(args.epochs)] if args.epochs else []
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    start = time.perf_counter()
    child = subprocess.Popen(command, env=child_env(args))
    try:
        code = child.wait(timeout=args.hours * 3600 if args.hours else None)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)  # stops after the current step, checkpoint written
        code = child.wait()
        code = 0 if code == 128 + signal.SIGINT else code
    if code != 0:
        sys.exit(f"error: training {recipe} failed with exit code {code}")
    return time.perf_counter() - start


def evaluate(run: Path, args, device) -> dict:
    """The recipe's checkpoint scored on the test set by ``python -m pyvae evaluate`` in a child
    process: its ``eval.json`` (:meth:`pyvae.Evaluation.summary`), and importance sampling's
    log p(x) per point from its ``eval.nc`` (kept beside AIS's when AIS is the headline)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    out = run / f"eval-quality-K{args.num_samples}"
    command = [sys.executable, "-m", "pyvae", "evaluate", str(run), "--split", "test"]
    command += ["--num-samples", str(args.num_samples), "--seed", str(args.seed)]
    command += ["--device", device.type, "--no-download", "--out", str(out)]
    command += ["--checkpoint", "last"] if config.get("eval_checkpoint", "best") != "best" else []
    command += ["--num-points", str(args.num_points)] if args.num_points else []
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    if args.ais:
        command += ["--method", "ais", "--num-steps", str(args.ais)]
        command += ["--num-chains", str(args.ais_chains)]
    code = subprocess.run(command, env=child_env(args)).returncode
    if code != 0:
        sys.exit(f"error: evaluating {run} failed with exit code {code}")
    summary = json.loads((out / "eval.json").read_text())
    points = arviz.from_netcdf(str(out / "eval.nc")).importance_sampling
    log_px_is = torch.from_numpy(points["log_px_is" if args.ais else "log_px"].values).double()
    return {
        **summary,
        "log_px_is": float(log_px_is.mean()),
        "log_px_is_stderr": float(log_px_is.std() / len(log_px_is) ** 0.5),
    }


def row(
    recipe: Path, run: Path, seconds: float, device_name: str, summary: dict, paper: float
) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = run / "metrics.jsonl"
    history = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    )
    key = objective_key(config.get("elbo"), config.get("valid_samples", 0))
    best = best_epoch(history, key)
    which = "last" if config.get("eval_checkpoint") == "last" or best is None else f"best {best[0]}"
    log_px_is, ais = summary["log_px_is"], summary["method"] == "ais"
    return {
        "recipe": recipe.stem,
        "epochs": len(history),
        "evaluated": which,
        "seconds": seconds,
        "device": device_name,
        "test_elbo": summary["elbo"],
        "log_px": log_px_is,
        "log_px_stderr": summary["log_px_is_stderr"],
        "log_px_ais": summary["log_px"] if ais else None,
        "log_px_ais_stderr": summary["log_px_data_stderr"] if ais else None,
        "num_points": summary["num_points"],
        "num_samples": summary["num_samples"],
        "khat_bands": summary["khat_bands"],
        "published": paper,
        "difference": log_px_is - paper,
        "objective": key,
        "curve": [(h["epoch"], h[key]) for h in history if key in h],
    }


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return (
        f"{minutes:.0f} min"
        if minutes < 120
        else f"{int(minutes // 60)} h {minutes % 60:02.0f} min"
    )


def table(rows: list[dict]) -> str:
    ais = any(r["log_px_ais"] is not None for r in rows)
    head = [
        "recipe",
        "epochs (evaluated)",
        "wall time",
        "device",
        "test ELBO",
        "test log p ± SE (IS)",
    ]
    head += ["test log p ± SE (AIS)"] if ais else []
    head += ["k̂ good / ok / bad / very bad", "published", "difference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"`{r['recipe']}`",
            f"{r['epochs']} ({r['evaluated']})",
            duration(r["seconds"]),
            r["device"],
            f"{r['test_elbo']:.2f}",
            f"{r['log_px']:.2f} ± {r['log_px_stderr']:.2f}",
        ]
        if ais:
            cells.append(
                f"{r['log_px_ais']:.2f} ± {r['log_px_ais_stderr']:.2f}"
                if r["log_px_ais"] is not None
                else ""
            )
        bands = " / ".join(f"{100 * v:.0f}%" for v in (r["khat_bands"] or {}).values())
        cells += [bands, f"{r['published']:.2f}", f"{r['difference']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    lines.append("")
    lines.append(
        f"Test log p(x) in nats per image by importance sampling, K = {r['num_samples']}, on "
        f"{r['num_points']} test points (± the standard error over points); difference = ours - "
        "published (negative: worse than the paper)."
    )
    return "\n".join(lines)


def curves(rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["curve"]:
            epochs, values = zip(*r["curve"], strict=True)
            (line,) = axis.plot(epochs, values, label=f"{r['recipe']} ({LABELS[r['objective']]})")
            axis.axhline(r["published"], color=line.get_color(), linestyle="--", linewidth=0.8)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation objective (nats per image)")
    axis.set_title("validation objective per epoch; dashed: published test log p(x)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "recipes", nargs="+", type=Path, help="recipe files, e.g. configs/recipe_*.yaml"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs", type=int, help="train each recipe this many epochs (default: the recipe's)"
    )
    budget.add_argument(
        "--hours", type=float, help="stop each recipe's training after this many hours"
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=5000,
        help="K importance samples per test point (default 5000)",
    )
    parser.add_argument(
        "--num-points", type=int, default=0, help="test points, evenly spread; 0 = all (default)"
    )
    parser.add_argument("--ais", type=int, metavar="T", help="also AIS with T annealing steps")
    parser.add_argument(
        "--ais-chains", type=int, default=16, help="AIS chains per point (default 16)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output folder (default runs/quality-<timestamp>)")
    args = parser.parse_args()
    for name in ("epochs", "hours", "num_samples", "ais", "ais_chains"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive; got {value}")
    if args.num_points < 0:
        parser.error(f"--num-points must be >= 0; got {args.num_points}")
    # every header checked before any training
    papers = {recipe: published(recipe) for recipe in args.recipes}
    device = setup(args)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} of {os.cpu_count()} cores"
    )
    out = args.out or Path(f"runs/quality-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for recipe, paper in papers.items():
        run = out / recipe.stem
        print(f"== {recipe}: training into {run}", flush=True)
        seconds = train(recipe, run, args, device)
        print(f"== {recipe}: evaluating", flush=True)
        rows.append(row(recipe, run, seconds, device_name, evaluate(run, args, device), paper))
        text = table(rows)  # rewritten after every recipe: a long run shows its progress
        (out / "quality.md").write_text(text + "\n")
        (out / "quality.json").write_text(json.dumps(rows, indent=2))
        curves(rows, out / "curves.png")
    print(text)
    print(f"wrote {out}/quality.md, quality.json, curves.png")


if __name__ == "__main__":
    main()
