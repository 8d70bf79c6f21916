"""Converters behind `python -m llava.data.convert`: `common` (reading, image paths, report, writer),
`conversations` (LLaVA / ShareGPT / ShareGPT4V records), `tables` (VQA and caption rows), `mix` (merge)."""
