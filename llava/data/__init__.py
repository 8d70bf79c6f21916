"""Data tools: the dataset doctor (`python -m llava.data.check`) and converters of public data sets to LLaVA JSON."""
