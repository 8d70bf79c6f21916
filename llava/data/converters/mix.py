"""A training mix from several LLaVA JSON files: per-source counts or fractions, one seed, a manifest.

    python -m llava.data.convert merge vsr=vsr.json:13000 sqa.json:all coco=coco_caps.jsonl:0.5 \\
        --seed 0 -o mix.json            # + mix.manifest.json

Design choices:
- A source is `[NAME=]PATH[:SPEC]`; SPEC is `all` (default), a count (`13000`), a fraction (`0.25`, `25%`) of
  the source's valid records, or above its size (`2x`, `1.5`, a count larger than the source) to repeat it:
  whole copies, then a sample of the rest. NAME defaults to the file's stem.
- Every record goes through the `llava` normaliser first (the training checks, `<image>` placement, images by
  stat with `--image_folder`), so counts are of valid records and bad ones are counted per source.
- Determinism: each source samples with its own generator seeded by (seed, NAME), so adding or removing a
  source does not change what another contributes; the mix is then shuffled with (seed, "shuffle")
  (`--no_shuffle`: sources in the given order, each in file order). Same inputs and seed: same file, byte for byte.
- Memory: the valid records of one source plus the records already chosen are held in memory.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field

from llava.data.converters.common import ImagePaths, Report, Skip, read_items
from llava.data.converters.conversations import file_stem, normalise_record

_NAME = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")
_SPEC = re.compile(r"^(all|\d+|\d*\.\d+|\d+(\.\d+)?%|\d+(\.\d+)?x)$")


@dataclass
class Source:
    """One input of the mix and, once taken, its counts (written into the manifest)."""

    name: str
    path: str
    spec: str = "all"
    read: int = 0
    valid: int = 0
    skipped: dict = field(default_factory=dict)
    taken: int = 0
    repeats: float = 0.0


def parse_source(text: str) -> Source:
    """`[NAME=]PATH[:SPEC]` -> Source; a `:` whose tail is no SPEC belongs to the path."""
    name = None
    match = _NAME.match(text)
    if match and "/" not in match.group(1):
        name, text = match.group(1), match.group(2)
    path, spec = text, "all"
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        if _SPEC.match(tail.strip().lower()):
            path, spec = head, tail.strip().lower()
    return Source(name or file_stem(path), path, spec)


def target_count(spec: str, valid: int) -> int:
    """How many records SPEC asks for from a source with `valid` records."""
    if spec == "all":
        return valid
    if spec.endswith("%"):
        return round(float(spec[:-1]) / 100 * valid)
    if spec.endswith("x"):
        return round(float(spec[:-1]) * valid)
    if "." in spec:
        return round(float(spec) * valid)
    return int(spec)


def take(records: list, n: int, rng: random.Random) -> list:
    """`n` records: whole copies while n >= len, then a sample without replacement in file order."""
    if n <= 0 or not records:
        return []
    copies, rest = divmod(n, len(records))
    picked = sorted(rng.sample(range(len(records)), rest))
    return records * copies + [records[i] for i in picked]


def load_source(src: Source, paths: ImagePaths, skipped_log=None) -> tuple[list, Report]:
    """The source's valid, normalised records and the report of what was skipped."""
    report = Report(src.path, skipped_log=skipped_log)
    records = []
    stem = src.name
    for item in read_items(src.path):
        report.read += 1
        try:
            records.append(normalise_record(item, paths, report, stem))
        except Skip as err:
            report.skip(item, err)
    src.read, report.written = report.read, len(records)
    src.valid = len(records)
    src.skipped = dict(report.skipped)
    return records, report


def build_mix(sources: list[Source], paths: ImagePaths, seed: int, shuffle: bool = True,
              skipped_log=None) -> tuple[list, list[Report]]:
    """-> (the mix's records, one report per source); fills each Source's counts."""
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two sources are named {', '.join(dupes)}: name them, e.g. coco_a=PATH and coco_b=PATH")
    mix, reports = [], []
    for src in sources:
        records, report = load_source(src, paths, skipped_log)
        reports.append(report)
        n = target_count(src.spec, src.valid)
        if n > 0 and not records:
            raise ValueError(f"{src.path}: no valid record to take {n} from ({report.summary(None, kept='valid')})")
        chosen = take(records, n, random.Random(f"{seed}/{src.name}"))
        src.taken = len(chosen)
        src.repeats = round(src.taken / src.valid, 4) if src.valid else 0.0
        mix += chosen
    if shuffle:
        random.Random(f"{seed}/shuffle").shuffle(mix)
    return mix, reports


def manifest(sources: list[Source], output: str | None, seed: int, shuffle: bool, total: int, argv=None) -> dict:
    return {"output": output, "total": total, "seed": seed, "shuffled": shuffle,
            "sources": [asdict(s) | {"share": round(s.taken / total, 6) if total else 0.0} for s in sources],
            "command": argv}


def manifest_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".manifest.json"


def write_manifest(path: str, data: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
