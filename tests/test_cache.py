"""foa_jax.data.cache: cached tokens against a direct computation (average pooling of the HR crop and of torch's
bicubic upsampling of the LR), resumption after a killed build (only missing samples encoded, result identical to an
uninterrupted build), corrupt and half-written files redone, identity mismatches named, and the real tiny VAE."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foa_jax.data import cache
from foa_jax.data import dataset as ds
from foa_jax.models import vae

CONFIG = ds.DataConfig(gt_size=32, crops_per_image=2, seed=1)
QUIET = {"report": lambda message: None}


@pytest.fixture(scope="module")
def dataset() -> ds.Dataset:
    rng = np.random.default_rng(0)
    photos = {f"p{i}": rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(3)}
    return ds.Dataset(CONFIG, photos, **QUIET)


def pool16(images: np.ndarray) -> np.ndarray:
    """A trivial deterministic 'encoder': the mean colour of each 16x16 patch, (B, N, 3)."""
    b, h, w, c = images.shape
    return images.reshape(b, h // 16, 16, w // 16, 16, c).mean(axis=(2, 4)).reshape(b, -1, c)


class CountingEncoder:
    """pool16 that counts images and can fail after a number of calls, like a build killed mid-way."""

    def __init__(self, fail_after_calls: int | None = None):
        self.images = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def __call__(self, images):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.images += len(images)
        return pool16(images)


def _files(root) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((root / "samples").glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            out[path.name] = {key: npz[key] for key in npz.files}
    return out


def _assert_same_files(a, b):
    files_a, files_b = _files(a), _files(b)
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert files_a[name].keys() == files_b[name].keys()
        for key in files_a[name]:
            np.testing.assert_array_equal(files_a[name][key], files_b[name][key], err_msg=f"{name}:{key}")


def test_cached_tokens_are_the_encoded_crop_and_upsampled_lr(tmp_path, dataset):
    latents = cache.build(tmp_path, dataset, 5, pool16, "pool16", batch_size=2, **QUIET)
    assert len(latents) == 5 and latents.tokens_shape == (4, 3)
    batch = latents.batch([3, 0])
    assert {k: v.shape for k, v in batch.items()} == {
        "z_hr": (2, 4, 3), "c": (2, 4, 3), "index": (2,), "hr": (2, 32, 32, 3), "lr": (2, 8, 8, 3)}
    np.testing.assert_array_equal(batch["index"], [3, 0])
    for k, index in enumerate([3, 0]):
        lr, hr = dataset.pair(index)
        np.testing.assert_array_equal(batch["hr"][k], hr)
        np.testing.assert_array_equal(batch["lr"][k], lr)
        np.testing.assert_allclose(batch["z_hr"][k], pool16(hr[None] / 255.0)[0], atol=1e-6)
        lr_t = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        up = F.interpolate(lr_t, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
        np.testing.assert_allclose(batch["c"][k], pool16(up.permute(0, 2, 3, 1).numpy())[0], atol=1e-5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 5 and manifest["identity"]["encoder"] == "pool16"
    assert manifest["identity"]["data"]["gt_size"] == 32


def test_killed_build_resumes_with_only_the_missing_samples(tmp_path, dataset):
    reference = cache.build(tmp_path / "whole", dataset, 7, CountingEncoder(), "pool16", batch_size=2, **QUIET)
    killed = CountingEncoder(fail_after_calls=4)  # two HR+LR batches of 2 samples done, then killed
    with pytest.raises(KeyboardInterrupt):
        cache.build(tmp_path / "resumed", dataset, 7, killed, "pool16", batch_size=2, **QUIET)
    assert len(_files(tmp_path / "resumed")) == 4
    with pytest.raises(ValueError, match="incomplete"):
        cache.LatentCache(tmp_path / "resumed")
    resumed = CountingEncoder()
    messages = []
    progress = []
    latents = cache.build(tmp_path / "resumed", dataset, 7, resumed, "pool16", batch_size=2,
                          progress=lambda done, total: progress.append((done, total)), report=messages.append)
    assert resumed.images == 2 * 3  # HR and LR of the 3 missing samples
    assert progress == [(2, 3), (3, 3)]
    assert "4 of 7 samples present, encoding 3" in messages[-1]
    _assert_same_files(tmp_path / "whole", tmp_path / "resumed")
    assert len(latents) == len(reference) == 7


def test_half_written_and_corrupt_files_are_redone(tmp_path, dataset):
    cache.build(tmp_path / "whole", dataset, 6, pool16, "pool16", **QUIET)
    cache.build(tmp_path / "damaged", dataset, 6, pool16, "pool16", **QUIET)
    samples = tmp_path / "damaged" / "samples"
    (samples / "00000001.npz").write_bytes((samples / "00000001.npz").read_bytes()[:300])  # truncated
    data = bytearray((samples / "00000004.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the hr image: caught by the zip CRC
    (samples / "00000004.npz").write_bytes(bytes(data))
    (samples / "00000002.npz").replace(samples / "00000002.npz.tmp")  # killed before the rename
    with pytest.raises(cache.CorruptSample, match="00000004.npz"):
        cache.LatentCache(tmp_path / "damaged").sample(4)
    encoder, messages = CountingEncoder(), []
    cache.build(tmp_path / "damaged", dataset, 6, encoder, "pool16", report=messages.append)
    assert encoder.images == 2 * 3
    assert sum("redoing sample" in m for m in messages) == 2
    assert not list(samples.glob("*.tmp"))
    _assert_same_files(tmp_path / "whole", tmp_path / "damaged")


def test_identity_mismatch_names_the_difference(tmp_path, dataset):
    cache.build(tmp_path, dataset, 2, pool16, "vae-A", **QUIET)
    with pytest.raises(ValueError, match=r"encoder: 'vae-A' != 'vae-B'"):
        cache.build(tmp_path, dataset, 2, pool16, "vae-B", **QUIET)
    other = ds.Dataset(dataclasses.replace(CONFIG, gt_size=48, seed=2), dataset.photos, **QUIET)
    with pytest.raises(ValueError, match=r"data\.gt_size: 32 != 48.*data\.seed: 1 != 2") as err:
        cache.build(tmp_path, other, 2, pool16, "vae-A", **QUIET)
    assert "photos" in str(err.value)  # the 48-px crops leave the smallest photo out
    with pytest.raises(ValueError, match="store_images: True != False"):
        cache.LatentCache(tmp_path, expected=cache.CacheIdentity.of(dataset, "vae-A", store_images=False))
    assert len(cache.LatentCache(tmp_path, expected=cache.CacheIdentity.of(dataset, "vae-A"))) == 2
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        cache.LatentCache(tmp_path / "nothing-here")


def test_larger_count_extends_and_latents_only_cache(tmp_path, dataset):
    cache.build(tmp_path / "a", dataset, 3, pool16, "pool16", **QUIET)
    encoder = CountingEncoder()
    latents = cache.build(tmp_path / "a", dataset, 5, encoder, "pool16", **QUIET)
    assert encoder.images == 2 * 2 and len(latents) == 5
    slim = cache.build(tmp_path / "b", dataset, 5, pool16, "pool16", store_images=False, **QUIET)
    assert set(slim.batch([0])) == {"z_hr", "c", "index"}
    np.testing.assert_array_equal(slim.batch([4])["z_hr"], latents.batch([4])["z_hr"])


def test_random_batches_are_seeded_and_distinct(tmp_path, dataset):
    latents = cache.build(tmp_path, dataset, 6, pool16, "pool16", **QUIET)
    first = latents.random_batch(np.random.default_rng(5), 4)["index"]
    again = latents.random_batch(np.random.default_rng(5), 4)["index"]
    np.testing.assert_array_equal(first, again)
    assert len(set(first.tolist())) == 4 and set(first.tolist()) <= set(range(6))
    with pytest.raises(IndexError, match="index 6"):
        latents.sample(6)


def test_encoder_output_shape_is_checked(tmp_path, dataset):
    with pytest.raises(ValueError, match=r"expected \(2, 4, C\)"):
        cache.build(tmp_path, dataset, 2, lambda x: pool16(x)[:, :3], "bad", batch_size=2, **QUIET)


def test_real_tiny_vae_tokens(tmp_path, dataset):
    config = vae.VAEConfig.preset("tiny")
    params = vae.init(config, jax.random.key(0))
    encode_tokens = jax.jit(lambda images: vae.encode_tokens(params, config, images * 2.0 - 1.0))
    fingerprint = cache.fingerprint(params)
    latents = cache.build(tmp_path, dataset, 2, encode_tokens, fingerprint, batch_size=2, **QUIET)
    tokens = (CONFIG.gt_size // config.token_factor) ** 2
    assert latents.tokens_shape == (tokens, config.token_channels) == (4, 128)
    batch = latents.batch([0, 1])
    direct = vae.encode_tokens(params, config, batch["hr"].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(batch["z_hr"], np.asarray(direct), atol=1e-5)
    assert np.abs(batch["c"] - batch["z_hr"]).max() > 1e-3  # the LR condition is not the HR latent
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["encoder"]["conv_in"]["bias"] = changed["encoder"]["conv_in"]["bias"] + 1e-3
    assert cache.fingerprint(params) == fingerprint != cache.fingerprint(changed)
