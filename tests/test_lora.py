"""LoRA pytrees: exact zero-init, equality with merged weights, target sets, gradients only for the adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import lora, sampling
from foa_jax.models import flux2
from tests import torch_reference

CONFIG = flux2.Flux2Config(**torch_reference.SMALL_TRANSFORMER)


def _inputs():
    rng = np.random.default_rng(0)
    img_ids, txt_ids = sampling.image_ids((2, 3), [(2, 3)]), sampling.text_ids(4)
    x = rng.standard_normal((2, len(img_ids), CONFIG.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 4, CONFIG.joint_attention_dim)).astype(np.float32)
    return x, ctx, np.array([0.2, 0.7], np.float32), img_ids, txt_ids


APPLY = jax.jit(flux2.apply, static_argnums=1)


def _run(params, adapter=None, scale=1.0, config=CONFIG):
    return APPLY(params, config, *_inputs(), lora=adapter, lora_scale=scale)


def _perturbed(adapter, seed=1):
    """An adapter with B moved off zero, as after some training."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("targets", sorted(lora.TARGET_SETS))
def test_fresh_adapter_reproduces_the_base_model_exactly(targets):
    params = flux2.init(CONFIG, jax.random.key(0))
    adapter = lora.init(params, lora.LoRAConfig(rank=4, targets=targets), jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(_run(params, adapter)), np.asarray(_run(params)))


@pytest.mark.parametrize("targets", sorted(lora.TARGET_SETS))
@pytest.mark.parametrize("alpha", [None, 8.0])
def test_adapter_equals_merged_weights(targets, alpha):
    params = flux2.init(CONFIG, jax.random.key(0))
    config = lora.LoRAConfig(rank=4, alpha=alpha, targets=targets)
    adapter = _perturbed(lora.init(params, config, jax.random.key(1)))
    with_adapter = _run(params, adapter, config.scale)
    merged = _run(lora.merge(params, adapter, config))
    assert not np.allclose(with_adapter, _run(params), atol=1e-4), "the perturbed adapter must change the output"
    np.testing.assert_allclose(np.asarray(with_adapter), np.asarray(merged), atol=2e-5, rtol=1e-5)


def test_target_sets_name_the_documented_modules():
    shapes = jax.eval_shape(lambda: flux2.init(CONFIG, jax.random.key(0)))
    attn = {"transformer_blocks.attn.to_q", "transformer_blocks.attn.to_k", "transformer_blocks.attn.to_v",
            "transformer_blocks.attn.to_out.0", "single_transformer_blocks.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.attn.to_out"}
    add = {f"transformer_blocks.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    ffn = {f"transformer_blocks.{s}.{n}" for s in ("ff", "ff_context") for n in ("linear_in", "linear_out")}
    assert set(lora.target_modules(shapes, lora.LoRAConfig(targets="attn"))) == attn
    assert set(lora.target_modules(shapes, lora.LoRAConfig(targets="attn+add"))) == attn | add
    assert set(lora.target_modules(shapes, lora.LoRAConfig(targets="attn+ffn"))) == attn | ffn


def test_flux2_dev_rank_64_adapter_size_on_paper():
    config = flux2.preset("flux2-dev")
    shapes = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0), jnp.bfloat16))
    adapter = jax.eval_shape(lambda: lora.init(shapes, lora.LoRAConfig(rank=64), jax.random.key(0)))
    d, f, r = config.inner_dim, config.mlp_hidden_dim, 64
    per_double = 8 * r * (d + d)  # q, k, v, out and their text-stream twins, all D -> D
    per_single = r * (d + 3 * d + 2 * f) + r * (d + f + d)
    assert lora.count(adapter) == 8 * per_double + 48 * per_single


def test_gradients_exist_only_for_the_adapter():
    params = flux2.init(CONFIG, jax.random.key(0))
    config = lora.LoRAConfig(rank=4)
    adapter = _perturbed(lora.init(params, config, jax.random.key(1)))

    def loss(adapter_tree, base):
        return jnp.mean(_run(base, adapter_tree) ** 2)

    grads = jax.grad(loss)(adapter, params)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # at initialisation (B = 0) only B receives gradient, as for any LoRA
    fresh = lora.init(params, config, jax.random.key(1))
    g0 = lora.P.flatten(jax.grad(loss)(fresh, params))
    assert all(float(jnp.abs(v).max()) == 0 for k, v in g0.items() if "lora_A" in k)
    assert all(float(jnp.abs(v).max()) > 0 for k, v in g0.items() if "lora_B" in k)


def test_config_validates_itself():
    with pytest.raises(ValueError, match="targets must be one of"):
        lora.LoRAConfig(targets="everything")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora.LoRAConfig(rank=0)
    assert lora.LoRAConfig(rank=16, alpha=8).scale == 0.5


def test_an_adapter_carries_its_own_scale():
    params = flux2.init(CONFIG, jax.random.key(0))
    config = lora.LoRAConfig(rank=4, alpha=8.0)  # scale 2: a bare tree at the default scale would be off
    tree = _perturbed(lora.init(params, config, jax.random.key(1)))
    adapter = lora.Adapter(tree, config)
    np.testing.assert_array_equal(np.asarray(APPLY(params, CONFIG, *_inputs(), lora=adapter)),
                                  np.asarray(_run(params, tree, config.scale)))
    np.testing.assert_allclose(np.asarray(APPLY(params, CONFIG, *_inputs(), lora=adapter)),
                               np.asarray(_run(lora.merge(params, adapter))), atol=2e-5, rtol=1e-5)
    # lora_scale on an Adapter is a strength on top of alpha/rank, as diffusers' `scale`
    np.testing.assert_array_equal(np.asarray(APPLY(params, CONFIG, *_inputs(), lora=adapter, lora_scale=0.5)),
                                  np.asarray(_run(params, tree, 0.5 * config.scale)))
    # the config rides along through transformations: gradients of an Adapter are an Adapter of the same config
    grads = jax.grad(lambda a: jnp.mean(APPLY(params, CONFIG, *_inputs(), lora=a) ** 2))(adapter)
    assert isinstance(grads, lora.Adapter) and grads.config == config
    assert lora.count(adapter) == lora.count(tree)


def test_a_bare_tree_without_its_scale_warns():
    params = flux2.init(CONFIG, jax.random.key(0))
    tree = lora.init(params, lora.LoRAConfig(rank=4), jax.random.key(1))
    with pytest.warns(UserWarning, match=r"lora.Adapter\(tree, config\)"):
        flux2.apply(params, CONFIG, *_inputs(), lora=tree)
    with pytest.raises(TypeError, match="needs its LoRAConfig"):
        lora.merge(params, tree)


def test_a_peft_file_runs_as_diffusers_runs_it(tmp_path):
    """A PEFT adapter with alpha != rank, saved by diffusers: `Adapter(*import_lora(...))` needs no scale by hand."""
    import torch
    from peft import LoraConfig

    from ports import lora_io, torch_models

    model = torch_models.seeded_transformer(CONFIG, seed=0)
    params = torch_models.jax_params(model, lambda: flux2.init(CONFIG, jax.random.key(0)), flux2.STACKS)
    single_to_out = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(CONFIG.num_single_layers)]
    targets = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", *single_to_out]  # the `attn` set
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_B" in name:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
    model.save_lora_adapter(str(tmp_path))
    x, ctx, t, img_ids, txt_ids = _inputs()
    with torch.no_grad():
        expected = model(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                         timestep=torch.from_numpy(t), img_ids=torch.from_numpy(img_ids),
                         txt_ids=torch.from_numpy(txt_ids)).sample.numpy()
    adapter = lora.Adapter(*lora_io.import_lora(tmp_path, CONFIG))
    assert adapter.scale == 2.0
    got = np.asarray(APPLY(params, CONFIG, x, ctx, t, img_ids, txt_ids, lora=adapter))
    at_scale_one = np.asarray(_run(params, adapter.params, 1.0))
    print(f"PEFT rank 4, alpha 8: max abs diff {np.max(np.abs(got - expected)):.2e}; at scale 1 "
          f"{np.max(np.abs(at_scale_one - expected)):.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.max(np.abs(at_scale_one - expected)) > 1e-3, "the scale must matter, or the test proves nothing"
