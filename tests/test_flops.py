"""foa_jax.flops: the analytic model FLOPs of each part of a step against XLA's own count (`cost_analysis`) of the
compiled programs at small depth and width, where products dominate but elementwise work is still counted by XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foa_jax import flops, sampling
from foa_jax import lora as lora_lib
from foa_jax.models import flux2, lpips, vae

# One block of each kind, 128-wide heads; plain kernels and unrolled scans, so that XLA counts every product once.
CONFIG = flux2.preset("tiny", num_attention_heads=4, attention_head_dim=128, axes_dims_rope=(32, 32, 32, 32),
                      num_layers=1, num_single_layers=1, joint_attention_dim=256, attention="xla",
                      kernels="reference", scan_unroll=4)
LORA = lora_lib.LoRAConfig(rank=16)
GRID, TEXT, BATCH = (6, 8), 16, 2


def xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def check(name, analytic: float, counted: float, tol: float):
    print(f"{name}: analytic {analytic:.4e}, XLA {counted:.4e} ({analytic / counted - 1:+.1%})")
    assert abs(analytic / counted - 1) <= tol


def _transformer_case():
    params = jax.eval_shape(lambda: flux2.init(CONFIG, jax.random.key(0)))
    adapter = jax.eval_shape(lambda: lora_lib.init(params, LORA, jax.random.key(1)))
    img_ids, txt_ids = sampling.image_ids(GRID, [GRID]), sampling.text_ids(TEXT)
    x = jax.ShapeDtypeStruct((BATCH, len(img_ids), CONFIG.in_channels), jnp.float32)
    ctx = jax.ShapeDtypeStruct((BATCH, TEXT, CONFIG.joint_attention_dim), jnp.float32)

    def forward(p, a, x, ctx):
        return flux2.apply(p, CONFIG, x, ctx, jnp.full((BATCH,), 0.5), img_ids, txt_ids, jnp.ones(BATCH), lora=a,
                           lora_scale=1.0)

    return forward, (params, adapter, x, ctx), len(img_ids)


def test_transformer_forward_and_lora_step():
    forward, args, tokens = _transformer_case()
    analytic = flops.transformer(CONFIG, tokens, TEXT, BATCH, LORA)
    check("transformer forward", analytic.total, xla_flops(forward, *args), 0.05)

    def lora_step(p, a, x, ctx):
        return jax.grad(lambda a: jnp.sum(forward(p, a, x, ctx) ** 2))(a)

    check("LoRA forward + backward", (analytic + analytic.backward()).total, xla_flops(lora_step, *args), 0.05)


def test_vae_decoder_forward_and_backward():
    config = vae.VAEConfig(block_out_channels=(64, 128), layers_per_block=1, latent_channels=8, norm_num_groups=32,
                           attention="xla", kernels="reference")
    params = jax.eval_shape(lambda: vae.init(config, jax.random.key(0)))
    z = jax.ShapeDtypeStruct((BATCH, 16, 24, config.latent_channels), jnp.float32)
    analytic = flops.vae_decoder(config, 16 * config.spatial_factor, 24 * config.spatial_factor, BATCH)
    check("VAE decode", analytic.total, xla_flops(lambda p, z: vae.decode(p, config, z), params, z), 0.05)
    grad = jax.grad(lambda z, p: jnp.sum(vae.decode(p, config, z) ** 2))
    check("VAE decode + input gradient", (analytic + analytic.backward()).total, xla_flops(grad, z, params), 0.05)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_forward_and_backward(net):
    params = lpips.param_shapes(net)
    x = jax.ShapeDtypeStruct((BATCH, 64, 64, 3), jnp.float32)
    forward, backward = flops.lpips(net, 64, 64, BATCH)
    distance = lambda p, x, y: jnp.sum(lpips.lpips_distance(p, net, x, y, "reference"))  # noqa: E731
    check(f"LPIPS-{net}", forward.total, xla_flops(distance, params, x, x), 0.05)
    check(f"LPIPS-{net} + image gradient", (forward + backward).total,
          xla_flops(jax.grad(distance, argnums=1), params, x, x), 0.05)


def test_flux2_dev_step_flops():
    """FLUX.2-dev at 512² HR (1,024 target + 1,024 reference + 512 text tokens): an SFT step is about two forwards
    (a frozen base forms no weight gradients), a DPO micro-step about six."""
    config, v_config = flux2.preset("flux2-dev"), vae.VAEConfig.preset("flux2")
    lora = lora_lib.LoRAConfig()
    forward = flops.transformer(config, 2048, 512, 1, lora).total
    sft = flops.sft_step(config, v_config, lora, (32, 32), 512, "vgg").total
    dpo = flops.dpo_micro_step(config, lora, (32, 32), 512).total
    print(f"forward {forward:.3e}, SFT step {sft:.3e}, DPO micro-step {dpo:.3e}")
    assert 1.9 < flops.sft_step(config, v_config, lora, (32, 32), 512, None).total / forward < 2.1
    assert sft > flops.sft_step(config, v_config, lora, (32, 32), 512, None).total
    assert 5.8 < dpo / forward < 6.2
    np.testing.assert_allclose(forward, 1.5e14, rtol=0.05)
