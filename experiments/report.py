"""The main job's report, `report/report.md`, from the files the stages wrote (it runs nothing itself)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from experiments import artifacts, common
from experiments import evaluate as evaluate_stage
from experiments import mine as mine_stage
from foa_jax import rewards
from ports import iqa, weights


def dpo_summary(folder: Path) -> dict:
    """Steps, first loss and the last tenth's mean loss, implicit accuracy and reward margin of one DPO run."""
    records = [r for r in common.Metrics(folder / "metrics.jsonl").read() if "accuracy" in r]
    tail = records[-max(1, len(records) // 10):]

    def mean(key):
        return float(np.mean([r[key] for r in tail])) if tail else float("nan")

    return {"steps": len(records), "first_loss": records[0]["loss"] if records else float("nan"),
            "final_loss": mean("loss"), "final_accuracy": mean("accuracy"), "final_margin": mean("reward_margin")}


def claim_rows(means: dict, metrics: list[str], faithful_metrics, aesthetic_metrics) -> list[str]:
    """Each adapter against Flux2SR per metric: the raw difference and whether it moved the better way."""
    rows = ["| metric | kind | bicubic | Flux2SR | " + " | ".join(f"{p} (Δ)" for p in rewards.PROFILES) + " |",
            "|---|---|---:|---:|" + "---:|" * len(rewards.PROFILES)]
    for m in metrics:
        kind = "full-reference" if iqa.REGISTRY[m].full_reference else "no-reference"
        sign = 1 if rewards.metric_spec(m).higher_is_better else -1
        role = ", in R_F" if m in faithful_metrics else ", in R_A" if m in aesthetic_metrics else ""
        cells = []
        for p in rewards.PROFILES:
            delta = means[p][m] - means["flux2sr"][m]
            verdict = "better" if sign * delta > 0 else "worse" if delta else "="
            cells.append(f"{means[p][m]:.4f} ({delta:+.4f} {verdict})")
        rows.append(f"| {m} | {kind}{role} | {means['bicubic'][m]:.4f} | {means['flux2sr'][m]:.4f} | "
                    + " | ".join(cells) + " |")
    return rows


def _improved(means: dict, profile: str, metrics) -> tuple[int, int]:
    better = sum((means[profile][m] - means["flux2sr"][m]) * (1 if rewards.metric_spec(m).higher_is_better else -1) > 0
                 for m in metrics)
    return better, len(metrics)


def _took(timing: dict) -> str:
    return "reused" if timing["reused"] else f"{timing['seconds']:.0f} s"


def flux2sr_section(sft_folder: Path | None) -> list[str]:
    """Where Flux2SR came from and its held-out figures, as its weights folder's manifest records them."""
    if sft_folder is None:
        return ["## Flux2SR", "", "A RANDOM tiny model (`--random-init`): no figure below is a result.", ""]
    provenance = weights.read_manifest(sft_folder)["provenance"]
    lines = ["## Flux2SR", "", f"Weights: `{sft_folder}`, made by `{provenance.get('command')}` at commit "
             f"`{provenance.get('commit')}`."]
    vae = (provenance.get("vae") or {}).get("held_out")
    if vae:
        lines += ["", f"Its VAE (made by `{provenance['vae'].get('command')}`): held-out reconstruction PSNR "
                      f"{vae['mean_psnr']:.2f} dB, colour error {vae['mean_colour_error']:.2f}/255 "
                      f"({len(vae['psnr'])} crops), the ceiling of every tiny SR result."]
    table = provenance.get("held_out")
    if table:
        columns = list(next(iter(table.values())))
        lines += ["", "Held-out validation at the end of SFT (the 32 crops evaluated below, one seed):", "",
                  "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns),
                  *[f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |"
                    for name, row in table.items()]]
    return lines + [""]


def write(root: Path, times: dict, flux2sr: common.Flux2SR, sft_folder: Path | None) -> Path:
    """`report/report.md`: what ran, the paper's claim measured at this scale, the evaluation beside bicubic, the
    side-by-side crops, Flux2SR's provenance and figures, mining statistics and the DPO runs."""
    folder = root / "report"
    folder.mkdir(parents=True, exist_ok=True)
    mine_stats = json.loads((root / "mine" / "stats.json").read_text())
    meta = artifacts.load_pairs(artifacts.pairs_path(root / "mine", "faithful"), flux2sr.fingerprint,
                                mine_stats["preset"])["meta"]
    evaluation = json.loads((root / "eval" / "metrics.json").read_text())
    means, metrics = evaluation["means"], evaluation["config"]["metrics"]
    stats = {int(k): rewards.MiningStats(**v) for k, v in mine_stats["statistics"].items()}
    k = mine_stats["pool_size"]
    for name in ("perception_distortion.png", "crops.png"):
        shutil.copy(root / "eval" / name, folder / name)
    grids = sorted((root / "mine" / "grids").glob("*.png"))[:2]
    for grid in grids:
        shutil.copy(grid, folder / f"mining_{grid.name}")
    fr = [m for m in metrics if iqa.REGISTRY[m].full_reference]
    nr = [m for m in metrics if not iqa.REGISTRY[m].full_reference]
    f_fr, a_nr = _improved(means, "faithful", fr), _improved(means, "aesthetic", nr)
    h_fr, h_nr = _improved(means, "hybrid", fr), _improved(means, "hybrid", nr)
    dpo = {p: dpo_summary(root / "dpo" / p) for p in rewards.PROFILES}
    total = sum(t["seconds"] for t in times.values())
    title = "# FoA-SR: profile-aware preference optimisation, measured" + (" — RANDOM model" if flux2sr.random else "")

    lines = [
        title, "",
        f"Preset `{meta['preset']}`; run folder `{root}`; this session {total / 60:.1f} min.", "",
        "| stage | folder | this session |", "|---|---|---|",
        *[f"| {name} | `{t['folder']}` | {_took(t)} |" for name, t in times.items()], "",
        "## The claim at this scale", "",
        f"On {evaluation['pairs']} held-out LR/HR pairs ({evaluation['source']}), against Flux2SR (the same SFT model "
        f"the three adapters start from; raw metric means, every method from the same noise):", "",
        f"- **Faithful** improves {f_fr[0]} of {f_fr[1]} full-reference metrics ({', '.join(fr)}).",
        f"- **Aesthetic** improves {a_nr[0]} of {a_nr[1]} no-reference metrics ({', '.join(nr)}).",
        f"- **Hybrid** improves {h_fr[0]}/{h_fr[1]} full-reference and {h_nr[0]}/{h_nr[1]} no-reference metrics.",
        f"- The two rewards pick different winners in {100 * stats[k].winner_disagreement:.1f}% of the "
        f"{stats[k].num_inputs} mined pools of K = {k} (paper: 78.4% on 500 inputs; two unrelated rankings: "
        f"{100 * (1 - 1 / k):.1f}%), mean Spearman ρ between the R_F and R_A rankings {stats[k].mean_spearman:+.3f} "
        f"(paper −0.031).", "",
        "Per metric (bicubic, Flux2SR, and each adapter with its difference to Flux2SR):", "",
        *claim_rows(means, metrics, meta["faithful_metrics"], meta["aesthetic_metrics"]), "",
        f"Rewards used for mining: R_F = mean of {', '.join(meta['faithful_metrics'])}; R_A = mean of "
        f"{', '.join(meta['aesthetic_metrics'])}; R_H = (R_F + R_A) / 2 (pool-wise min–max, τ = "
        f"{meta['reward']['gap_threshold']}).", "",
        "Side by side at full size (LR enlarged by pixel repetition, bicubic, each method, HR):", "",
        "![crops](crops.png)", "", "![perception-distortion](perception_distortion.png)", "",
        "## Evaluation (raw means)", "", evaluate_stage.mean_table(means, metrics), "",
        f"Per-image rows, CSV and JSON: `{root / 'eval'}`.", "",
        "Metric settings:", "", evaluation["metric_settings"], "",
        *flux2sr_section(sft_folder),
        "## Preference mining", "",
        f"{mine_stats['inputs']} LR inputs, pairs from the first K = {k} candidates; full report "
        f"`{root / 'mine' / 'report.md'}`. Ours [paper]:", "",
        mine_stage.statistics_table(stats), "",
        "Pairs kept per profile: " + ", ".join(f"{p} {v['kept']}" for p, v in mine_stats["pairs"].items()) + ".", "",
        *[f"![{g.stem}](mining_{g.name})" for g in grids], "",
        "## Profile DPO", "",
        "| profile | steps | loss first → last 10% | implicit accuracy (last 10%) | reward margin (last 10%) |",
        "|---|---:|---|---:|---:|",
        *[f"| {p} | {d['steps']} | {d['first_loss']:.4f} → {d['final_loss']:.4f} | {d['final_accuracy']:.3f} | "
          f"{d['final_margin']:+.4f} |" for p, d in dpo.items()], "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
