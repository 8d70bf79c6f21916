"""Miniature reproduction of the paper's experiments: grids of cells over seeds, and an honest report.

    python -m aligntI_patch.experiments run --grid loss_terms --seeds 5 --out runs/repro
    python -m aligntI_patch.experiments report --out runs/repro

A grid (`grids.py`) is a table or figure of the paper: rows (a recipe of `aligntI_patch/recipes.py` plus
distillation flags) and the claims the paper makes about them. A cell is one row at one seed: a student
trained with `python -m aligntI_patch.distill` from the tiny preset's cached teacher and student pretrain
stage, with the main job's hyperparameters, then scored on the tiny world's val and test splits (`cell.py`);
at full scale the main job's script trains it and lmms-eval tasks score it (`context.py`, `lmms_scorer.py`).
The runner (`runner.py`) makes cells resumable and writes one JSONL row each; the report (`report.py`,
`stats.py`, `plots.py`) turns the rows into mean ± 95 % t intervals, the gap recovered and paired
differences per claim, and a PNG per grid. Usage, grids and the report's contents: docs/reproduction.md.
"""
