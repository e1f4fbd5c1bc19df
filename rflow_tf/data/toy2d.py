"""The 2-D toy densities of the Residual Flows paper, generated with numpy from a seed."""

from __future__ import annotations

from typing import Optional

import numpy as np

from rflow_tf.data._checks import check_positive_int, check_seed

#: Names accepted by `toy_2d`.
TOY_DATASETS = (
    'swissroll',
    '8gaussians',
    'pinwheel',
    'circles',
    'moons',
    '2spirals',
    'checkerboard',
    'rings',
)


def _split_counts(n: int, k: int) -> np.ndarray:
    """k non-negative counts summing to n, as equal as possible."""
    counts = np.full(k, n // k, dtype=np.int64)
    counts[: n % k] += 1
    return counts


def _toy_swissroll(n, rng):
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    x = t * np.cos(t)
    z = t * np.sin(t)
    pts = np.stack([x, z], axis=1) + 1.0 * rng.standard_normal((n, 2))
    return pts / 5.0


def _toy_circles(n, rng):
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0.0, 2 * np.pi, n_out, endpoint=False)
    t_in = np.linspace(0.0, 2 * np.pi, n_in, endpoint=False)
    pts = np.concatenate(
        [
            np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
            0.5 * np.stack([np.cos(t_in), np.sin(t_in)], axis=1),
        ]
    )
    pts = pts[rng.permutation(n)] + 0.08 * rng.standard_normal((n, 2))
    return 3.0 * pts


def _toy_rings(n, rng):
    counts = _split_counts(n, 4)
    radii = (1.0, 0.75, 0.5, 0.25)
    parts = []
    for m, r in zip(counts, radii):
        t = np.linspace(0.0, 2 * np.pi, m, endpoint=False)
        parts.append(r * np.stack([np.cos(t), np.sin(t)], axis=1))
    pts = 3.0 * np.concatenate(parts)
    pts = pts[rng.permutation(n)]
    return pts + 0.08 * rng.standard_normal((n, 2))


def _toy_moons(n, rng):
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0.0, np.pi, n_out)
    t_in = np.linspace(0.0, np.pi, n_in)
    pts = np.concatenate(
        [
            np.stack([np.cos(t_out), np.sin(t_out)], axis=1),
            np.stack([1.0 - np.cos(t_in), 1.0 - np.sin(t_in) - 0.5], axis=1),
        ]
    )
    pts = pts[rng.permutation(n)] + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * pts + np.array([-1.0, -0.2])


def _toy_8gaussians(n, rng):
    s = 1.0 / np.sqrt(2.0)
    centers = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    idx = rng.integers(0, 8, size=n)
    pts = 0.5 * rng.standard_normal((n, 2)) + centers[idx]
    return pts / 1.414


def _toy_pinwheel(n, rng):
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0.0, 2 * np.pi, num_classes, endpoint=False)
    labels = np.repeat(np.arange(num_classes), _split_counts(n, num_classes))
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = rads[labels] + rate * np.exp(feats[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    # Row vector times rotation [[cos, -sin], [sin, cos]].
    pts = np.stack(
        [feats[:, 0] * cos + feats[:, 1] * sin, -feats[:, 0] * sin + feats[:, 1] * cos], axis=1
    )
    return 2.0 * pts[rng.permutation(n)]


def _toy_2spirals(n, rng):
    n1 = n // 2
    n2 = n - n1
    m = max(n1, n2)
    t = np.sqrt(rng.random((m, 1))) * 540.0 * (2 * np.pi) / 360.0
    d1x = -np.cos(t) * t + rng.random((m, 1)) * 0.5
    d1y = np.sin(t) * t + rng.random((m, 1)) * 0.5
    arm = np.hstack([d1x, d1y])
    pts = np.vstack([arm[:n1], -arm[:n2]]) / 3.0
    pts = pts + 0.1 * rng.standard_normal(pts.shape)
    return pts[rng.permutation(n)]


def _toy_checkerboard(n, rng):
    x1 = rng.random(n) * 4.0 - 2.0
    x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


_TOY_FNS = {
    'swissroll': _toy_swissroll,
    '8gaussians': _toy_8gaussians,
    'pinwheel': _toy_pinwheel,
    'circles': _toy_circles,
    'moons': _toy_moons,
    '2spirals': _toy_2spirals,
    'checkerboard': _toy_checkerboard,
    'rings': _toy_rings,
}


def toy_2d(name: str, n: int, seed: Optional[int] = None) -> np.ndarray:
    """Samples `n` points from a 2-D toy density of the Residual Flows paper.

    The densities follow the FFJORD / Residual Flows toy data (re-implemented
    here with numpy, no scikit-learn):

    * `swissroll`: `t ~ 1.5 pi (1 + 2 U)`, point `(t cos t, t sin t) + N(0, 1)`,
      divided by 5 (sklearn `make_swiss_roll(noise=1)[:, [0, 2]] / 5`).
    * `8gaussians`: `N(c_k, 0.5^2 I) / 1.414` with 8 centres `c_k` evenly on
      the circle of radius 4.
    * `pinwheel`: 5 arms; radial `N(1, 0.3^2)`, tangential `N(0, 0.1^2)`,
      rotated by `2 pi k / 5 + 0.25 exp(radial)`, times 2.
    * `circles`: two concentric circles (radii 1, 0.5) + `N(0, 0.08^2)`,
      times 3 (sklearn `make_circles(factor=.5, noise=.08) * 3`).
    * `moons`: two interleaved half-circles + `N(0, 0.1^2)`, then
      `2 x + (-1, -0.2)` (sklearn `make_moons(noise=.1)`).
    * `2spirals`: two opposite spiral arms `t in [0, 3 pi]` (sqrt-uniform),
      `(-t cos t, t sin t) + U[0, .5)^2`, divided by 3, + `N(0, 0.1^2)`.
    * `checkerboard`: uniform on alternating unit squares of `[-2, 2]^2`,
      times 2 (support `[-4, 4]^2`).
    * `rings`: four concentric circles (radii 3, 2.25, 1.5, 0.75) +
      `N(0, 0.08^2)`.

    Args:
      name: One of `TOY_DATASETS`.
      n: Positive number of samples (exactly `n` rows are returned).
      seed: Optional int for `np.random.default_rng`; same seed, same data.

    Returns:
      `np.ndarray` of shape `[n, 2]`, dtype `float32`, in random order.

    Raises:
      ValueError: unknown `name` (lists the valid names) or non-positive `n`.

    #### Examples

    ```python
    x = toy_2d('pinwheel', 1000, seed=0)    # float32 [1000, 2]
    x.std(0)                                # about 2 in each coordinate
    ```
    """
    if not isinstance(name, str) or name.strip().lower() not in _TOY_FNS:
        raise ValueError(f'Unknown toy dataset {name!r}. Valid names: {", ".join(TOY_DATASETS)}.')
    n = check_positive_int(n, 'n')
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    pts = _TOY_FNS[name.strip().lower()](n, rng)
    return np.asarray(pts, dtype=np.float32).reshape(n, 2)
