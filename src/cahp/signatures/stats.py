"""Streaming per-group mean and variance, accumulated batch by batch (never storing the samples).

Used for the per-(class, head) statistics of attention signatures: values ``[batch, heads, D]`` and class
labels ``[batch]`` are folded into ``count/mean/M2`` accumulators of shape ``[classes, heads, D]`` with
Chan et al.'s parallel merge, in float64.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from cahp.errors import CahpError
from cahp.outputs import atomic_save_npz

ArrayLike = torch.Tensor | np.ndarray


class StreamingMoments:
    """Per-group streaming mean and variance over a fixed feature shape.

    ``__init__`` only stores settings; the accumulators are allocated on the first ``add_batch``, whose
    ``values.shape[1:]`` fixes the feature shape (``[D]`` or ``[heads, D]`` or any other).

    Args:
        n_groups: number of groups (e.g. classes). Group ids passed to ``add_batch`` lie in
            ``[0, n_groups)``.
        device: where the float64 accumulators live; ``None`` means the device of the first batch.

    Attributes (after the first batch):
        count_: ``[n_groups]`` int64, samples seen per group.
        mean_: ``[n_groups, *feature_shape]`` float64 numpy array (NaN where a group has no samples).
        m2_: ``[n_groups, *feature_shape]`` float64, sum of squared deviations from the mean.
        var_: population variance ``M2 / count`` (ddof=0, what Welford's recurrence gives directly;
            NaN where count is 0). Use :meth:`variance` with ``ddof=1`` for the sample variance that the
            reference implementation feeds into the Bhattacharyya distance.
    """

    def __init__(self, n_groups: int, *, device: str | torch.device | None = None) -> None:
        self.n_groups = n_groups
        self.device = device

    # ------------------------------------------------------------------ accumulation
    def _allocate(self, feature_shape: tuple[int, ...], device: torch.device) -> None:
        if self.n_groups < 1:
            raise CahpError(f"StreamingMoments needs n_groups >= 1, got {self.n_groups}.")
        self._count = torch.zeros(self.n_groups, dtype=torch.int64, device=device)
        self._mean = torch.zeros((self.n_groups, *feature_shape), dtype=torch.float64, device=device)
        self._m2 = torch.zeros_like(self._mean)

    @property
    def is_fitted(self) -> bool:
        """Whether at least one batch (or a saved state) has been loaded."""
        return hasattr(self, "_count")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        self._check_fitted()
        return tuple(self._mean.shape[1:])

    def add_batch(self, values: ArrayLike, group_index: ArrayLike | int) -> StreamingMoments:
        """Fold a batch of samples into the running statistics.

        Args:
            values: ``[n, *feature_shape]`` samples, e.g. ``[batch, heads, D]`` attention signatures.
            group_index: ``[n]`` integer group of each sample (e.g. its class label), or one int for all.

        Returns:
            self.
        """
        values_t = torch.as_tensor(values)
        if values_t.ndim < 1:
            raise CahpError("add_batch needs values of shape [n, *feature_shape]; got a scalar.")
        n = values_t.shape[0]
        if isinstance(group_index, int | np.integer):
            groups_t = torch.full((n,), int(group_index), dtype=torch.int64)
        else:
            groups_t = torch.as_tensor(group_index).reshape(-1).to(torch.int64)
        if groups_t.shape[0] != n:
            raise CahpError(f"add_batch got {n} samples but {groups_t.shape[0]} group indices.")
        if not self.is_fitted:
            device = torch.device(self.device) if self.device is not None else values_t.device
            self._allocate(tuple(values_t.shape[1:]), device)
        if tuple(values_t.shape[1:]) != self.feature_shape:
            raise CahpError(
                f"add_batch got samples of feature shape {tuple(values_t.shape[1:])}, "
                f"expected {self.feature_shape} (fixed by the first batch)."
            )
        if n == 0:
            return self
        if int(groups_t.min()) < 0 or int(groups_t.max()) >= self.n_groups:
            raise CahpError(
                f"group indices must lie in [0, {self.n_groups}); got range "
                f"[{int(groups_t.min())}, {int(groups_t.max())}]. Check the label column / n_groups."
            )
        device = self._mean.device
        x = values_t.to(device=device, dtype=torch.float64)
        g = groups_t.to(device)
        batch_count = torch.bincount(g, minlength=self.n_groups)
        batch_sum = torch.zeros_like(self._mean).index_add_(0, g, x)
        batch_mean = batch_sum / _expand(batch_count.clamp(min=1), x.ndim)
        deviation = x - batch_mean[g]
        batch_m2 = torch.zeros_like(self._m2).index_add_(0, g, deviation * deviation)
        self._merge_arrays(batch_count, batch_mean, batch_m2)
        return self

    def _merge_arrays(self, count_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al. parallel merge of (count_b, mean_b, m2_b) into the accumulators."""
        count_a = self._count
        total = count_a + count_b
        ndim = self._mean.ndim
        safe_total = _expand(total.clamp(min=1).to(torch.float64), ndim)
        weight_b = _expand(count_b.to(torch.float64), ndim) / safe_total
        cross = _expand((count_a * count_b).to(torch.float64), ndim) / safe_total
        delta = mean_b - self._mean
        self._mean = self._mean + delta * weight_b
        self._m2 = self._m2 + m2_b + delta * delta * cross
        self._count = total

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold another accumulator (same n_groups and feature shape) into this one; returns self."""
        if not other.is_fitted:
            return self
        if other.n_groups != self.n_groups:
            raise CahpError(f"cannot merge StreamingMoments with {other.n_groups} groups into {self.n_groups}.")
        if not self.is_fitted:
            self._allocate(
                other.feature_shape, other._mean.device if self.device is None else torch.device(self.device)
            )
        if other.feature_shape != self.feature_shape:
            raise CahpError(f"cannot merge feature shape {other.feature_shape} into {self.feature_shape}.")
        device = self._mean.device
        self._merge_arrays(other._count.to(device), other._mean.to(device), other._m2.to(device))
        return self

    # ------------------------------------------------------------------ results
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise CahpError("StreamingMoments has no data yet: call add_batch (or load) first.")

    @property
    def count_(self) -> np.ndarray:
        self._check_fitted()
        return self._count.cpu().numpy().copy()

    @property
    def mean_(self) -> np.ndarray:
        self._check_fitted()
        mean = self._mean.cpu().numpy().copy()
        mean[self.count_ == 0] = np.nan
        return mean

    @property
    def m2_(self) -> np.ndarray:
        self._check_fitted()
        return self._m2.cpu().numpy().copy()

    @property
    def var_(self) -> np.ndarray:
        return self.variance(ddof=0)

    def variance(self, ddof: int = 0) -> np.ndarray:
        """``M2 / (count - ddof)`` per group and feature; NaN where ``count <= ddof``.

        Returns:
            ``[n_groups, *feature_shape]`` float64.
        """
        self._check_fitted()
        count = self._count.cpu().numpy()
        m2 = self._m2.cpu().numpy()
        denominator = (count - ddof).astype(np.float64)
        shape = (-1,) + (1,) * (m2.ndim - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            var = m2 / denominator.reshape(shape)
        var[count <= ddof] = np.nan
        # M2 can only be negative through rounding; clip so downstream logs/sqrts stay finite.
        return np.maximum(var, 0.0, where=~np.isnan(var), out=var)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings needed to resume: ``n_groups``, ``count``, ``mean``, ``m2`` (CPU)."""
        self._check_fitted()
        return {
            "n_groups": self.n_groups,
            "count": self._count.cpu().clone(),
            "mean": self._mean.cpu().clone(),
            "m2": self._m2.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> StreamingMoments:
        """Restore a state produced by :meth:`state_dict`; returns self."""
        n_groups = int(state["n_groups"])
        if n_groups != self.n_groups:
            raise CahpError(f"saved statistics have {n_groups} groups, this accumulator {self.n_groups}.")
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        device = torch.device(self.device) if self.device is not None else mean.device
        self._count = torch.as_tensor(state["count"], dtype=torch.int64).to(device)
        self._mean = mean.to(device)
        self._m2 = torch.as_tensor(state["m2"], dtype=torch.float64).to(device)
        if self._count.shape != (n_groups,) or self._mean.shape != self._m2.shape:
            raise CahpError("saved statistics are inconsistent: count/mean/m2 shapes do not match.")
        return self

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to an ``.npz`` file (uncompressed, float64), atomically (temporary file + rename):
        a run killed while saving leaves the earlier file or none, never a truncated one."""
        state = self.state_dict()
        atomic_save_npz(
            path,
            n_groups=np.int64(state["n_groups"]),
            count=state["count"].numpy(),
            mean=state["mean"].numpy(),
            m2=state["m2"].numpy(),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> StreamingMoments:
        """Read a state written by :meth:`save`."""
        with np.load(path) as data:
            state = {key: data[key] for key in ("n_groups", "count", "mean", "m2")}
        moments = cls(int(state["n_groups"]), device=device)
        return moments.load_state_dict({k: (torch.from_numpy(v) if k != "n_groups" else v) for k, v in state.items()})

    def __repr__(self) -> str:
        shape = self.feature_shape if self.is_fitted else "unset"
        return f"StreamingMoments(n_groups={self.n_groups}, feature_shape={shape})"


def _expand(per_group: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a ``[n_groups]`` tensor to broadcast against ``[n_groups, *feature_shape]``."""
    return per_group.reshape((-1,) + (1,) * (ndim - 1))
