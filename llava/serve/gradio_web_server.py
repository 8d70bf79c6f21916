"""LLaVA's web demo for LLaVA-Qwen checkpoints, with Align-TI's visual-focus panel.

    python -m llava.serve.gradio_web_server --model-path CKPT [--teacher-path TEACHER] \\
        [--host 127.0.0.1] [--port 7860] [--device cpu] [--iva-layer auto|INT]

Design choices
- Local by default: binds 127.0.0.1, never creates a share link, and gradio's analytics and version check
  are off (GRADIO_ANALYTICS_ENABLED=False is set before gradio is imported). Pass `--host 0.0.0.0` only on
  a trusted network.
- Uploads are capped twice: gradio refuses files over `--max-upload-mb` while uploading, and the handler
  decodes what arrives with PIL (`inference.load_upload`) and shows a clear message for anything else.
- Examples come from the tiny world (`--world-dir`, default playground/tiny/data) when it has been generated.
- The page is `gradio_ui.build_demo`; the checks, prompting and focus maps are `inference` / `focus`.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere

import torch  # noqa: E402

from llava.serve.inference import ChatModel, tiny_world_examples  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="student (or any LLaVA-Qwen) checkpoint folder or hub id")
    parser.add_argument("--model-base", default=None, help="base LLM for projector-only or LoRA checkpoints")
    parser.add_argument(
        "--teacher-path", default=None, help="teacher checkpoint: its focus map is shown beside"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument(
        "--iva-layer", default="auto",
        help="student layer of the focus map: an index, or 'auto' (irs.json beside the checkpoint, else ~3/4 depth)",
    )  # fmt: skip
    parser.add_argument("--teacher-iva-layer", default="auto", help="the same for the teacher")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image file")
    parser.add_argument("--world-dir", default="playground/tiny/data", help="tiny world for the examples")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        from llava.serve.gradio_ui import build_demo  # imports gradio
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise SystemExit("The demo needs gradio: bash scripts/bootstrap.sh dev,demo (or pip install '.[demo]')") from err

    student = ChatModel.load(
        args.model_path, args.model_base, args.device, args.iva_layer, "student", args.conv_mode
    )
    teacher = None
    if args.teacher_path:
        teacher = ChatModel.load(args.teacher_path, None, args.device, args.teacher_iva_layer, "teacher")
    examples = tiny_world_examples(args.world_dir)
    max_bytes = int(args.max_upload_mb * 2**20)
    demo = build_demo(student, teacher, examples, max_bytes)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        max_file_size=max_bytes,
        allowed_paths=[os.path.dirname(path) for path, _ in examples[:1]],
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        show_error=False,
    )


if __name__ == "__main__":
    main()
