"""Seeded orthogonal rotations: random orthogonal, randomized Hadamard, Kac walk.

Why rotate: a random rotation spreads a vector's energy evenly over its
coordinates (each coordinate of a rotated unit vector follows the same
Beta-shaped law), which is what RaBitQ's and TurboQuant's error bounds
assume and what makes outlier weights quantizable (QuaRot, QuIP#).

Every rotation is a function of (kind, dim, seed[, rounds]): ``state()``
gives those, ``from_state`` rebuilds the same matrix bit for bit, so files
store a seed, never a matrix. ``apply`` maps rows x -> x R^T, ``inverse``
maps them back; R R^T = I to float rounding.

Kinds
    orthogonal  Haar-random: QR of a Gaussian matrix with the signs of R's
                diagonal moved into Q (Mezzadri, "How to generate random
                matrices from the classical compact groups", 2007), O(d^2) apply.
    hadamard    randomized Hadamard H D / sqrt(d), D random signs, applied in
                O(d log d) by the fast Walsh-Hadamard transform. d = 2^k, or
                d = 2^k * m with a known Hadamard matrix of order m (12, 20, 28,
                36, ... from Paley's constructions) as the Kronecker product
                H_{2^k} (x) H_m (QuaRot's construction for sizes such as
                576 = 16 * 36 and 1536 = 128 * 12). Other d: ``pad=True`` (vector
                codecs only) zero-pads to the next such size, and apply returns
                the longer vectors; a model's residual stream can never be
                padded, so without pad such a d is refused.
    kac         Kac's random walk, in rounds: each round pairs all coordinates
                by a random perfect matching and turns each pair by a random
                angle (a Givens rotation); 4 log2(d) rounds (the default; 2 log2(d)
                measurably do not, tests/test_rotation.py) mix like a random
                rotation for codec purposes, O(d log d) apply.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np

from qkit.errors import UsageError

KINDS = ("orthogonal", "hadamard", "kac")


# ------------------------------------------------------------------ Hadamard matrices
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) over GF(q), q prime: chi the quadratic character (0, 1 for squares, -1 otherwise)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


@lru_cache(maxsize=None)
def paley_hadamard(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from Paley's constructions with a prime q, or None.

    Paley I: q = m - 1 prime, q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]].
    Paley II: q = m/2 - 1 prime, q = 1 mod 4: replace the entries of
    [[0, 1^T], [1, Q]] by [[1, -1], [-1, -1]] (zero) and +-[[1, 1], [1, -1]].
    (Paley, "On orthogonal matrices", J. Math. Phys. 1933.)"""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        Q = _jacobsthal(q)
        S = np.zeros((m, m), np.int64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        H = S + np.eye(m, dtype=np.int64)
        return H.astype(np.float64)
    if m % 2 == 0:
        q = m // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            Q = _jacobsthal(q)
            C = np.zeros((q + 1, q + 1), np.int64)
            C[0, 1:] = 1
            C[1:, 0] = 1
            C[1:, 1:] = Q
            zero = np.array([[1, -1], [-1, -1]])
            one = np.array([[1, 1], [1, -1]])
            H = np.block([[zero if c == 0 else c * one for c in row] for row in C])
            return H.astype(np.float64)
    return None


def hadamard_factor(d: int) -> tuple[int, int] | None:
    """(2^k, m) with d = 2^k * m and a Hadamard matrix of order m known (m = 1 or Paley), largest 2^k first."""
    k = (d & -d)   # the largest power of two dividing d
    while k >= 1:
        m = d // k
        if m == 1 or (m > 2 and paley_hadamard(m) is not None):
            return k, m
        k //= 2
    return None


def fwht(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform along axis (length a power of two), O(n log n)."""
    x = np.moveaxis(np.array(x, dtype=np.float64 if x.dtype == np.float64 else np.float32), axis, -1)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    y = x.reshape(-1, n)
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack([a + b, a - b], axis=2)
        h *= 2
    return np.moveaxis(y.reshape(lead + (n,)), -1, axis)


# ------------------------------------------------------------------ rotations
class Rotation(ABC):
    """x -> x R^T for rows x of length dim_in (dim_out >= dim_in only for a padded Hadamard)."""

    kind: str

    def __init__(self, dim: int, seed: int = 0):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise UsageError(f"rotation dimension must be a positive integer, got {dim!r}")
        self.dim_in = int(dim)
        self.dim_out = int(dim)
        self.seed = int(seed)

    @abstractmethod
    def apply(self, X: np.ndarray) -> np.ndarray:
        """Rows x -> x R^T."""

    @abstractmethod
    def inverse(self, Y: np.ndarray) -> np.ndarray:
        """Rows y -> y R (the inverse of apply)."""

    def matrix(self) -> np.ndarray:
        """R as a dense (dim_out, dim_in) float64 matrix (for tests and for folding into weights)."""
        return self.apply(np.eye(self.dim_in)).T

    def state(self) -> dict:
        return {"kind": self.kind, "dim": self.dim_in, "seed": self.seed}

    def _rows(self, X, n: int) -> tuple[np.ndarray, bool]:
        X = np.asarray(X)
        one = X.ndim == 1
        X2 = X[None, :] if one else X
        if X2.ndim != 2 or X2.shape[1] != n:
            raise UsageError(f"{self.kind} rotation expects rows of {n} values, got shape {X.shape}")
        dt = np.float64 if X2.dtype == np.float64 else np.float32
        return X2.astype(dt, copy=False), one

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state()})"


class RandomOrthogonal(Rotation):
    kind = "orthogonal"

    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim, seed)
        rng = np.random.default_rng([0x51, self.seed, self.dim_in])
        A = rng.standard_normal((self.dim_in, self.dim_in))
        Q, R = np.linalg.qr(A)
        self.R = Q * np.where(np.diag(R) < 0, -1.0, 1.0)[None, :]   # Haar measure: fix the signs

    def apply(self, X):
        X, one = self._rows(X, self.dim_in)
        Y = (X @ self.R.T.astype(X.dtype))
        return Y[0] if one else Y

    def inverse(self, Y):
        Y, one = self._rows(Y, self.dim_out)
        X = Y @ self.R.astype(Y.dtype)
        return X[0] if one else X

    def matrix(self):
        return self.R.copy()


class RandomizedHadamard(Rotation):
    kind = "hadamard"

    def __init__(self, dim: int, seed: int = 0, *, pad: bool = False):
        super().__init__(dim, seed)
        f = hadamard_factor(self.dim_in)
        if f is None:
            if not pad:
                raise UsageError(f"no Hadamard matrix of order {self.dim_in} is known here (d = 2^k * m with m "
                                 f"in 1, 12, 20, 28, 36, ...); pad=True zero-pads a vector codec's input")
            n = self.dim_in
            while hadamard_factor(n) is None or hadamard_factor(n)[1] > 64:
                n += 1
            f = hadamard_factor(n)
        self.pow2, self.m = f
        self.dim_out = self.pow2 * self.m
        self.pad = self.dim_out != self.dim_in
        rng = np.random.default_rng([0x4AD, self.seed, self.dim_in])
        self.signs = np.where(rng.random(self.dim_out) < 0.5, -1.0, 1.0)
        self.Hm = paley_hadamard(self.m) if self.m > 1 else None
        self.norm = 1.0 / math.sqrt(self.dim_out)

    def _H(self, Z: np.ndarray) -> np.ndarray:
        """(H_{2^k} (x) H_m) z for rows z, unnormalized: index i = a * m + b."""
        n = len(Z)
        Z = Z.reshape(n, self.pow2, self.m)
        if self.Hm is not None:
            Z = Z @ self.Hm.T.astype(Z.dtype)
        Z = fwht(Z, axis=1)
        return Z.reshape(n, self.dim_out)

    def apply(self, X):
        X, one = self._rows(X, self.dim_in)
        if self.pad:
            X = np.concatenate([X, np.zeros((len(X), self.dim_out - self.dim_in), X.dtype)], axis=1)
        Y = self._H(X * self.signs.astype(X.dtype)) * X.dtype.type(self.norm)
        return Y[0] if one else Y

    def inverse(self, Y):
        Y, one = self._rows(Y, self.dim_out)
        # (H D / s)^-1 = D H^T / s, and the Kronecker product's transpose is H_{2^k} (x) H_m^T
        n = len(Y)
        Z = Y.reshape(n, self.pow2, self.m)
        if self.Hm is not None:
            Z = Z @ self.Hm.astype(Z.dtype)
        X = fwht(Z, axis=1).reshape(n, self.dim_out) * self.signs.astype(Y.dtype) * Y.dtype.type(self.norm)
        X = X[:, : self.dim_in]
        return X[0] if one else X

    def matrix(self):
        return self.apply(np.eye(self.dim_in)).T

    def state(self):
        return dict(super().state(), pad=self.pad)


class KacWalk(Rotation):
    kind = "kac"

    def __init__(self, dim: int, seed: int = 0, *, rounds: int | None = None):
        super().__init__(dim, seed)
        d = self.dim_in
        self.rounds = int(rounds) if rounds is not None else 4 * max(1, math.ceil(math.log2(max(d, 2))))
        rng = np.random.default_rng([0x4AC, self.seed, d])
        self.pairs, self.angles = [], []
        for _ in range(self.rounds):
            perm = rng.permutation(d)
            h = d // 2
            self.pairs.append((perm[:h], perm[h: 2 * h]))   # odd d: one coordinate sits the round out
            self.angles.append(rng.uniform(0, 2 * np.pi, h))

    def _walk(self, X, sign: float, order):
        X = X.copy()
        for r in order:
            i, j = self.pairs[r]
            c, s = np.cos(self.angles[r]).astype(X.dtype), (sign * np.sin(self.angles[r])).astype(X.dtype)
            xi, xj = X[:, i], X[:, j]
            X[:, i], X[:, j] = c * xi - s * xj, s * xi + c * xj
        return X

    def apply(self, X):
        X, one = self._rows(X, self.dim_in)
        Y = self._walk(X, 1.0, range(self.rounds))
        return Y[0] if one else Y

    def inverse(self, Y):
        Y, one = self._rows(Y, self.dim_out)
        X = self._walk(Y, -1.0, reversed(range(self.rounds)))
        return X[0] if one else X

    def state(self):
        return dict(super().state(), rounds=self.rounds)


def make_rotation(kind: str, dim: int, seed: int = 0, **kw) -> Rotation:
    if kind == "orthogonal":
        return RandomOrthogonal(dim, seed)
    if kind == "hadamard":
        return RandomizedHadamard(dim, seed, **kw)
    if kind == "kac":
        return KacWalk(dim, seed, **kw)
    raise UsageError(f"unknown rotation {kind!r}: expected one of {', '.join(KINDS)}")


def from_state(state: dict) -> Rotation:
    """Rebuild a rotation from ``Rotation.state()`` (seed and sizes only: the matrix is regenerated)."""
    try:
        kind, dim, seed = state["kind"], int(state["dim"]), int(state["seed"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"not a rotation state: {state!r}") from None
    kw = {}
    if kind == "hadamard":
        kw["pad"] = bool(state.get("pad", False))
    if kind == "kac" and "rounds" in state:
        kw["rounds"] = int(state["rounds"])
    return make_rotation(kind, dim, seed, **kw)
