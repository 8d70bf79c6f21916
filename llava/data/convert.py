"""Public data sets -> the LLaVA JSON this project trains on (docs/data.md says which set needs which).

    python -m llava.data.convert llava      IN.json  -o OUT.json [--image_folder I] [--map PREFIX=DIR]
    python -m llava.data.convert sharegpt4v IN.json  -o OUT.json  --image_folder I  [--map PREFIX=DIR]
    python -m llava.data.convert vqa        IN       -o OUT.jsonl --image_format "gqa/images/{}.jpg" ...
    python -m llava.data.convert captions   IN       -o OUT.jsonl --image_key url_path --caption_key text ...
    python -m llava.data.convert merge      [NAME=]PATH[:SPEC] ... -o MIX.json --seed 0

Every command reads JSON, JSON Lines (streamed) or CSV/TSV (vqa, captions; streamed), writes `.json` (a list,
one record per line) or `.jsonl` by the output's extension through a temporary file, skips bad records with a
count by kind and the first offenders named by file, record index and line (`--skipped F`: every one, as JSON
lines; `--strict`: stop at the first), and ends with a summary on stderr. Exit code 0; 1 when `--strict` stopped
or no record could be converted; 2 when an input could not be read. Image paths are written relative to
`--image_folder` and checked by stat there (the folder training gets as --image_folder). Afterwards,
`python -m llava.data.check --data_path OUT --image_folder I` reports what training would skip.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence

from llava.data.converters.common import ImagePaths, Item, RecordWriter, Report, Skip, read_items, say
from llava.data.converters.conversations import SHAREGPT4V_FOLDERS, file_stem, normalise_record
from llava.data.converters.mix import build_mix, manifest, manifest_path, parse_source, write_manifest
from llava.data.converters.tables import SHORT_ANSWER, CaptionConverter, VQAConverter, caption_items


class StrictStop(Exception):
    """--strict met a bad record."""


def flag(name: str) -> tuple[str, str]:
    """--image_folder and --image-folder (the project's CLIs take both spellings)."""
    return f"--{name}", f"--{name.replace('_', '-')}"


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="output file: .json (a list) or .jsonl (one record per line)")
    p.add_argument(*flag("dry_run"), action="store_true", help="convert and report, write nothing")
    p.add_argument("--skipped", metavar="FILE", help="write every skipped record (index, line, kind, reason) "
                   "to FILE as JSON lines")
    p.add_argument("--strict", action="store_true", help="stop with an error at the first bad record")
    p.add_argument("--limit", type=int, default=0, help="stop after writing this many records (0: all)")


def add_image_args(p: argparse.ArgumentParser, map_help: str | None = None) -> None:
    p.add_argument(*flag("image_folder"), help="the folder training gets as --image_folder: image paths are "
                   "written relative to it and checked there by stat; without it paths pass unchanged")
    p.add_argument(*flag("input_root"), help="the folder the input's relative image paths start from "
                   "(default: --image_folder)")
    p.add_argument(*flag("keep_missing"), action="store_true",
                   help="keep records whose image file is missing (counted) instead of skipping them")
    p.add_argument(*flag("no_check_images"), action="store_true",
                   help="do not stat the image files (paths are still made relative and checked for escapes)")
    if map_help:
        p.add_argument("--map", action="append", default=[], metavar="PREFIX=DIR", help=map_help)


def add_table_args(p: argparse.ArgumentParser, image_key: str) -> None:
    p.add_argument("--format", choices=("auto", "json", "jsonl", "csv", "tsv"), default="auto",
                   help="input format (default: from the extension)")
    p.add_argument(*flag("records_key"), help="JSON: the top-level key holding the rows (TextVQA: data)")
    p.add_argument(*flag("image_key"), default=image_key, help=f"image column (default {image_key})")
    p.add_argument(*flag("image_format"), default="{}", help="str.format pattern making a path from the image "
                   "column: 'gqa/images/{}.jpg', 'COCO_train2014_{:012d}.jpg' (default: the value as is)")
    p.add_argument(*flag("id_key"), default="id", help="id column (default id; missing: <file stem>-<index>)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava.data.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{llava,sharegpt4v,vqa,captions,merge}")
    maps = ("replace a leading image folder: --map llava/llava_pretrain/images=LLaVA-Pretrain/images (DIR "
            "relative to --input_root, or absolute; it must lie inside --image_folder); repeatable")

    c = sub.add_parser("llava", help="check and normalise LLaVA / ShareGPT-style conversation JSON",
                       description="Check and normalise LLaVA / ShareGPT-style records: roles human/user and "
                       "gpt/assistant, one <image> at the front of the first turn, image paths relative to "
                       "--image_folder, records with missing images or bad structure skipped and counted.")
    c.add_argument("input", help="LLaVA JSON (.json list) or JSON Lines")
    add_output_args(c)
    add_image_args(c, maps)

    c = sub.add_parser("sharegpt4v", help="ShareGPT4V JSON (its folder prefixes mapped to yours)",
                       description="ShareGPT4V's JSON files (sharegpt4v_instruct_gpt4-vision_cap100k.json, "
                       "share-captioner_coco_lcs_sam_1246k_1107.json, sharegpt4v_mix665k_*.json) are LLaVA JSON "
                       "with image paths under the folders of its data page (" + ", ".join(SHAREGPT4V_FOLDERS) +
                       "). Map the ones you keep elsewhere with --map; the summary counts records and missing "
                       "images per folder.")
    c.add_argument("input", help="a ShareGPT4V JSON file")
    add_output_args(c)
    add_image_args(c, maps)

    c = sub.add_parser("vqa", help="question/answer/image rows (JSON, JSON Lines, CSV, TSV) -> conversations",
                       description="Rows with a question, an answer (a string, or a list of annotator answers: "
                       "the most frequent is kept) and an image -> LLaVA records. GQA: --image_key imageId "
                       "--image_format 'gqa/images/{}.jpg'; TextVQA: --records_key data --answer_key answers "
                       "--image_key image_id --image_format 'textvqa/train_images/{}.jpg'.")
    c.add_argument("input")
    add_output_args(c)
    add_image_args(c)
    add_table_args(c, "image")
    c.add_argument(*flag("question_key"), default="question", help="question column (default question)")
    c.add_argument(*flag("answer_key"), default="answer", help="answer column (default answer)")
    c.add_argument("--suffix", default="", help="text appended to every question on a new line")
    c.add_argument(*flag("short_answer"), action="store_true",
                   help=f"--suffix '{SHORT_ANSWER}' (LLaVA-1.5's prompt for short-answer VQA)")
    c.add_argument(*flag("max_turns"), type=int, default=1,
                   help="join up to this many questions on one image into one conversation (default 1)")

    c = sub.add_parser("captions", help="(image, caption) rows or COCO captions -> pretrain-style records",
                       description="(image, caption) rows -> one record per caption: an instruction with "
                       "<image>, the caption as the answer (the shape of LCS-558K). COCO's captions_*.json is "
                       "recognised (--image_format 'coco/train2017/{}').")
    c.add_argument("input")
    add_output_args(c)
    add_image_args(c)
    add_table_args(c, "image")
    c.add_argument(*flag("caption_key"), default="caption", help="caption column (default caption; a list "
                   "gives one record per caption)")
    c.add_argument("--prompt", default=None, help="the instruction of every record (default: "
                   "'Describe the image briefly.')")
    c.add_argument(*flag("prompts_file"), help="instructions, one per line, one drawn per record with --seed")
    c.add_argument("--seed", type=int, default=0, help="seed of the instruction draw (default 0)")

    c = sub.add_parser("merge", help="a mix of LLaVA JSON files with per-source counts/fractions and a seed",
                       description="Build a mix: each SOURCE is [NAME=]PATH[:SPEC] with SPEC 'all' (default), a "
                       "count (13000), a fraction (0.25 or 25%) of the valid records, or a repeat (2x, 1.5, a "
                       "count above the size). Writes the mix and a manifest of counts per source.")
    c.add_argument("sources", nargs="+", metavar="SOURCE", help="[NAME=]PATH[:SPEC]")
    add_output_args(c)
    add_image_args(c)
    c.add_argument("--seed", type=int, default=0, help="sampling and shuffle seed (default 0)")
    c.add_argument(*flag("no_shuffle"), action="store_true", help="keep sources in order, each in file order")
    c.add_argument("--manifest", help="manifest path (default: OUTPUT with .manifest.json)")

    args = p.parse_args(argv)
    if not args.output and not args.dry_run:
        p.error("give -o/--output (or --dry_run)")
    if args.limit < 0 or getattr(args, "max_turns", 1) < 1:
        p.error("--limit must be >= 0 and --max_turns >= 1")
    for m in getattr(args, "map", None) or []:
        if "=" not in m or not m.split("=", 1)[0].strip("/"):
            p.error(f"--map takes PREFIX=DIR, got {m!r}")
    if args.command == "vqa" and args.short_answer:
        args.suffix = SHORT_ANSWER
    return args


def image_paths(args) -> ImagePaths:
    return ImagePaths(image_folder=args.image_folder, input_root=args.input_root,
                      fmt=getattr(args, "image_format", "{}"),
                      maps=[tuple(m.split("=", 1)) for m in getattr(args, "map", None) or []],
                      check=not args.no_check_images, keep_missing=args.keep_missing)


def run(items: Iterable[Item], convert: Callable[[Item], list], report: Report, args,
        flush: Callable[[], list] = list) -> int:
    """Convert every item, write what comes out, count what is skipped; -> exit code."""
    writer = RecordWriter(None if args.dry_run else args.output)
    try:
        for item in items:
            report.read += 1
            try:
                records = convert(item)
            except Skip as err:
                if args.strict:
                    raise StrictStop(f"{item.where(report.path)}: {err} (--strict)") from err
                report.skip(item, err)
                continue
            for record in records:
                writer.write(record)
            if args.limit and writer.count >= args.limit:
                break
        for record in flush():
            if not args.limit or writer.count < args.limit:
                writer.write(record)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    report.written = writer.count
    say(report.summary(None if args.dry_run else args.output))
    if writer.count == 0:
        say(f"error: no record of {report.path} could be converted (see the skip counts above: a wrong "
            "--image_folder / --input_root or column name?)")
        return 1
    return 0


def run_merge(args, argv) -> int:
    sources = [parse_source(s) for s in args.sources]
    mix, reports = build_mix(sources, image_paths(args), args.seed, not args.no_shuffle, args.skipped_log)
    for report in reports:
        say(report.summary(None, kept="valid"))
    if args.strict and any(r.skipped for r in reports):
        raise StrictStop("bad records in the sources (--strict); see the counts above")
    out = None if args.dry_run else args.output
    writer = RecordWriter(out)
    for record in mix:
        if args.limit and writer.count >= args.limit:
            break
        writer.write(record)
    writer.close()
    data = manifest(sources, out, args.seed, not args.no_shuffle, writer.count, list(argv))
    for s in sources:
        if s.valid and s.taken > s.valid:
            say(f"note: {s.name} is repeated: {s.taken} taken from {s.valid} valid records ({s.repeats}x)")
    say("mix: " + ", ".join(f"{s.name} {s.taken} of {s.valid}" for s in sources) + f" -> {writer.count} records")
    if out:
        write_manifest(args.manifest or manifest_path(out), data)
        say(f"manifest: {args.manifest or manifest_path(out)}")
    return 0 if writer.count else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.skipped_log = open(args.skipped, "w", encoding="utf-8") if args.skipped else None
    try:
        if args.command == "merge":
            return run_merge(args, argv)
        paths = image_paths(args)
        report = Report(args.input, skipped_log=args.skipped_log)
        stem = file_stem(args.input)
        if args.command in ("llava", "sharegpt4v"):
            count = args.command == "sharegpt4v"
            return run(read_items(args.input), lambda it: [normalise_record(it, paths, report, stem, count)],
                       report, args)
        if args.command == "vqa":
            conv = VQAConverter(paths, report, stem, args.question_key, args.answer_key, args.image_key,
                                args.id_key, args.suffix, args.max_turns)
            items = read_items(args.input, args.format, args.records_key)
            return run(items, conv.convert, report, args, flush=conv.flush)
        prompts = [args.prompt] if args.prompt else None
        if args.prompts_file:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        conv = CaptionConverter(paths, report, stem, args.image_key, args.caption_key, args.id_key,
                                **({"prompts": prompts} if prompts else {}), seed=args.seed)
        return run(caption_items(args.input, args.format, args.records_key), conv.convert, report, args)
    except StrictStop as err:
        say(f"error: {err}")
        return 1
    except (OSError, ValueError) as err:
        say(f"error: {err}")
        return 2
    finally:
        if args.skipped_log is not None:
            args.skipped_log.close()


if __name__ == "__main__":
    sys.exit(main())
