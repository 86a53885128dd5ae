"""LucidConsistency: the head against torch's Sequential and NumPy, InfoNCE against NumPy, the donated train step, the
state-dict round trip and the pooled VGG16 backbone against the torch `lpips` package's trunk."""

import math

import jax
import jax.numpy as jnp
import lpips as torch_lpips
import numpy as np
import pytest
import torch
from scipy.special import erf

from foa_jax import consistency as C
from foa_jax import params as P
from ports import lpips_weights as W

DIM = 6


def np_head(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = x @ p["0"]["kernel"] + p["0"]["bias"]
    return (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ p["2"]["kernel"] + p["2"]["bias"]


def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_info_nce(a, b, tau):
    logits = np_unit(a) @ np_unit(b).T / tau

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))

    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.fixture(scope="module")
def head():
    return C.init_head(jax.random.key(0), DIM)


def test_init_draws_like_torch_linear(head):
    big = C.init_head(jax.random.key(1), 256)
    bound = 1 / 16
    for name in C.HEAD_LAYERS:
        for leaf in ("kernel", "bias"):
            values = np.asarray(big[name][leaf])
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound
        assert abs(float(np.std(big[name]["kernel"])) - bound / math.sqrt(3)) < 2e-4  # U(±b) has std b/√3
    assert C.head_dim(head) == DIM
    assert not np.array_equal(np.asarray(head["0"]["kernel"]), np.asarray(head["2"]["kernel"]))


def test_head_and_score_match_numpy_and_torch(head):
    x, y = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(C.apply_head)(head, x)), np_head(head, x), rtol=1e-5, atol=1e-6)
    sequential = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.GELU(), torch.nn.Linear(DIM, DIM))
    sequential.load_state_dict({k: torch.tensor(v) for k, v in C.state_dict(head).items()}, strict=True)
    with torch.no_grad():
        theirs = sequential(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(C.apply_head(head, x)), theirs, rtol=1e-5, atol=1e-6)
    want = np.sum(np_unit(np_head(head, x)) * np_unit(np_head(head, y)), axis=-1)
    np.testing.assert_allclose(np.asarray(jax.jit(C.score)(head, x, y)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(C.score(head, x, x)), 1.0, rtol=1e-6)


def test_state_dict_round_trips_and_names_what_is_wrong(head):
    tensors = C.state_dict(head)
    assert sorted(tensors) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    np.testing.assert_array_equal(tensors["0.weight"], np.asarray(head["0"]["kernel"]).T)
    back = C.from_state_dict(tensors)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, head)
    with pytest.raises(ValueError, match=r"expected keys .*got \['0.bias', '0.weight', '2.bias'\]"):
        C.from_state_dict({k: v for k, v in tensors.items() if k != "2.weight"})
    with pytest.raises(ValueError, match=r"layer 2 has kernel \(6, 5\)"):
        C.from_state_dict({**tensors, "2.weight": tensors["2.weight"][:5]})
    with pytest.raises(ValueError, match=r"apply_head: embeddings must be \(B, 6\), got \(3, 4\)"):
        C.apply_head(head, jnp.zeros((3, 4)))


@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_info_nce_matches_numpy(tau):
    a, b = np.random.default_rng(1).normal(size=(2, 7, 5))
    loss, accuracy = jax.jit(C.info_nce, static_argnums=2)(a.astype(np.float32), b.astype(np.float32), tau)
    np.testing.assert_allclose(float(loss), np_info_nce(a, b, tau), rtol=1e-5)
    logits = np_unit(a) @ np_unit(b).T
    want = 0.5 * (np.mean(logits.argmax(1) == np.arange(7)) + np.mean(logits.argmax(0) == np.arange(7)))
    assert float(accuracy) == pytest.approx(want)
    perfect, acc = C.info_nce(jnp.eye(4), 3 * jnp.eye(4), 0.01)
    assert float(perfect) < 1e-6 and float(acc) == 1.0
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        C.info_nce(jnp.eye(4), jnp.eye(4), 0.0)
    with pytest.raises(ValueError, match=r"two \(B >= 2, d\) views"):
        C.info_nce(jnp.eye(4), jnp.eye(4)[:3], 0.1)


def _views(seed, contents=12, dim=DIM, noise=0.8):
    """Two noisy views of random contents that share a large common offset, as ReLU features do."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(contents, dim)) + 3.0
    return [(base + noise * rng.normal(size=base.shape)).astype(np.float32) for _ in range(2)]


def test_train_step_is_donated_and_learns(head):
    config = C.HeadTrainConfig(steps=60, lr=3e-3)
    state = C.init_train_state(head, config)
    step = C.make_train_step(config)
    a, b = _views(2)
    first_loss = np_info_nce(np_head(head, a), np_head(head, b), config.temperature)
    old_kernel = state["params"]["0"]["kernel"]
    state, metrics = step(state, a, b)
    assert old_kernel.is_deleted()  # the state was donated
    assert float(metrics["loss"]) == pytest.approx(first_loss, rel=1e-5)
    assert float(metrics["lr"]) == pytest.approx(3e-3) and int(state["step"]) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for _ in range(config.steps - 1):
        state, metrics = step(state, a, b)
    assert float(metrics["loss"]) < 0.5 * first_loss
    assert float(metrics["positive"]) - float(metrics["negative"]) > 0.5
    # on new contents, matched minus mismatched cosine: the shared offset hides it in the raw vectors, not after
    test_a, test_b = _views(3)
    other = np.roll(test_b, 1, axis=0)
    raw_gap = np.mean(np.sum(np_unit(test_a) * (np_unit(test_b) - np_unit(other)), axis=-1))
    trained_gap = float(jnp.mean(C.score(state["params"], test_a, test_b) - C.score(state["params"], test_a, other)))
    assert raw_gap < 0.2 and trained_gap > raw_gap + 0.3, (raw_gap, trained_gap)


def test_configs_validate_themselves():
    with pytest.raises(ValueError, match=r"HeadTrainConfig.temperature must be > 0"):
        C.HeadTrainConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"HeadTrainConfig.steps must be an int >= 1"):
        C.HeadTrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"init_head: dim must be >= 1"):
        C.init_head(jax.random.key(0), 0)


# --------------------------------------------------------------------------------------------------------------------
# The VGG16 backbone


@pytest.fixture(scope="module")
def vgg():
    return W.load_lpips_params("vgg")


IMAGES = np.random.default_rng(4).uniform(size=(3, 32, 48, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_taps(vgg):
    """Global averages of the five tapped ReLUs of the torch package's VGG16 slices, holding our arrays through the
    naming rule, for `IMAGES`."""
    model = torch_lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()
    state = {P.torch_key(path): torch.from_numpy(P.to_torch_layout(path, np.array(leaf)))
             for path, leaf in P.flatten(vgg).items()}
    model.load_state_dict(state, strict=False)
    x = torch.from_numpy(np.ascontiguousarray(IMAGES.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        taps = model.net(model.scaling_layer(2 * x - 1))
    return [t.numpy().astype(np.float64).mean(axis=(2, 3)) for t in taps]


@pytest.mark.parametrize("pooling", C.POOLINGS)
def test_vgg_backbone_matches_the_torch_trunk(vgg, torch_taps, pooling):
    want = torch_taps[-1] if pooling == "last" else np.concatenate([np_unit(t) for t in torch_taps], axis=1)
    backbone = C.VGGBackbone(vgg, pooling=pooling, batch=2)  # 3 images: one full chunk and one padded
    got = backbone(IMAGES)
    assert got.shape == (3, backbone.dim) and backbone.dim == {"last": 512, "stages": 1472}[pooling]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_vgg_backbone_rejects_bad_input(vgg):
    with pytest.raises(ValueError, match=r"pooling must be one of \('last', 'stages'\), got 'max'"):
        C.VGGBackbone(vgg, pooling="max")
    broken = {"net": {**vgg["net"], "slice5": {k: v for k, v in vgg["net"]["slice5"].items() if k != "28"}}}
    with pytest.raises(ValueError, match=r"net.slice5.28.kernel expected \(3, 3, 512, 512\), got missing"):
        C.VGGBackbone(broken)
    with pytest.raises(ValueError, match=r"expected NHWC RGB images"):
        C.vgg_embedding(vgg, jnp.zeros((2, 32, 32)), "last")
