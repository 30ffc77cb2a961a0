"""The one shape of inference's results: ``summary()`` (the numbers, JSON-ready), ``table()`` (the
same in words, for a terminal) and ``write(folder)`` (``<name>.json``, plus the per-point values
as an arviz InferenceData ``<name>.nc`` where a result has them), every file written atomically
(:mod:`pyvae.runs.files`).

Errors of means over N points: the Monte Carlo error of the mean of per-point estimates with
errors se_i is sqrt(sum_i se_i^2) / N; the spread over the data, std_i(v_i) / sqrt(N).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import ClassVar

import arviz
import torch
import xarray

from pyvae.runs import atomic_write, write_json

#: a difference within this many standard errors of zero is not told from noise
NOISE_SES = 2.0


class Report:
    """What :func:`~pyvae.evaluate`, AIS, BDMC and the gap decomposition return.

    A subclass gives ``name`` (the JSON file's stem), :meth:`summary` and :meth:`table`, and
    :meth:`inference_data` when it has per-point values (written as ``netcdf``)."""

    name: ClassVar[str]
    netcdf: ClassVar[str] = "eval.nc"

    def summary(self) -> dict:
        raise NotImplementedError

    def table(self) -> str:
        raise NotImplementedError

    def inference_data(self) -> arviz.InferenceData | None:
        """The per-point values, or None."""
        return None

    def write(self, folder: str | Path) -> list[str]:
        """``<name>.json`` (the summary) and ``netcdf`` (:meth:`inference_data`, if any) in
        ``folder``, made if missing; the names of the files written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{self.name}.json", self.summary())
        idata = self.inference_data()
        if idata is None:
            return [f"{self.name}.json"]
        write_netcdf(idata, folder / self.netcdf)
        return [f"{self.name}.json", self.netcdf]


def inference_data(group: str, data: dict, attrs: dict) -> arviz.InferenceData:
    """One group ``group`` of ``data`` {name: xarray.DataArray}, with ``attrs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our group names are not among arviz's standard ones
        return arviz.InferenceData(**{group: xarray.Dataset(data, attrs=attrs)})


def write_netcdf(idata: arviz.InferenceData, path: Path) -> None:
    """``idata`` as netCDF at ``path``, atomically (netCDF writes to a named file: written there,
    then copied into place)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        local = Path(tmp) / path.name
        idata.to_netcdf(str(local))
        atomic_write(path, lambda f: f.write(local.read_bytes()))


def mc_stderr(stderr: torch.Tensor) -> float:
    """sqrt(sum_i se_i^2) / N: the Monte Carlo error of a mean over N points."""
    return float(stderr.double().pow(2).sum().sqrt() / len(stderr))


def data_stderr(values: torch.Tensor) -> float:
    """std_i(v_i) / sqrt(N): the error of a mean as an estimate over the data distribution."""
    n = len(values)
    return float(values.double().std() / math.sqrt(n)) if n > 1 else math.nan


def within_noise(value: float, stderr: float, what: str, hint: str) -> str | None:
    """Words for an estimate of a quantity >= 0 that cannot be told from zero: within
    :data:`NOISE_SES` standard errors of 0, or negative; None when it can."""
    if not (value < 0 or abs(value) <= NOISE_SES * stderr):
        return None
    where = (
        f"lies within {NOISE_SES:g} standard errors (± {stderr:.3f}) of 0"
        if abs(value) <= NOISE_SES * stderr
        else f"is negative beyond {NOISE_SES:g} standard errors (± {stderr:.3f}), as it cannot be"
    )
    return f"within noise: {what} {value:.3f} {where}; {hint}"


def stderr_of_mean(values: torch.Tensor, stderr: torch.Tensor) -> float:
    """The error of a mean of per-point differences: their spread over points when there are
    two or more, else the Monte Carlo error ``stderr`` of the one."""
    spread = data_stderr(values)
    return spread if math.isfinite(spread) else mc_stderr(stderr)
