"""The web demo: upload checks, focus maps and streamed replies (no gradio), then the page in a real browser.

The browser test starts its own server (subprocess, free loopback port, mini checkpoints), drives Debian's
chromium through Playwright (`executable_path`, no browser download) and writes a screenshot to
playground/screenshots/demo.png.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntI_patch.focus import FOCUS, IVAFocus, default_focus_layer, resolve_focus_layer
from llava.constants import IMAGE_TOKEN_INDEX, TokenType
from llava.conversation import get_conv_template, tokenize_conversation
from llava.serve.focus import focus_batch, focus_heatmap, last_question_types, load_focus_reader
from llava.serve.inference import (
    ChatModel,
    ChatState,
    UploadError,
    build_conversation,
    load_upload,
    stream_reply,
    tiny_world_examples,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
MAX_NEW = 12


# ------------------------------------------------------------------------------------------- uploads
def test_load_upload_accepts_images_and_converts_to_rgb(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (5, 3), (1, 2, 3, 4)).save(path)
    image = load_upload(path)
    assert image.mode == "RGB" and image.size == (5, 3)


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        (b"just some text\n", {}, "is not an image file"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, {}, "is not an image file"),  # a truncated PNG
        (None, {"max_bytes": 100}, "images up to"),
        (None, {"max_pixels": 10}, "pixels are accepted"),
    ],
)
def test_load_upload_rejects_with_a_clear_message(tmp_path, content, kwargs, message):
    path = tmp_path / "upload.png"
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    else:
        path.write_bytes(content)
    with pytest.raises(UploadError, match=message):
        load_upload(path, **kwargs)


# --------------------------------------------------------------------------------------- focus maps
def test_focus_heatmap_puts_the_peak_on_its_patch():
    grid, hot = 4, (1, 2)  # (row, col) of the hot patch
    alpha = torch.zeros(grid * grid)
    alpha[hot[0] * grid + hot[1]] = 1.0
    out = focus_heatmap(Image.new("RGB", (32, 32), (255, 255, 255)), alpha, opacity=1.0, cmap="gray")
    assert out.size == (256, 256) and out.mode == "RGB"  # small images are upscaled for display
    pixels = np.asarray(out)[..., 0].astype(float)
    cell = 256 // grid
    row, col = np.unravel_index(pixels.argmax(), pixels.shape)
    assert (row // cell, col // cell) == hot
    assert pixels[int((hot[0] + 0.5) * cell), int((hot[1] + 0.5) * cell)] >= 240  # near cmap(1.0)


def test_focus_heatmap_covers_the_padded_square_and_rejects_bad_grids():
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    alpha = torch.rand(16)
    assert focus_heatmap(wide, alpha, "pad").size == (256, 256)  # drawn on the square the model saw
    assert focus_heatmap(wide, alpha, "square").size == (256, 128)  # stretched back onto the image
    with pytest.raises(ValueError, match="square grid"):
        focus_heatmap(wide, torch.rand(15))
    flat = np.asarray(focus_heatmap(wide, torch.ones(16), opacity=0.0))
    assert (flat[80:176] == 0).all() and (flat[:50] > 100).all()  # opacity 0: the padded image itself


def test_focus_layer_resolution(tmp_path, tokenizer):
    from llava.tiny.fixtures import mini_llava

    model = mini_llava(tokenizer, num_layers=4)
    assert [default_focus_layer(n) for n in (1, 2, 4, 28)] == [0, 1, 3, 21]
    assert resolve_focus_layer("2", model) == resolve_focus_layer(2, model) == 2
    assert resolve_focus_layer("auto", model, tmp_path) == 3  # no irs.json: 3/4 depth
    (tmp_path / "irs.json").write_text(json.dumps({"best_layer": 1}))
    assert resolve_focus_layer("auto", model, tmp_path) == 1
    (tmp_path / "irs.json").write_text(json.dumps({"best_layer": 9}))  # e.g. a deeper teacher's layer
    assert resolve_focus_layer("auto", model, tmp_path) == 3
    (tmp_path / "irs.json").write_text(json.dumps({"best_layer": 1, "layers": list(range(8))}))  # the teacher's
    assert resolve_focus_layer("auto", model, tmp_path) == 3  # beside a 4-layer student: not its layers
    with pytest.raises(ValueError, match="out of range"):
        resolve_focus_layer(4, model)


@pytest.mark.parametrize("has_image", [True, False])
def test_typed_image_placeholder_is_dropped(tokenizer, has_image):
    """A user who types "<image>" gets their question answered, not an image-count error."""
    history = [["What is <image> here?", "a circle"], ["<image>\nAnd now?", None]]
    input_ids, _, _ = tokenize_conversation(build_conversation("qwen_2", history, has_image=has_image), tokenizer)
    assert int((input_ids == IMAGE_TOKEN_INDEX).sum()) == int(has_image)


def test_last_question_types_keep_only_the_last_question(tokenizer):
    history = [["What color is the circle?", "red"], ["How many squares are there?", None]]
    conv = build_conversation("qwen_2", history, has_image=True)
    input_ids, types = last_question_types(conv, tokenizer)
    full_ids, _, full_types = tokenize_conversation(conv, tokenizer)
    assert torch.equal(input_ids, full_ids)
    assert (full_types == TokenType.INSTRUCTION).sum() > (types == TokenType.INSTRUCTION).sum() > 0
    last = tokenizer.decode(input_ids[types == TokenType.INSTRUCTION])
    assert last.replace(" ", "") == "Howmanysquaresarethere?"
    assert (types == TokenType.VISUAL).sum() == 1  # the image stays in the first turn


@pytest.fixture(scope="module")
def chat(mini_checkpoint):
    return ChatModel.load(str(mini_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def world_image(mini_world):
    return load_upload(sorted((Path(mini_world) / "images").glob("test_*.png"))[0])


def test_focus_alpha_is_eq3_alpha_of_the_question(chat, world_image):
    from aligntI_patch.iva import instruction_vision_importance

    assert isinstance(chat.focus, IVAFocus) and load_focus_reader() is FOCUS  # found through the entry point
    conv = build_conversation(chat.conv_mode, [["Is there a red circle?", None]], has_image=True)
    batch = focus_batch(chat.model, chat.tokenizer, conv, chat.pixels(world_image))
    alpha = chat.focus.alpha(chat.model, batch, chat.focus_layer)[0]
    assert alpha.shape == (chat.model.num_image_tokens,)
    assert (alpha >= 0).all() and 0 < alpha.sum() <= 1 + 1e-5
    input_ids, _, types = tokenize_conversation(conv, chat.tokenizer)  # single turn: no re-typing needed
    batch = {"input_ids": input_ids[None], "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
             "token_types": types[None], "images": chat.pixels(world_image)[None]}  # fmt: skip
    torch.testing.assert_close(alpha, instruction_vision_importance(chat.model, batch, chat.focus_layer)[0])
    state = ChatState(world_image, [["Is there a red circle?", "yes"]])
    assert chat.focus_map(state).size == (256, 256)


# ----------------------------------------------------------------------------------------- streaming
def test_streamed_greedy_reply_equals_batched_generation(chat, world_image):
    from llava.generation import generate_answers

    question = "What color is the circle?"
    state = ChatState(world_image, [[question, None]])
    pieces = list(stream_reply(chat, state, temperature=0.0, max_new_tokens=MAX_NEW))
    assert pieces and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))  # a growing text
    (expected,) = generate_answers(
        chat.model, chat.tokenizer, chat.image_processor, [{"text": question, "image": world_image}],
        max_new_tokens=MAX_NEW, progress=False,
    )  # fmt: skip
    assert pieces[-1].strip() == expected
    state.history[-1][1] = pieces[-1]
    state.history.append(["And the square?", None])  # a second turn sees the first
    assert list(stream_reply(chat, state, temperature=0.7, top_p=0.9, max_new_tokens=4))


def test_stream_reply_raises_the_model_error(chat, world_image, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(chat.model, "generate", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(stream_reply(chat, ChatState(world_image, [["Hi?", None]]), max_new_tokens=4))


def test_closing_the_stream_stops_the_generation_thread(chat, world_image, monkeypatch):
    """A reader that stops early (cancelled, disconnected, cleared) leaves no thread generating."""
    real_generate, lengths = chat.model.generate, []

    def endless(*args, **kwargs):  # no EOS before max_new_tokens: only the stop can end it early
        out = real_generate(*args, **{**kwargs, "min_new_tokens": kwargs["max_new_tokens"]})
        lengths.append(out.shape[-1])
        return out

    monkeypatch.setattr(chat.model, "generate", endless)
    stream = stream_reply(chat, ChatState(world_image, [["Hi?", None]]), temperature=0.0, max_new_tokens=2000)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 30
    while any(t.name == "demo-generate" and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the generation thread still runs after the stream was closed"
        time.sleep(0.05)
    assert lengths and lengths[0] < 2000


def test_conversation_and_examples(mini_world, tmp_path):
    conv = build_conversation("qwen_2", [["q1", "a1"], ["q2", None]], has_image=True)
    assert conv.messages == [
        ["user", "<image>\nq1"],
        ["assistant", "a1"],
        ["user", "q2"],
        ["assistant", None],
    ]
    assert get_conv_template("qwen_2").roles == conv.roles
    examples = tiny_world_examples(mini_world)
    assert 1 <= len(examples) <= 4 and all(Path(p).is_file() and q for p, q in examples)
    assert tiny_world_examples(tmp_path / "nowhere") == []


# ----------------------------------------------------------------------------- the page's handlers
class FakeStream:
    """Stands in for `stream_reply` in the page: `max_new_tokens` pieces, one per 20 ms (or one failure),
    recording each call's (question, image) and which streams were closed before their end."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Image.Image | None]] = []
        self.closed_early: list[int] = []
        self.fail_next = False

    def __call__(self, chat, state, temperature, top_p, max_new_tokens):
        self.calls.append((state.history[-1][0], state.image))
        fail, self.fail_next = self.fail_next, False
        return self._pieces(len(self.calls), max_new_tokens, fail)

    def _pieces(self, call: int, n: int, fail: bool):
        if fail:
            raise RuntimeError("simulated failure")
        done = False
        try:
            for i in range(n):
                time.sleep(0.02)
                yield " ".join(["word"] * (i + 1))
            done = True
        finally:
            if not done:
                self.closed_early.append(call)


def _texts(messages: list[dict]) -> list[str]:
    """The chatbot's messages as plain text (gradio's client gives content as a list of parts)."""
    out = []
    for message in messages:
        content = message["content"]
        out.append(content if isinstance(content, str) else " ".join(part["text"] for part in content))
    return out


@pytest.fixture(scope="module")
def live_page(chat):
    """The page served in this process (loopback, free port) with `FakeStream` answering; a client factory."""
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client

    import llava.serve.gradio_ui as ui

    fake, real = FakeStream(), ui.stream_reply
    ui.stream_reply = fake  # looked up by `respond` at call time
    demo = ui.build_demo(chat)
    port = _free_port()
    demo.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
        mcp_server=False, enable_monitoring=False, quiet=True,
    )  # fmt: skip
    try:
        yield lambda: Client(f"http://127.0.0.1:{port}/", verbose=False), fake
    finally:
        demo.close()
        ui.stream_reply = real


def _streaming(client, max_new_tokens: int = 1000):
    """Submit `respond` and return the job once its reply is streaming."""
    job = client.submit(0.0, 0.7, max_new_tokens, api_name="/respond")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 2:
        assert time.monotonic() < deadline and not job.done(), "the reply never started streaming"
        time.sleep(0.05)
    return job


@pytest.mark.parametrize("interrupt", ["clear", "new image"])
def test_clear_or_new_image_while_streaming_starts_afresh(live_page, mini_world, interrupt):
    from gradio_client import handle_file

    connect, fake = live_page
    client = connect()
    first, second = sorted((Path(mini_world) / "images").glob("test_*.png"))[:2]
    client.predict(handle_file(str(first)), api_name="/on_image")
    client.predict("What color is the circle?", api_name="/on_question")
    job = _streaming(client)
    if interrupt == "clear":
        assert client.predict(api_name="/on_clear")[2] == []  # (upload, preview, chat, ...)
    else:
        assert "Image loaded" in client.predict(handle_file(str(second)), api_name="/on_image")[2]
    start = time.monotonic()
    job.result(timeout=60)
    assert time.monotonic() - start < 10  # the old reply stopped, it did not run its 1000 pieces
    assert len(fake.calls) in fake.closed_early
    chat_after = client.predict("And now?", api_name="/on_question")[1]
    assert _texts(chat_after) == ["And now?"]  # a fresh conversation, not the old one back
    client.predict(0.0, 0.7, 8, api_name="/respond")  # the slider's minimum
    question, image = fake.calls[-1]
    assert question == "And now?"
    if interrupt == "clear":
        assert image is None
    else:
        assert np.array_equal(np.asarray(image), np.asarray(load_upload(second)))


def test_regenerate_after_a_model_error_retries_the_failed_question(live_page, mini_world):
    from gradio_client import handle_file

    connect, fake = live_page
    client = connect()
    image = sorted((Path(mini_world) / "images").glob("test_*.png"))[0]
    client.predict(handle_file(str(image)), api_name="/on_image")
    client.predict("First?", api_name="/on_question")
    client.predict(0.0, 0.7, 8, api_name="/respond")
    fake.fail_next = True
    client.predict("Second?", api_name="/on_question")
    chat_now, status = client.predict(0.0, 0.7, 8, api_name="/respond")[:2]
    reply = " ".join(["word"] * 8)
    assert "simulated failure" in status and _texts(chat_now) == ["First?", reply]
    assert "Retrying" in client.predict(api_name="/on_regenerate")[1]
    chat_now, status = client.predict(0.0, 0.7, 8, api_name="/respond")[:2]
    assert fake.calls[-1][0] == "Second?"  # the failed question, not the answered one again
    assert _texts(chat_now) == ["First?", reply, "Second?", reply] and "Answered" in status


# ------------------------------------------------------------------------------------------- browser
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _need(ok: bool, reason: str) -> None:
    """Skip outside CI when something the browser test needs is missing; in CI, fail."""
    if not ok:
        if _in_ci():
            pytest.fail(f"{reason} (required in CI: see .ci/run)")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"demo server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"demo server not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def demo_server(mini_checkpoint, mini_world, tokenizer, tmp_path_factory):
    """A live demo on a free loopback port: the mini student, and a 3-layer Qwen3 teacher beside it."""
    from llava.tiny.fixtures import mini_llava, save_mini_checkpoint

    _need(os.path.isfile(CHROMIUM), f"{CHROMIUM} is not installed (apt-get install chromium)")
    for package in ("gradio", "playwright"):
        found = importlib.util.find_spec(package) is not None
        _need(found, f"the {package} package is not installed (bash scripts/bootstrap.sh dev,demo,eval)")
    root = tmp_path_factory.mktemp("demo")
    teacher = save_mini_checkpoint(
        mini_llava(tokenizer, backbone="qwen3", role="teacher", seed=1, num_layers=3),
        tokenizer,
        root / "teacher",
    )
    port = _free_port()
    log = root / "server.log"
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(root),
    }
    cmd = [
        sys.executable, "-m", "llava.serve.gradio_web_server", "--model-path", str(mini_checkpoint),
        "--teacher-path", str(teacher), "--port", str(port), "--device", "cpu", "--world-dir", str(mini_world),
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/", proc, log)
        yield f"http://127.0.0.1:{port}/", proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


STATUS_LOG_JS = """() => {
  window.__status = [];
  new MutationObserver(() => window.__status.push(document.querySelector('#status').innerText))
    .observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_in_a_real_browser(demo_server, mini_world, tmp_path, capsys):
    from playwright.sync_api import expect, sync_playwright

    url, proc, log = demo_server
    image = sorted((Path(mini_world) / "images").glob("test_*.png"))[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("a text file renamed .png\n")
    too_big = tmp_path / "huge.png"
    too_big.write_bytes(b"\0" * (10 * 2**20 + 1))
    shot = ROOT / "playground" / "screenshots" / "demo.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    outside = []
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 1000},
            )  # fmt: skip
            page = browser.new_page()
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url[:-1]) else None)
            page.set_default_timeout(60_000)
            page.goto(url, wait_until="load")
            status, file_input = page.locator("#status"), page.locator("#upload input[type=file]")
            expect(page.get_by_text("Tiny-world examples")).to_be_visible()
            page.evaluate(STATUS_LOG_JS)

            # Upload, ask, watch the answer stream in and both focus maps appear.
            file_input.set_input_files(str(image))
            expect(status).to_contain_text("Image loaded")
            page.fill("#question textarea", "What color is the circle?")
            page.click("#send")
            expect(status).to_contain_text("Answered", timeout=120_000)
            expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(1)
            assert page.locator('#chatbot [data-testid="bot"]').inner_text().strip()
            for who in ("student", "teacher"):
                expect(page.locator(f"#focus-{who} img")).to_have_attribute("src", re.compile("file="))

            # A second turn, then regenerate it: still two turns, answered again.
            page.fill("#question textarea", "And how many squares are there?")
            page.press("#question textarea", "Enter")
            expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(2, timeout=120_000)
            expect(status).to_contain_text("Answered", timeout=120_000)
            page.click("#regenerate")
            page.wait_for_function("() => window.__status.some(s => s.includes('Regenerating'))")
            expect(status).to_contain_text("Answered", timeout=120_000)
            expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(2)
            page.screenshot(path=str(shot), full_page=True)

            # Bad uploads: a text file named .png, then a file over the size limit.
            page.click("#clear")
            expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(0)
            file_input.set_input_files(str(not_image))
            expect(status).to_contain_text("is not an image file")
            page.click("#clear")
            file_input.set_input_files(str(too_big))
            expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible()

            # The server keeps serving: a tiny-world example (image and question), answered.
            page.click("#clear")
            page.get_by_test_id("dataset-cell-0-1").click()
            expect(status).to_contain_text("Image loaded")
            assert page.locator("#question textarea").input_value().strip()
            page.click("#send")
            expect(status).to_contain_text("Answered", timeout=120_000)
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.poll() is None, log.read_text()[-3000:]
    assert not outside, f"the page reached outside the server: {outside[:5]}"
    with capsys.disabled():  # shown in the normal pytest output too
        print(f"\nscreenshot: {shot}")  # noqa: T201
