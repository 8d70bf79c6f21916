"""Dataset doctor: what training would skip in a LLaVA data set, found before a GPU hour is spent on it.

    python -m llava.data.check --data_path D.json --image_folder IMGS [--model-path M] [--json report.json]

Reports records, image / text-only share, missing / escaping / unreadable images, malformed records, turns,
token lengths and samples whose visual tokens `--model_max_length` would cut; prints a short summary, writes
the full report as JSON, and exits 1 when more than `--max_bad_fraction` of the samples are bad (2: it could
not check). Design choices:

- One definition of "bad": every check is the training data code's own (`llava.train.data`: `check_record`,
  `read_image`, `tokenize_conversation` + `truncate_sample`), so this reports what `LazySupervisedDataset`
  would skip, with the same kinds (`BAD_KINDS`) and reasons.
- Cheap and full: `scan` runs the cheap part (JSON structure, roles, image files by stat: about 10 us a record
  on a local disk, 7 s for 665k) and is what training runs before step 1 (`preflight`). The doctor adds the
  decode of a sample of the images (all with `--decode all`) and, with a tokenizer, every record's tokens.
- N_v comes from the vision tower's config (SigLIP: (image_size / patch_size)^2) without loading weights.
- The pre-flight under several processes: rank 0 scans and broadcasts its summary; every rank raises the same
  error, so all stop together. One scan, not one per rank: on a shared file system N ranks x 665k stats would
  load the metadata server for nothing. Per-node copies of the images are judged by rank 0's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch.distributed as dist

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import tokenize_conversation
from llava.train.data import (
    BAD_KINDS,
    BadSample,
    LazySupervisedDataset,
    check_record,
    conversation_from,
    load_records,
    read_image,
    skip_entry,
    truncate_sample,
)
from llava.train.distributed import is_multi_process

logger = logging.getLogger(__name__)
FIRST_OFFENDERS = 10  # named in the doctor's summary and the pre-flight's warning
PREFLIGHT_OFFENDERS = 5  # named in the pre-flight's error
OFFENDERS_IN_JSON = 10000  # detailed records in the JSON report; `bad_indices` lists every one


class PreflightError(ValueError):
    """More of the data set is bad than --max_bad_fraction allows; the message names counts and offenders."""


def has_image(record) -> bool:
    """Whether the record names an image (LLaVA's convention, as `modality_lengths`): not absent, null, []."""
    return isinstance(record, dict) and record.get("image") not in (None, [])


def scan(records: Sequence, image_folder: str | None) -> list[dict]:
    """The cheap checks (`check_record`: JSON structure, roles, image files by stat) of every record -> the
    skip records (index, id, image, kind, reason) of the bad ones."""
    bad = []
    for i, record in enumerate(records):
        try:
            check_record(record, image_folder)
        except BadSample as err:
            bad.append(skip_entry(i, record, err))
    return bad


def folder_hint(image_folder: str | None, data_path: str, with_image: int, missing: int) -> str | None:
    """A sentence for the usual cause of many missing images: a wrong or absent --image_folder."""
    if not with_image:
        return None
    if image_folder is None:
        return f"{with_image} samples have an image but no --image_folder was given"
    if not os.path.isdir(image_folder):
        return f"--image_folder {image_folder} is not a directory"
    if missing == with_image:
        return (f"none of the {with_image} image files was found under --image_folder {image_folder}: is it "
                f"the folder that the image paths in {data_path} are relative to?")
    return None


def summarize(bad: list[dict], records: Sequence, image_folder: str | None, data_path: str) -> dict:
    """Counts by kind, the first offenders and a hint: what the pre-flight error and the doctor print."""
    with_image = sum(has_image(r) for r in records)
    by_kind = Counter(b["kind"] for b in bad)
    return {"records": len(records), "with_image": with_image, "bad": len(bad),
            "bad_by_kind": {k: by_kind[k] for k in BAD_KINDS if by_kind[k]}, "first": bad[:FIRST_OFFENDERS],
            "hint": folder_hint(image_folder, data_path, with_image, by_kind["missing_image"])}


def describe_bad(summary: dict, first: int = FIRST_OFFENDERS) -> list[str]:
    """Text lines: the hint, the count of each kind, the `first` offenders (index, id, image, reason)."""
    hint = summary["hint"]
    lines = [f"Hint: {hint}" + ("" if hint.endswith("?") else ".")] if hint else []
    lines += [f"  {kind}: {n} - {BAD_KINDS[kind]}" for kind, n in summary["bad_by_kind"].items()]
    if summary["first"][:first]:
        lines.append("First offenders:")
        lines += [f"  sample {b['index']} (id={b['id']}, image={b['image']}): {b['reason']}"
                  for b in summary["first"][:first]]
    return lines


def _on_rank_zero(fn: Callable[[], Any]) -> Any:
    """`fn()` run by rank 0 alone, its result (or its error) given to every rank of a multi-process run."""
    if not is_multi_process():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:
            box[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)  # the other ranks wait here: release them before raising
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"Data pre-flight failed on rank 0: {value}")
    return value


def preflight(dataset: LazySupervisedDataset, max_bad_fraction: float) -> dict:
    """Before step 1: stop when more than `max_bad_fraction` of the samples fail the cheap checks (`scan`).

    Rank 0 scans, every rank gets its summary and raises the same PreflightError (see the module docstring).
    Returns the summary (with `seconds`, the scan's time); logs it, as a warning when some samples are bad."""

    def run() -> dict:
        start = time.perf_counter()
        bad = scan(dataset.records, dataset.image_folder)
        summary = summarize(bad, dataset.records, dataset.image_folder, dataset.data_path)
        return {**summary, "seconds": time.perf_counter() - start}

    summary = _on_rank_zero(run)
    n, n_bad = summary["records"], summary["bad"]
    where = f"Data pre-flight of {dataset.data_path}: {n_bad} of {n} samples ({100 * n_bad / n:.2f} %) bad"
    cost = f"record structure and image files checked by stat in {summary['seconds']:.2f} s"
    if n_bad / n > max_bad_fraction:
        folder = f" --image_folder {dataset.image_folder}" if dataset.image_folder else ""
        raise PreflightError("\n".join([
            f"{where}, more than --max_bad_fraction {max_bad_fraction} allows ({cost}).",
            *describe_bad(summary, PREFLIGHT_OFFENDERS),
            f"Full report: python -m llava.data.check --data_path {dataset.data_path}{folder}. To train "
            "anyway (bad samples are skipped and replaced by good ones), raise --max_bad_fraction.",
        ]))
    if n_bad:
        logger.warning("\n".join([f"{where} ({cost}); they will be skipped", *describe_bad(summary)]))
    else:
        logger.info("%s (%s)", where, cost)
    return summary


@dataclass
class DoctorSettings:
    """What the full check of a data set needs; `tokenizer` None skips token counts and visual truncation."""

    image_folder: str | None
    template: str = "qwen_2"
    tokenizer: Any = None
    num_image_tokens: int | None = None  # N_v; None: unknown (images count as one token)
    model_max_length: int = 2048
    decode: set[int] | None = None  # indices whose image is decoded; None: all
    decode_mode: str = "all"
    model_path: str | None = None
    notes: list[str] = field(default_factory=list)  # what was not checked, and why


class Inspection(NamedTuple):
    """The full check of one record: turns (of any record with a list of turns), tokens (images expanded;
    of records that reach tokenization), whether its image was decoded, the fault if any."""

    turns: int | None
    tokens: int | None
    decoded: bool
    fault: BadSample | None


def inspect(record, index: int, s: DoctorSettings) -> Inspection:
    """The checks `LazySupervisedDataset.load` runs, in its order, short of processing the image."""
    turns = tokens = None
    decoded = False
    if isinstance(record, dict) and isinstance(record.get("conversations"), list):  # bad image or not
        turns = len(record["conversations"]) // 2
    try:
        image_file, values = check_record(record, s.image_folder)
        if image_file is not None and (s.decode is None or index in s.decode):
            decoded = True
            read_image(image_file)
        if s.tokenizer is not None:
            conv = conversation_from(values, s.template, image_file is not None)
            input_ids, labels, token_types = tokenize_conversation(conv, s.tokenizer)
            n_v = s.num_image_tokens or 1
            tokens = len(input_ids) + (n_v - 1) * int((input_ids == IMAGE_TOKEN_INDEX).sum())
            truncate_sample(input_ids, labels, token_types, s.model_max_length, n_v)
    except BadSample as err:
        return Inspection(turns, tokens, decoded, err)
    return Inspection(turns, tokens, decoded, None)


def distribution(values: list[int]) -> dict | None:
    """count, mean, min, p50, p95, p99, max of integer values (None when there are none)."""
    if not values:
        return None
    v = sorted(values)

    def pick(q: float) -> int:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {"count": len(v), "mean": round(sum(v) / len(v), 2), "min": v[0], "p50": pick(0.5),
            "p95": pick(0.95), "p99": pick(0.99), "max": v[-1]}


def doctor(records: list, data_path: str, s: DoctorSettings, max_bad_fraction: float,
           progress: bool = True) -> dict:
    """The full report of a data set (the JSON the CLI writes); a progress bar on a terminal."""
    from tqdm import tqdm

    start = time.perf_counter()
    bad, turns, tokens, decoded = [], [], [], 0
    bar = tqdm(records, desc="checking", unit="rec", disable=None if progress else True, mininterval=1.0,
               file=sys.stderr)  # disable=None: shown on a terminal only
    for i, record in enumerate(bar):
        found = inspect(record, i, s)
        turns += [found.turns] if found.turns is not None else []
        tokens += [found.tokens] if found.tokens is not None else []
        decoded += found.decoded
        if found.fault is not None:
            bad.append(skip_entry(i, record, found.fault))
    summary = summarize(bad, records, s.image_folder, data_path)
    n, with_image = len(records), summary["with_image"]
    return {
        "data_path": data_path, "image_folder": s.image_folder, "model_path": s.model_path,
        "template": s.template,
        "records": n, "with_image": with_image, "text_only": n - with_image,
        "image_share": round(with_image / n, 4) if n else 0.0,
        "images_decoded": decoded, "decode": s.decode_mode,
        "turns": distribution(turns), "tokens": distribution(tokens), "num_image_tokens": s.num_image_tokens,
        "model_max_length": s.model_max_length,
        "longer_than_max_length": sum(t > s.model_max_length for t in tokens),
        "bad": len(bad), "bad_fraction": round(len(bad) / n, 6) if n else 0.0,
        "max_bad_fraction": max_bad_fraction, "passed": (len(bad) / n if n else 0.0) <= max_bad_fraction,
        "bad_by_kind": summary["bad_by_kind"], "hint": summary["hint"],
        "bad_indices": [b["index"] for b in bad], "offenders": bad[:OFFENDERS_IN_JSON],
        "notes": s.notes, "seconds": round(time.perf_counter() - start, 3),
    }


def text_summary(report: dict) -> str:
    """The short text the CLI prints: counts, percentages, the first offenders."""
    n = report["records"]

    def share(k: int) -> str:
        return f"{k} ({100 * k / n:.2f} %)"

    lines = [f"{report['data_path']}: {n} records, {share(report['with_image'])} with an image, "
             f"{share(report['text_only'])} text-only"]
    if report["turns"]:
        t = report["turns"]
        lines.append(f"  turns per record: mean {t['mean']}, p95 {t['p95']}, max {t['max']}")
    if report["tokens"]:
        t = report["tokens"]
        n_v = report["num_image_tokens"]
        lines.append(f"  tokens per record ({report['template']} template, N_v={n_v}): "
                     f"mean {t['mean']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; "
                     f"{report['longer_than_max_length']} longer than --model_max_length "
                     f"{report['model_max_length']} (cut, still used unless listed below)")
    lines.append(f"  images decoded: {report['images_decoded']} of {report['with_image']} (--decode "
                 f"{report['decode']}); every image file checked by stat")
    lines += [f"  note: {note}" for note in report["notes"]]
    verdict = "OK" if report["passed"] else "TOO MANY"
    limit = report["max_bad_fraction"]
    lines.append(f"Bad samples: {share(report['bad'])}, limit --max_bad_fraction {limit}: {verdict}")
    lines += describe_bad({"bad_by_kind": report["bad_by_kind"], "first": report["offenders"],
                           "hint": report["hint"]})
    return "\n".join(lines)


def visual_tokens(config, vision_tower: str | None) -> int | None:
    """N_v of the model training would build, from configs only (no weights): training's `--vision_tower` if
    given, else the checkpoint `config`'s own tower; None for a plain LLM without --vision_tower."""
    from llava.model.multimodal_encoder.builder import resolve_vision_config

    tower = vision_tower or getattr(config, "mm_vision_tower", None)
    if not tower:
        return None
    embedded = None if vision_tower else getattr(config, "mm_vision_config", None)
    vision = resolve_vision_config(SimpleNamespace(mm_vision_tower=tower, mm_vision_config=embedded))
    n_v = (vision.image_size // vision.patch_size) ** 2  # SigLIP: no CLS token
    if getattr(config, "mm_vision_select_feature", "patch") == "cls_patch":  # open_clip keeps its prefix
        n_v += getattr(vision, "num_prefix_tokens", 0)
    return n_v


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llava.data.check",
        description="Check a LLaVA conversation data set as training reads it: bad samples (malformed "
                    "records, missing / escaping / unreadable images, visual tokens cut by "
                    "--model_max_length), image share, turns and token lengths. Prints a summary; --json "
                    "writes the full report. Exit code: 0 OK, 1 more bad samples than --max_bad_fraction, 2 could "
                    "not check.",
        epilog="Example (LLaVA-665k for a Qwen2 student with SigLIP): python -m llava.data.check --data_path "
               "playground/data/llava_v1_5_mix665k.json --image_folder playground/data --model-path "
               "Qwen/Qwen2-0.5B --vision_tower google/siglip-so400m-patch14-384 --json report.json")
    p.add_argument("--data_path", "--data-path", required=True, help="LLaVA JSON list or JSON Lines file")
    p.add_argument("--image_folder", "--image-folder", default=None,
                   help="root the records' image paths are relative to (training's --image_folder)")
    p.add_argument("--model-path", "--model_path", "--model_name_or_path", dest="model_path", default=None,
                   help="the checkpoint training starts from (local dir or hub id): its tokenizer gives "
                        "token lengths, its vision tower's config N_v; without it token stats are skipped")
    p.add_argument("--vision_tower", "--vision-tower", default=None,
                   help="training's --vision_tower, for N_v when --model-path is a plain LLM")
    p.add_argument("--version", default=None, choices=("qwen_2", "qwen_3", "plain"),
                   help="conversation template (default: the checkpoint's conv_template, else qwen_2)")
    p.add_argument("--model_max_length", "--model-max-length", type=int, default=2048,
                   help="training's --model_max_length, visual tokens included (default 2048)")
    p.add_argument("--decode", choices=("sample", "all", "none"), default="sample",
                   help="decode a random sample of the images (default), all of them, or none; every image "
                        "file is checked by stat")
    p.add_argument("--decode_samples", "--decode-samples", type=int, default=1000,
                   help="images decoded with --decode sample (default 1000)")
    p.add_argument("--max_bad_fraction", "--max-bad-fraction", type=float, default=0.01,
                   help="exit 1 when more than this fraction of the samples is bad (training's default 0.01)")
    p.add_argument("--json", default=None, help="write the full report (every bad index) to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoded sample")
    args = p.parse_args(argv)
    if not 0 <= args.max_bad_fraction <= 1:
        p.error(f"--max_bad_fraction must lie in [0, 1], got {args.max_bad_fraction}")
    if args.model_max_length < 1 or args.decode_samples < 0:
        p.error("--model_max_length must be >= 1 and --decode_samples >= 0")
    return args


def settings_from(args: argparse.Namespace, records: list) -> DoctorSettings:
    """Template, tokenizer, N_v and the decoded sample from the command line and the checkpoint's configs."""
    s = DoctorSettings(os.path.abspath(args.image_folder) if args.image_folder else None,
                       model_max_length=args.model_max_length, decode_mode=args.decode,
                       model_path=args.model_path)
    template = args.version
    if args.model_path:
        from transformers import AutoConfig, AutoTokenizer

        import llava.model  # noqa: F401  (registers the LLaVA-Qwen configs with AutoConfig)

        config = AutoConfig.from_pretrained(args.model_path)
        template = template or getattr(config, "conv_template", None)
        s.tokenizer = AutoTokenizer.from_pretrained(args.model_path)  # as training's build_tokenizer loads it
        s.num_image_tokens = visual_tokens(config, args.vision_tower)
        if s.num_image_tokens is None:
            s.notes.append(f"{args.model_path} has no vision tower and no --vision_tower was given: N_v "
                           "unknown, images count as 1 token and visual-token truncation is not checked")
    else:
        s.notes.append("no --model-path: token lengths and visual-token truncation not checked")
    s.template = template or "qwen_2"
    if args.decode != "all":
        image_indices = [i for i, r in enumerate(records) if has_image(r)]
        k = 0 if args.decode == "none" else min(args.decode_samples, len(image_indices))
        s.decode = set(random.Random(args.seed).sample(image_indices, k))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit code (0 OK, 1 too many bad samples, 2 could not check)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        records = load_records(args.data_path)
    except (OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if not records:
        sys.stderr.write(f"error: {args.data_path} holds no records\n")
        return 2
    try:
        settings = settings_from(args, records)
    except (OSError, ValueError) as err:
        tower = f" / --vision_tower {args.vision_tower}" if args.vision_tower else ""
        where = f"--model-path {args.model_path}{tower}"
        sys.stderr.write(f"error: {where}: {err}\n")
        return 2
    report = doctor(records, args.data_path, settings, args.max_bad_fraction)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    sys.stdout.write(text_summary(report) + "\n")
    if args.json:
        sys.stdout.write(f"Full report: {args.json}\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
