"""The run-time half of QuaRot's stage 1b: the online Hadamard a checkpoint's config.json asks for.

A checkpoint quantized with ``--rotate --online-hadamard`` (qkit.quarot) needs each
decoder layer's down_proj input rotated at run time by the randomized Hadamard whose
transpose was folded into W_down. config.json records it under ONLINE_KEY
({kind, seed, dim, layers, modules}); the loader checks the entry and attaches one
forward pre-hook per named module. It lives with model I/O because loading needs
it; qkit.quarot, which writes the entry, re-exports these names.
"""
from __future__ import annotations

from qkit.errors import UsageError
from qkit.model import arch as archs
from qkit.rotation import Rotation, make_rotation

ONLINE_KEY = "qkit_online_rotation"  # config.json: the run-time rotation a checkpoint needs


def rotation_for_dim(spec: dict) -> Rotation:
    return make_rotation(spec["kind"], spec["dim"], spec["seed"])


def check_online_spec(spec, where: str) -> dict:
    """A config.json ONLINE_KEY entry, checked (FormatError) before any hook is built from it."""
    from qkit.errors import FormatError

    ok = isinstance(spec, dict) and spec.get("kind") == "hadamard" and isinstance(spec.get("seed"), int) \
        and isinstance(spec.get("dim"), int) and 1 <= spec["dim"] <= 1 << 19 and isinstance(spec.get("layers"), str) \
        and isinstance(spec.get("modules"), list) and all(isinstance(m, str) for m in spec["modules"])
    if not ok:
        raise FormatError(f"{where}: {ONLINE_KEY} must be {{kind: 'hadamard', seed, dim, layers, modules}}, "
                          f"got {str(spec)[:120]}")
    return spec


class OnlineHadamard:
    """Forward pre-hook: rows z -> z Q2 = z R^T, RandomizedHadamard.apply's operations in torch (signs, the Paley
    factor, then a fast Walsh-Hadamard transform over the power-of-two factor), O(d log d) per row."""

    def __init__(self, rot: Rotation):
        import torch

        if rot.kind != "hadamard" or rot.pad:
            raise UsageError("the online rotation must be an unpadded randomized Hadamard")
        self.d, self.pow2, self.m, self.norm = rot.dim_in, rot.pow2, rot.m, rot.norm
        self.signs = torch.from_numpy(rot.signs)
        self.HmT = torch.from_numpy(rot.Hm.T.copy()) if rot.Hm is not None else None

    def apply(self, x):
        import torch

        shape = x.shape
        z = (x * self.signs.to(x.dtype)).reshape(-1, self.pow2, self.m)
        if self.HmT is not None:
            z = z @ self.HmT.to(x.dtype)
        n, h = z.shape[0], 1
        while h < self.pow2:  # butterflies over axis 1: pairs (a, b) h apart -> (a + b, a - b)
            z = z.reshape(n, self.pow2 // (2 * h), 2, h, self.m)
            z = torch.stack([z[:, :, 0] + z[:, :, 1], z[:, :, 0] - z[:, :, 1]], dim=2)
            h *= 2
        return z.reshape(shape) * self.norm

    def __call__(self, module, args):
        return (self.apply(args[0]), *args[1:])


def attach_online_layer(layer, spec: dict, hook: OnlineHadamard | None = None) -> list:
    """The pre-hooks of one decoder layer (its `modules`); their handles."""
    hook = hook or OnlineHadamard(rotation_for_dim(spec))
    return [archs.submodule(layer, m).register_forward_pre_hook(hook) for m in spec["modules"]]


def attach_online(model, spec: dict) -> list:
    """The pre-hooks of every decoder layer of a loaded model (qkit.model.loader.load_model)."""
    hook = OnlineHadamard(rotation_for_dim(spec))
    try:
        layers = model.get_submodule(spec["layers"])
    except AttributeError:
        raise UsageError(f"{type(model).__name__} has no {spec['layers']!r}, which {ONLINE_KEY} names") from None
    return [h for layer in layers for h in attach_online_layer(layer, spec, hook)]
