"""experiments.artifacts: what one stage writes, the next reads back bit for bit, or refuses, naming the file."""

import json

import numpy as np
import pytest

from experiments import artifacts as A


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"z": rng.standard_normal((3, 4, 8)).astype(np.float32), "idx": np.arange(3, dtype=np.int64),
            "img": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)}


def test_round_trip_is_exact_and_the_hash_is_independent_of_numpy(tmp_path):
    arrays, meta = _arrays(), {"preset": "tiny", "k": 4}
    path = A.save(tmp_path / "a.npz", arrays, meta)
    got, got_meta = A.load(path)
    assert got_meta == meta and sorted(got) == sorted(arrays)
    for name in arrays:
        assert got[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(got[name], arrays[name])
    # an independent recomputation of the documented hash: meta JSON, then name|dtype|shape| and bytes, sorted
    import hashlib

    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        digest.update(f"|{name}|{arrays[name].dtype.str}|{arrays[name].shape}|".encode() + arrays[name].tobytes())
    with np.load(path) as stored:
        assert str(stored["sha256"]) == digest.hexdigest()
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left under the temporary name


@pytest.mark.parametrize("damage", ["truncate", "edit", "foreign"])
def test_damaged_files_are_refused_naming_the_file(tmp_path, damage):
    path = A.save(tmp_path / "a.npz", _arrays(), {"k": 1})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "edit":
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["z"] = arrays["z"] + 1
        np.savez(path, **arrays)
    else:
        np.savez(path, z=np.zeros(3))
    with pytest.raises(A.CorruptArtifact, match="a.npz"):
        A.load(path)
    assert not A.is_valid(path)
    assert not A.is_valid(tmp_path / "missing.npz")


def test_reserved_names_and_missing_pair_arrays_are_errors(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        A.save(tmp_path / "a.npz", {"meta": np.zeros(1)}, {})
    with pytest.raises(ValueError, match=r"missing arrays \['cond'"):
        A.save_pairs(tmp_path / "p.npz", {"z_w": np.zeros(1)}, {})


def test_pairs_of_another_model_or_preset_are_refused(tmp_path):
    arrays = {name: np.zeros((2, 3), np.float32) for name in A.PAIR_ARRAYS}
    path = A.save_pairs(A.pairs_path(tmp_path, "faithful"), arrays,
                        {"preset": "tiny", "sft_fingerprint": "abc", "sft_weights": "w"})
    assert A.load_pairs(path, "abc", "tiny")["meta"]["preset"] == "tiny"
    with pytest.raises(ValueError, match="fingerprint abc"):
        A.load_pairs(path, "def", "tiny")
    with pytest.raises(ValueError, match="preset 'tiny', expected 'flux2-dev'"):
        A.load_pairs(path, "abc", "flux2-dev")
    with pytest.raises(FileNotFoundError, match="experiments.mine"):
        A.load_pairs(tmp_path / "none.npz", "abc", "tiny")


def test_candidates_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    path = A.save_candidates(tmp_path, 7, latents=rng.standard_normal((2, 4, 8)).astype(np.float32),
                             cond=np.zeros((4, 8), np.float32), images=np.zeros((2, 8, 8, 3), np.uint8),
                             lr=np.zeros((2, 2, 3), np.uint8), hr=np.zeros((8, 8, 3), np.uint8), seeds=[3, 4],
                             scores=np.ones((2, 2)), metric_names=("psnr", "niqe"))
    assert path == A.candidate_path(tmp_path, 7) and path.name == "00007.npz"
    got = A.load_candidates(tmp_path, 7)
    assert got["metric_names"] == ("psnr", "niqe") and got["seeds"].dtype == np.int64
    np.testing.assert_array_equal(got["seeds"], [3, 4])
