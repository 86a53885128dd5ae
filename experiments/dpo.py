"""The main job. Until the FoA-SR stages land, it is the tiny-preset sampling demo (`experiments.sample`).

    python -m experiments.dpo
"""

from experiments import sample

if __name__ == "__main__":
    sample.main()
