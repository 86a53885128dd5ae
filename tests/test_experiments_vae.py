"""experiments.vae: a few steps of the tiny VAE stage write a weights folder whose held-out figures are those its
own metrics function gives on reload (resume is the shared `common.resume_or_start`, tested with the SFT stage)."""

import pytest

from experiments import configs
from experiments import vae as V
from ports import weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = ["batch=2", "bn_samples=4", "checkpoint_every=2", "data.gt_size=32", "held_out.size=64",
         "held_out.crops=1", "optim.warmup=1"]


def _run(out, steps, *extra):
    return V.main(["--out", str(out), "--steps", str(steps), *extra, *SMALL])


def test_stage_writes_weights_with_their_held_out_figures(tmp_path):
    straight = _run(tmp_path / "a", 4)
    manifest = weights.verify(straight)
    assert manifest["provenance"]["stage"] == "vae"
    loaded = weights.load(straight)
    held = V.held_out_images(configs.override(configs.get("tiny").vae, SMALL).held_out)
    again = V.reconstruction_metrics(loaded.vae, loaded.vae_config, held)
    assert again["psnr"] == pytest.approx(manifest["provenance"]["held_out"]["psnr"], abs=1e-9)

