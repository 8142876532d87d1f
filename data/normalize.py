"""Normalizers built from data/stats.py statistics, with exact inverses for the policy.

quantile (openpi): y = (x - q01) / (q99 - q01 + eps) * 2 - 1   maps [q01, q99] to [-1, 1]
meanstd:          y = (x - mean) / (std + eps)
Values are NOT clipped (as in openpi): clipping would make unnormalize lossy and the rare
out-of-range values are real data. eps keeps constant dims finite (they map to -1 or 0).

Arrays may be padded beyond the dataset's D dims (model.state_dim / action_dim): only the first
D dims of the last axis are transformed, padding passes through unchanged.
"""
import dataclasses

import numpy as np

EPS = 1e-6
MODES = ("quantile", "meanstd")


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """y = (x - shift) / scale on the first D dims of the last axis; any leading shape."""

    shift: np.ndarray  # f32 [D]
    scale: np.ndarray  # f32 [D]

    @classmethod
    def from_stats(cls, stats: dict, mode: str) -> "Normalizer":
        """stats: one array's entry of stats.json ({"mean", "std", "q01", "q99", ...})."""
        if mode == "quantile":
            q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
            # (x - q01) / (q99 - q01 + eps) * 2 - 1 == (x - shift) / scale with:
            scale = (q99 - q01 + EPS) / 2
            return cls((q01 + scale).astype(np.float32), scale.astype(np.float32))
        if mode == "meanstd":
            return cls(np.asarray(stats["mean"], np.float32),
                       (np.asarray(stats["std"], np.float64) + EPS).astype(np.float32))
        raise ValueError(f"unknown normalization {mode!r}; expected one of {MODES}")

    @property
    def dim(self) -> int:
        return len(self.shift)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, lambda v: (v - self.shift) / self.scale)

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        return self._apply(y, lambda v: v * self.scale + self.shift)

    def _apply(self, x: np.ndarray, fn) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape[-1] < self.dim:
            raise ValueError(f"array has {x.shape[-1]} dims, statistics have {self.dim}")
        out = x.copy()
        out[..., :self.dim] = fn(x[..., :self.dim])
        return out


def normalizers(stats: dict, mode: str) -> dict[str, Normalizer]:
    """{"state": Normalizer, "actions": Normalizer} from a dataset's stats.json contents."""
    return {k: Normalizer.from_stats(stats[k], mode) for k in ("state", "actions")}
