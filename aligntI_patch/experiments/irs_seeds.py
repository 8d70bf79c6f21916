"""Fig. 4 over seeds: the teacher's IRS per layer (Eq. 4), both pairings, for several pairing seeds.

    python -m aligntI_patch.experiments irs --out DIR [--seeds 5] [--num-pairs 1000]

The teacher is fixed, so a seed changes only the pairs drawn: per seed, `aligntI_patch.irs` on DIR's teacher and
the world's finetune data (the data IVA's layer choice reads: a distillation run with `--seed S` draws the same
i.i.d. pairs) -> DIR/irs/seed<S>/irs.json and irs.png, reused when present. Then, per pairing, the mean IRS per
layer with its 95 % t interval, the layer where each seed peaks, and the paired difference (same seed) between
the two layers of highest mean: DIR/irs/fig4.png (curves with bands over relative depth, the paper's peak at
3/4 depth marked) and DIR/irs/summary.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aligntI_patch.experiments.plots import band_plot
from aligntI_patch.experiments.report import markdown_table
from aligntI_patch.experiments.stats import mean_interval, paired_difference

logger = logging.getLogger(__name__)

PAPER_PEAK_DEPTH = 0.75  # layer 21 of the paper's 28 (Fig. 4, Table 7)


def run_seeds(out: Path, seeds: list[int], num_pairs: int, batch_size: int) -> dict[int, dict]:
    """{seed: irs.json} for `seeds`, computing the missing ones with the teacher loaded once."""
    setup = json.loads((out / "setup.json").read_text())
    world = Path(setup["world"])
    dest = {s: out / "irs" / f"seed{s}" for s in seeds}
    missing = [s for s in seeds if not (dest[s] / "irs.json").is_file()]
    if missing:
        from aligntI_patch.attention_hook import decoder_layers
        from aligntI_patch.irs import irs_curves, write_irs
        from llava.model.builder import load_pretrained_model

        tokenizer, model, image_processor, context_len = load_pretrained_model(setup["teacher"], device="cpu")
        model.eval()
        conv_mode = getattr(model.config, "conv_template", None) or setup.get("version") or "qwen_2"
        layers = list(range(len(decoder_layers(model))))
        for seed in missing:
            logger.info("IRS of the teacher, pairing seed %d", seed)
            curves = irs_curves(model, tokenizer, image_processor, context_len, str(world / "finetune.json"),
                                str(world / "images"), conv_mode, num_pairs, batch_size, seed)
            (first, (scores, used)), *others = curves.items()
            write_irs(dest[seed], layers, scores, used, first, dict(others))
    return {s: json.loads((dest[s] / "irs.json").read_text()) for s in seeds}


def curves_of(result: dict) -> dict[str, list[float]]:
    """{pairing: IRS per layer} of one irs.json (one curve, or `curves` when it has both)."""
    if "curves" in result:
        return {k: v["irs"] for k, v in result["curves"].items()}
    return {result["pairing"]: result["irs"]}


def summarize(results: dict[int, dict]) -> dict[str, dict]:
    """Per pairing: `mean` (an Estimate per layer, over seeds), `peaks` ({seed: layer of its highest IRS}),
    `top` and `runner_up` (the layers of the two highest means) and `gap` (their paired difference)."""
    per: dict[str, dict[int, list[float]]] = {}
    for seed, result in results.items():
        for pairing, curve in curves_of(result).items():
            per.setdefault(pairing, {})[seed] = curve
    summary = {}
    for pairing, by_seed in per.items():
        layers = range(len(next(iter(by_seed.values()))))
        mean = [mean_interval([c[k] for c in by_seed.values()]) for k in layers]
        top, runner_up = sorted(layers, key=lambda k: mean[k].mean, reverse=True)[:2]
        gap = paired_difference({s: c[top] for s, c in by_seed.items()},
                                {s: c[runner_up] for s, c in by_seed.items()})
        peaks = {s: max(layers, key=c.__getitem__) for s, c in by_seed.items()}
        summary[pairing] = {"mean": mean, "peaks": peaks, "top": top, "runner_up": runner_up, "gap": gap}
    return summary


def markdown(summary: dict[str, dict], seeds: list[int]) -> str:
    num_layers = len(next(iter(summary.values()))["mean"])
    header = ["pairing", *(f"layer {k} ({k / max(num_layers - 1, 1):.2f})" for k in range(num_layers)),
              "peak layer per seed", "top − runner-up (same seed)"]
    rows = []
    for pairing, s in summary.items():
        gap = s["gap"]
        peaks = ", ".join(str(s["peaks"][k]) for k in sorted(s["peaks"]))
        rows.append([pairing, *(e.format(3) for e in s["mean"]), peaks,
                     f"layer {s['top']} − {s['runner_up']}: {gap.format(3)} ({gap.sign()})" if gap else "-"])
    return ("IRS per layer of the teacher (relative depth in brackets), mean ± 95 % t interval over pairing seeds "
            f"{seeds}; the paper's curve peaks at 3/4 depth (layer 21 of 28).\n\n" + markdown_table(header, rows)
            + "\n")


def write_plot(path: Path, summary: dict[str, dict], title: str) -> None:
    def decorate(ax) -> None:
        ax.axvline(PAPER_PEAK_DEPTH, color="grey", linestyle=":", label="the paper's peak (3/4 depth)")

    depth = {pairing: [k / max(len(s["mean"]) - 1, 1) for k in range(len(s["mean"]))] for pairing, s in summary.items()}
    band_plot(path, {f"{pairing} pairs": (depth[pairing], s["mean"]) for pairing, s in summary.items()},
              "relative depth of the teacher's layer (0 = first, 1 = last)", "IRS (Eq. 4)", title, decorate,
              marker="o")


def irs_over_seeds(out: str | Path, seeds: list[int], num_pairs: int = 1000, batch_size: int = 8) -> str:
    """Run (or reuse) each seed's IRS, write fig4.png and summary.md under DIR/irs; return the markdown."""
    out = Path(out)
    results = run_seeds(out, seeds, num_pairs, batch_size)
    summary = summarize(results)
    write_plot(out / "irs" / "fig4.png", summary,
               f"Fig. 4: the teacher's IRS per layer, mean ± 95 % t over {len(seeds)} pairing seeds")
    text = markdown(summary, seeds) + "\n![Fig. 4 over seeds](fig4.png)\n"
    (out / "irs" / "summary.md").write_text(text)
    return text
