"""Analytic model FLOPs of Flux2SR's steps: matrix products only, 2·m·n·k each, as MFU is usually counted.

Elementwise work (norms, softmax, RoPE, the optimizer) and rematerialised forwards are not model FLOPs, and a
convolution's taps on its zero padding are no products (XLA counts them the same way). A backward
pass forms, for a frozen product y = x·W, only dx = dy·Wᵀ, and only where x depends on a trainable weight; attention
and LoRA backward passes cost twice their forward (dQ, dK, dV and dP; dA, dB and the two input gradients). For a LoRA
step the first double block's projections of x and c therefore form no input gradient, and no weight gradient of the
base is formed anywhere: an SFT step is about twice a forward, not three times.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from foa_jax import lora as lora_lib
from foa_jax.models import flux2, vae
from foa_jax.models import lpips as lpips_net


@dataclass(frozen=True)
class Count:
    """FLOPs of one pass split by kind: frozen linears whose input needs no gradient (`head`), other frozen linears
    (`linear`), attention score and value products (`attention`), LoRA factors (`lora`), convolutions (`conv`)."""

    head: float = 0.0
    linear: float = 0.0
    attention: float = 0.0
    lora: float = 0.0
    conv: float = 0.0

    @property
    def total(self) -> float:
        return self.head + self.linear + self.attention + self.lora + self.conv

    def __add__(self, other: "Count") -> "Count":
        return Count(*(a + b for a, b in zip(self._values(), other._values())))

    def __mul__(self, factor: float) -> "Count":
        return Count(*(a * factor for a in self._values()))

    def _values(self):
        return self.head, self.linear, self.attention, self.lora, self.conv

    def backward(self) -> "Count":
        """The backward pass of a forward with these FLOPs when only LoRA factors (or nothing) train and the input
        needs a gradient: input gradients of frozen linears and convolutions, twice the attention and the LoRA."""
        return Count(0.0, self.linear, 2 * self.attention, 2 * self.lora, self.conv)


def _lora_modules(config: flux2.Flux2Config, lora: lora_lib.LoRAConfig | None) -> set[str]:
    if lora is None:
        return set()
    shapes = jax.eval_shape(lambda: flux2.init(config, jax.random.key(0)))
    return set(lora_lib.target_modules(shapes, lora))


def transformer(config: flux2.Flux2Config, image_tokens: int, text_tokens: int, batch: int = 1,
                lora: lora_lib.LoRAConfig | None = None) -> Count:
    """One forward of `flux2.apply` on `batch` samples of `image_tokens` (target + reference) and `text_tokens`."""
    d, f, n, txt = config.inner_dim, config.mlp_hidden_dim, image_tokens, text_tokens
    s = n + txt
    targets = _lora_modules(config, lora)
    rank = lora.rank if lora is not None else 0

    def lin(tokens, fan_in, fan_out):
        return 2.0 * tokens * fan_in * fan_out

    def adapted(module, tokens, fan_in, fan_out):
        return 2.0 * tokens * rank * (fan_in + fan_out) if module in targets else 0.0

    embedders = 1 + int(config.guidance_embeds)
    head = (embedders * lin(1, config.timestep_guidance_channels, d) + embedders * lin(1, d, d)
            + 2 * lin(1, d, 6 * d) + lin(1, d, 3 * d) + lin(1, d, 2 * d)
            + lin(n, config.in_channels, d) + lin(txt, config.joint_attention_dim, d))
    linear = lin(n, d, config.out_dim)
    attention = (config.num_layers + config.num_single_layers) * 4.0 * s * s * d
    lora_flops = 0.0
    stream = {"attn": (n, ("to_q", "to_k", "to_v"), ("to_out.0",)),
              "add": (txt, ("add_q_proj", "add_k_proj", "add_v_proj"), ("to_add_out",))}
    for tokens, inputs, outputs in stream.values():
        first_inputs = 3 * lin(tokens, d, d)  # the first block's projections of x and c: no input gradient
        head += first_inputs
        linear += config.num_layers * (lin(tokens, d, d) * (3 + len(outputs)) + lin(tokens, d, 2 * f)
                                       + lin(tokens, f, d)) - first_inputs
        for name in inputs + outputs:
            lora_flops += config.num_layers * adapted(f"transformer_blocks.attn.{name}", tokens, d, d)
    for name, tokens in (("ff", n), ("ff_context", txt)):
        lora_flops += config.num_layers * (adapted(f"transformer_blocks.{name}.linear_in", tokens, d, 2 * f)
                                           + adapted(f"transformer_blocks.{name}.linear_out", tokens, f, d))
    linear += config.num_single_layers * (lin(s, d, 3 * d + 2 * f) + lin(s, d + f, d))
    lora_flops += config.num_single_layers * (
        adapted("single_transformer_blocks.attn.to_qkv_mlp_proj", s, d, 3 * d + 2 * f)
        + adapted("single_transformer_blocks.attn.to_out", s, d + f, d))
    return Count(head, linear, attention, lora_flops) * batch


def _taps(size: int, kernel: int, stride: int, low: int, high: int) -> int:
    """Σ over output positions along one axis of the kernel taps that fall inside the input (padding adds none)."""
    out = (size + low + high - kernel) // stride + 1
    return sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride + t - low < size)


def conv(height: int, width: int, kernel: int, cin: int, cout: int, stride: int = 1, pads=None) -> float:
    """FLOPs of one 2-D convolution of a height x width input, 'SAME'-style pads of kernel // 2 unless given as
    ((top, bottom), (left, right))."""
    (top, bottom), (left, right) = pads if pads is not None else ((kernel // 2, kernel // 2),) * 2
    return 2.0 * cin * cout * _taps(height, kernel, stride, top, bottom) * _taps(width, kernel, stride, left, right)


def vae_decoder(config: vae.VAEConfig, height: int, width: int, batch: int = 1) -> Count:
    """One forward of `vae.decode` for images of `height` x `width` pixels (upsamplers as their four 2x2 phase
    convolutions at the low resolution, as `vae._upsample` computes them)."""
    h, w = height // config.spatial_factor, width // config.spatial_factor
    convs, linear, attention = 0.0, 0.0, 0.0
    channels = config.decoder_channels
    bottom, latent = channels[-1], config.latent_channels
    if config.use_post_quant_conv:
        convs += conv(h, w, 1, latent, latent)
    convs += conv(h, w, 3, latent, bottom)

    def resnet(cin, cout):
        return conv(h, w, 3, cin, cout) + conv(h, w, 3, cout, cout) + (conv(h, w, 1, cin, cout) if cin != cout else 0)

    convs += 2 * resnet(bottom, bottom)
    if config.mid_block_add_attention:
        linear += 4 * 2.0 * h * w * bottom * bottom
        attention += 4.0 * (h * w) ** 2 * bottom
    for cin, cout, resampler in vae._decoder_stages(config):
        for j in range(config.layers_per_block + 1):
            convs += resnet(cin if j == 0 else cout, cout)
        if resampler:  # four 2 x 2 phase convolutions, phase (r, c) padded ((1 - r, r), (1 - c, c))
            convs += sum(conv(h, w, 2, cout, cout, pads=((1 - r, r), (1 - c, c))) for r in (0, 1) for c in (0, 1))
            h, w = 2 * h, 2 * w
    convs += conv(h, w, 3, channels[0], config.out_channels)
    return Count(linear=linear, attention=attention, conv=convs) * batch


def lpips(net: str, height: int, width: int, pairs: int = 1) -> tuple[Count, Count]:
    """(forward, backward) of `lpips.lpips_distance` on `pairs` image pairs: the trunk runs on both images and the
    1 x 1 heads on their difference; the backward reaches only the first image (the decoded one in SFT)."""
    trunk, heads = 0.0, 0.0
    h, w = height, width
    for layers in lpips_net.TRUNKS[net]:
        for layer in layers:
            if isinstance(layer, lpips_net.MaxPool):
                h, w = (h - layer.window) // layer.stride + 1, (w - layer.window) // layer.stride + 1
                continue
            pads = ((layer.padding, layer.padding),) * 2
            trunk += conv(h, w, layer.size, layer.in_channels, layer.out_channels, layer.stride, pads)
            h = (h + 2 * layer.padding - layer.size) // layer.stride + 1
            w = (w + 2 * layer.padding - layer.size) // layer.stride + 1
        heads += 2.0 * h * w * [x for x in layers if isinstance(x, lpips_net.Conv)][-1].out_channels
    return Count(conv=2 * trunk + heads) * pairs, Count(conv=trunk + heads) * pairs


def sft_step(t_config: flux2.Flux2Config, v_config: vae.VAEConfig, lora: lora_lib.LoRAConfig,
             grid: tuple[int, int], text_tokens: int, lpips_net_name: str | None, batch: int = 1,
             pixel_samples: int = 0) -> Count:
    """A LoRA SFT step: the transformer forward and backward on target + reference tokens, and, for the pixel terms
    (`lpips_net_name` None: flow matching only), the decoder forward and backward and LPIPS on the decoded and the
    HR image with the backward through the decoded one."""
    tokens = grid[0] * grid[1]
    forward = transformer(t_config, 2 * tokens, text_tokens, batch, lora)
    total = forward + forward.backward()
    if lpips_net_name is not None:
        k = pixel_samples or batch
        size = (grid[0] * v_config.token_factor, grid[1] * v_config.token_factor)
        decode = vae_decoder(v_config, *size, k)
        total = total + decode + decode.backward() + sum(lpips(lpips_net_name, *size, k), Count())
    return total


def dpo_micro_step(t_config: flux2.Flux2Config, lora: lora_lib.LoRAConfig, grid: tuple[int, int], text_tokens: int,
                   batch: int = 1, reference_lora: bool = True) -> Count:
    """One DPO micro-batch: winner and loser (2·batch samples) through the policy forward and backward and through
    the reference forward (with its adapter unless the reference is the base)."""
    tokens = grid[0] * grid[1]
    policy = transformer(t_config, 2 * tokens, text_tokens, 2 * batch, lora)
    reference = transformer(t_config, 2 * tokens, text_tokens, 2 * batch, lora if reference_lora else None)
    return policy + policy.backward() + reference


def sampler_step(t_config: flux2.Flux2Config, grid: tuple[int, int], text_tokens: int, batch: int = 1,
                 lora: lora_lib.LoRAConfig | None = None) -> Count:
    """One Euler step of `sampling.sample`: a transformer forward on target + reference tokens."""
    return transformer(t_config, 2 * grid[0] * grid[1], text_tokens, batch, lora)
