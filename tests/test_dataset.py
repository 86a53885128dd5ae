"""foa_jax.data.dataset: config validation, crops deterministic per (seed, index) and equal to the photo slice they
claim, LR = HR / 4 from the named degradation seed, epoch coverage, small-photo skipping, folder sources and LR/HR
folder pairing errors raised before any decoding."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from foa_jax.data import dataset as ds
from foa_jax.data import images
from foa_jax.data.degrade import degrade

CONFIG = ds.DataConfig(gt_size=32, crops_per_image=2, seed=3)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = {"wide": (40, 90), "tall": (75, 33), "square": (32, 32), "big": (64, 64), "tiny": (20, 80)}
    return {name: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for name, size in sizes.items()}


@pytest.fixture(scope="module")
def dataset(photos) -> ds.Dataset:
    return ds.Dataset(CONFIG, photos, report=lambda message: None)


@pytest.mark.parametrize("field,value,match", [
    ("gt_size", 40, "multiple of 16"),
    ("gt_size", 8, "multiple of 16"),
    ("gt_size", 0, "gt_size"),
    ("crops_per_image", 0, "crops_per_image"),
    ("seed", -1, "seed"),
    ("token_factor", 3, "multiple of 12"),
])
def test_config_validates(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **{field: value})


def test_config_properties_and_presets():
    assert (CONFIG.scale, CONFIG.lr_size) == (4, 8)
    assert ds.DataConfig.preset("tiny").gt_size == 256 and ds.DataConfig.preset("full").gt_size == 512
    with pytest.raises(ValueError, match="unknown preset"):
        ds.DataConfig.preset("huge")


def test_small_photos_are_skipped_by_name(photos):
    messages = []
    dataset = ds.Dataset(CONFIG, photos, report=messages.append)
    assert dataset.names == ["big", "square", "tall", "wide"]
    assert len(messages) == 1 and "tiny (20x80)" in messages[0]
    with pytest.raises(ValueError, match="no photo"):
        ds.Dataset(dataclasses.replace(CONFIG, gt_size=128), photos, report=lambda m: None)


def test_non_uint8_photo_is_refused():
    with pytest.raises(ValueError, match="photo 'f'.*uint8"):
        ds.Dataset(CONFIG, {"f": np.zeros((64, 64, 3), np.float32)})


def test_pairs_are_crops_of_their_photo_then_degraded(dataset, photos):
    for index in range(2 * dataset.epoch_length + 3):
        spec = dataset.spec(index)
        lr, hr = dataset.pair(index)
        h, w = photos[spec.source].shape[:2]
        assert 0 <= spec.top <= h - 32 and 0 <= spec.left <= w - 32
        np.testing.assert_array_equal(hr, photos[spec.source][spec.top:spec.top + 32, spec.left:spec.left + 32])
        assert lr.shape == (8, 8, 3) and lr.dtype == np.uint8 and hr.dtype == np.uint8
        np.testing.assert_array_equal(lr, degrade(hr, spec.degradation_seed, CONFIG.degradation))


def test_pairs_are_deterministic_per_seed_and_index(dataset, photos):
    again = ds.Dataset(CONFIG, dict(reversed(list(photos.items()))), report=lambda m: None)
    for index in (0, 5, 17):
        assert dataset.spec(index) == again.spec(index)
        for a, b in zip(dataset.pair(index), again.pair(index)):
            np.testing.assert_array_equal(a, b)
    other = ds.Dataset(dataclasses.replace(CONFIG, seed=4), photos, report=lambda m: None)
    assert [dataset.spec(i)[1:] for i in range(8)] != [other.spec(i)[1:] for i in range(8)]
    assert dataset.fingerprint() == again.fingerprint() != ds.Dataset(
        CONFIG, {k: v for k, v in photos.items() if k != "big"}, report=lambda m: None).fingerprint()


def test_hflip_mirrors_about_half_the_crops_and_moves_nothing_else(dataset, photos):
    flipped = ds.Dataset(dataclasses.replace(CONFIG, hflip=True), photos, report=lambda m: None)
    flips = []
    for index in range(64):
        plain, spec = dataset.spec(index), flipped.spec(index)
        assert spec._replace(flip=False) == plain and not plain.flip
        flips.append(spec.flip)
        lr, hr = flipped.pair(index)
        crop = photos[spec.source][spec.top:spec.top + 32, spec.left:spec.left + 32]
        np.testing.assert_array_equal(hr, crop[:, ::-1] if spec.flip else crop)
        np.testing.assert_array_equal(lr, degrade(hr, spec.degradation_seed, CONFIG.degradation))
    assert 20 <= sum(flips) <= 44
    with pytest.raises(ValueError, match="hflip"):
        dataclasses.replace(CONFIG, hflip=1)


def test_every_epoch_uses_each_photo_crops_per_image_times(dataset):
    n = dataset.epoch_length
    assert n == 8
    for epoch in range(3):
        sources = [dataset.spec(epoch * n + i).source for i in range(n)]
        assert sorted(sources) == sorted(dataset.names * 2)
    orders = [[dataset.spec(epoch * n + i).source for i in range(n)] for epoch in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]  # shuffled per epoch


def test_iterators_and_list_builder_agree_with_pair(dataset, photos):
    it = dataset.iterate(start=5)
    for index in range(5, 9):
        for a, b in zip(next(it), dataset.pair(index)):
            np.testing.assert_array_equal(a, b)
    batches = dataset.batches(3, start=4)
    next(batches)
    lr, hr = next(batches)  # indices 7, 8, 9: what a run resumed at step 1 with batch 3 from start 4 sees
    assert lr.shape == (3, 8, 8, 3) and hr.shape == (3, 32, 32, 3)
    for k, index in enumerate(range(7, 10)):
        np.testing.assert_array_equal(hr[k], dataset.pair(index)[1])
        np.testing.assert_array_equal(lr[k], dataset.pair(index)[0])
    listed = ds.pairs(CONFIG, photos, 4, report=lambda m: None)
    for index, (lr, hr) in enumerate(listed):
        np.testing.assert_array_equal(hr, dataset.pair(index)[1])


def test_folder_photos_skip_bad_files_and_small_photos(tmp_path, photos):
    first, second = tmp_path / "set_a", tmp_path / "set_b"
    first.mkdir(), second.mkdir()
    Image.fromarray(photos["wide"]).save(first / "wide.png")
    Image.fromarray(photos["tiny"]).save(first / "tiny.png")
    (first / "broken.png").write_bytes(b"not a png")
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6  # stored 75 rows x 33 columns; upright (rotated 90 degrees) 33 x 75
    Image.fromarray(photos["tall"]).save(second / "tall.jpg", exif=exif, quality=95)
    messages = []
    source = ds.FolderPhotos([first, second], report=messages.append)
    assert sorted(source) == ["set_a/tiny.png", "set_a/wide.png", "set_b/tall.jpg"]
    assert source.size("set_b/tall.jpg") == (33, 75)
    assert any("broken.png" in m for m in messages)
    np.testing.assert_array_equal(source["set_a/wide.png"], photos["wide"])
    dataset = ds.Dataset(CONFIG, source, report=messages.append)
    assert dataset.names == ["set_a/wide.png", "set_b/tall.jpg"] and "set_a/tiny.png (20x80)" in messages[-1]
    assert dataset.pair(0)[1].shape == (32, 32, 3)


def _write_pairs(root, sizes, lr_suffix="", hr_suffix=""):
    (root / "lr").mkdir(parents=True), (root / "hr").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, (lr_size, hr_size) in sizes.items():
        for side, size, suffix in (("lr", lr_size, lr_suffix), ("hr", hr_size, hr_suffix)):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / side / f"{name}{suffix}.png")


def test_paired_folders_matches_by_stem(tmp_path):
    _write_pairs(tmp_path, {"b": ((4, 6), (16, 24)), "a": ((5, 5), (20, 20))}, "_LR4", "_HR")
    pairs = ds.paired_folders(tmp_path / "lr", tmp_path / "hr", lr_suffix="_LR4", hr_suffix="_HR")
    assert [p.name for p in pairs] == ["a", "b"]
    np.testing.assert_array_equal(pairs[1].hr, np.asarray(Image.open(tmp_path / "hr" / "b_HR.png")))
    assert pairs[1].lr.shape == (4, 6, 3)


def test_paired_folders_lists_unmatched_names_before_decoding(tmp_path, monkeypatch):
    _write_pairs(tmp_path, {"a": ((4, 4), (16, 16)), "b": ((4, 4), (16, 16))})
    (tmp_path / "lr" / "b.png").rename(tmp_path / "lr" / "c.png")
    (tmp_path / "hr" / "a.png").rename(tmp_path / "hr" / "d.png")

    def refuse(path):
        raise AssertionError(f"decoded {path} before checking names")

    monkeypatch.setattr(ds, "read_image", refuse)
    with pytest.raises(ValueError, match=r"only in LR .*\['a', 'c'\].*only in HR .*\['b', 'd'\]"):
        ds.paired_folders(tmp_path / "lr", tmp_path / "hr")


def test_paired_folders_names_size_mismatches(tmp_path, monkeypatch):
    _write_pairs(tmp_path, {"ok": ((4, 4), (16, 16)), "off": ((4, 5), (16, 16))})
    monkeypatch.setattr(ds, "read_image", lambda path: pytest.fail(f"decoded {path} before checking sizes"))
    with pytest.raises(ValueError, match=r"off\.png 4x5 \(x4 = 16x20\) vs off\.png 16x16") as err:
        ds.paired_folders(tmp_path / "lr", tmp_path / "hr")
    assert "ok.png" not in str(err.value)


def test_paired_folders_refuses_ambiguous_stems(tmp_path):
    _write_pairs(tmp_path, {"a": ((4, 4), (16, 16))})
    Image.new("RGB", (4, 4)).save(tmp_path / "lr" / "a.jpg")
    with pytest.raises(ValueError, match="a.jpg and a.png|a.png and a.jpg"):
        ds.paired_folders(tmp_path / "lr", tmp_path / "hr")
