"""The training protocol around the SVI loop: the validation objective, early stopping and
learning-rate schedules (what papers' protocols need besides the loss).

**Validation objective** V_e, after epoch e, on held-out data (higher is better, nats per point):
the IS estimate (1/N) sum_n log (1/K) sum_k p(x_n, z_k)/q(z_k|x_n) with ``valid_samples`` = K when
asked for (``valid_log_px``), else the K-sample IWAE bound when training on it (``valid_iwae``),
else the ELBO (``valid_elbo``, beta = 1).

**Early stopping** with patience P: training stops after epoch e once the best V so far,
V_{e*} = max_{e' <= e} V_{e'} (the earliest on ties), is P or more epochs old: e - e* >= P.
Everything it needs is in the history of V, so a resumed run stops where an uninterrupted one does.

**Schedules**: the learning rate of epoch e = 1, 2, ..., E for a base rate eta:

=========  ==================================================================================
none       eta
iwae       eta * 10^(-i/7) in stage i = 0, ..., 7, stage i lasting 3^i epochs (3280 in all; the
           last stage's rate after that): Burda et al. (2016)'s schedule with eta = 1e-3
plateau    eta, halved whenever V has gone 6 epochs in a row without a strict improvement
           (torch's ``ReduceLROnPlateau``, mode max, patience 5: it waits 5 epochs, acts on the 6th)
cosine     eta * (1 + cos(pi (e - 1) / E)) / 2 over the E epochs of the run (``CosineAnnealingLR``)
=========  ==================================================================================

All are torch schedulers stepped once per epoch; their state goes into the checkpoint, and
resuming with another schedule (or a cosine over another number of epochs) is an error.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pyvae.errors import PyvaeError, positive_int

SCHEDULES = ("none", "iwae", "plateau", "cosine")
#: Burda et al.'s stages: i = 0, ..., 7, stage i lasting 3^i epochs at 10^(-i/7) times the base rate
IWAE_STAGES = 8
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 5

#: how the validation objectives read in the epoch line
LABELS = {"valid_elbo": "ELBO", "valid_iwae": "IWAE bound", "valid_log_px": "log p(x) (IS)"}


def check(
    patience: int | None, lr_schedule: str, has_validation: bool, hint: str = "pass valid= to fit"
) -> None:
    """One-line errors for a schedule that does not exist and for settings that need validation data
    without it (``hint`` says where validation data comes from)."""
    if lr_schedule not in SCHEDULES:
        raise PyvaeError(f"unknown lr_schedule {lr_schedule!r}; choose from {', '.join(SCHEDULES)}")
    if patience is not None:
        positive_int("patience", patience)
    needs = [f"patience {patience}"] if patience is not None else []
    needs += [f"lr_schedule {lr_schedule!r}"] if lr_schedule == "plateau" else []
    if needs and not has_validation:
        raise PyvaeError(f"{' and '.join(needs)} needs validation data and there is none: {hint}")


def objective_key(elbo, valid_samples: int) -> str:
    """The record key of the validation objective (see the module's docstring)."""
    if valid_samples:
        return "valid_log_px"
    return "valid_iwae" if elbo == "iwae" else "valid_elbo"


def best_epoch(history: list[dict], key: str) -> tuple[int, float] | None:
    """(epoch, value) of the highest ``key`` in ``history``, the earliest on ties; None before
    any."""
    scored = [(h[key], -h["epoch"]) for h in history if key in h and math.isfinite(h[key])]
    if not scored:
        return None
    value, minus_epoch = max(scored)
    return -minus_epoch, value


def stalled(history: list[dict], key: str, patience: int | None) -> bool:
    """Whether early stopping with ``patience`` ends training after the last epoch of
    ``history``."""
    best = best_epoch(history, key) if patience else None
    return best is not None and history[-1]["epoch"] - best[0] >= patience


def iwae_stage(epoch_index: int) -> int:
    """The stage i of Burda et al.'s schedule that epoch ``epoch_index`` (0-based) is in: stage i
    covers epochs sum_{j<i} 3^j to sum_{j<=i} 3^j - 1; after the last stage, the last."""
    stage, end = 0, 1
    while epoch_index >= end and stage < IWAE_STAGES - 1:
        stage += 1
        end += 3**stage
    return stage


def iwae_factor(epoch_index: int) -> float:
    """10^(-i/7) for the stage i of the epoch: the learning rate relative to the base rate."""
    return 10 ** (-iwae_stage(epoch_index) / 7)


class Schedule:
    """The learning-rate schedule ``name`` of ``optimizer`` over a run of ``epochs`` epochs.

    Build it before loading an optimizer state (torch's schedulers set the rate when built),
    :meth:`step` it once after every epoch with the validation objective, and keep
    :meth:`state_dict` in the checkpoint.
    """

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, epochs: int) -> None:
        check(None, name, True)
        self.name, self.epochs, self.optimizer = name, epochs, optimizer
        schedulers = torch.optim.lr_scheduler
        if name == "iwae":
            self.scheduler = schedulers.LambdaLR(optimizer, iwae_factor)
        elif name == "plateau":
            self.scheduler = schedulers.ReduceLROnPlateau(
                optimizer,
                mode="max",
                factor=PLATEAU_FACTOR,
                patience=PLATEAU_PATIENCE,
                threshold=0.0,
                threshold_mode="abs",
            )
        elif name == "cosine":
            self.scheduler = schedulers.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            self.scheduler = None

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, objective: float | None) -> None:
        """Move to the next epoch's rate; ``objective`` is the validation objective of the epoch
        just done."""
        if self.name == "plateau":
            self.scheduler.step(objective)
        elif self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "epochs": self.epochs,
            "state": self.scheduler.state_dict() if self.scheduler else None,
        }

    def load_state_dict(self, saved: dict | None, path: str | Path) -> None:
        """Continue the schedule saved at ``path``; a different one is an error (it would change
        the run mid-way)."""
        saved = saved or {
            "name": "none",
            "epochs": None,
            "state": None,
        }  # written before schedules existed
        if saved["name"] != self.name:
            raise PyvaeError(
                f"{path} was trained with lr_schedule {saved['name']!r}; resuming it with "
                f"{self.name!r} would change the schedule mid-run: resume with lr_schedule "
                f"{saved['name']!r}, or start a new run"
            )
        if self.name == "cosine" and saved["epochs"] != self.epochs:
            raise PyvaeError(
                f"{path} anneals its cosine lr_schedule over {saved['epochs']} epochs; resuming it "
                f"with epochs {self.epochs} would change the schedule mid-run: resume with epochs "
                f"{saved['epochs']}, or start a new run"
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["state"])
