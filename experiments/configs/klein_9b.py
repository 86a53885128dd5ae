"""FLUX.2 [klein] 9B: the full-scale recipe of flux2_dev on the smaller distilled backbone (no guidance embedding).

    python -m experiments.dpo --preset klein-9b --transformer T --vae V --prompt-embedding P --hr DIR --iqa-weights IQA/
"""

import dataclasses

from experiments.configs import flux2_dev, schema


def get_config() -> schema.Config:
    return dataclasses.replace(flux2_dev.get_config(), preset="klein-9b", transformer="klein-9b")
