"""The tiny built-in world used by every test and the CPU preset:

- `llava.tiny.world`: seeded synthetic images and LLaVA conversation data (`generate_world`, CLI
  ``python -m llava.tiny.world --out playground/tiny/data``), from `scenes` (3x3 grids of objects, rendered)
  and `questions` (the seven question families);
- `llava.tiny.tokenizer`: a Qwen-style byte-level BPE tokenizer trained on the world's text
  (`build_tiny_tokenizer`);
- `llava.tiny.score`: per-family answer scoring and the markdown results table.

Nothing is imported here, so ``python -m llava.tiny.world`` runs its module exactly once.
"""
