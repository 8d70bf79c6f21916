"""The demo page (gradio Blocks): image upload, streamed multi-turn chat, and the visual-focus panel.

Only the wiring lives here; the checks, prompting, generation and focus maps are `llava.serve.inference`
and `llava.serve.focus`. Every handler catches its own errors and shows them in the status line
(elem_id "status"), so a bad upload or a failing model never takes the server down. All model calls share
one concurrency group of size 1: generation and the attention hook never run on a model at the same time.

Clear and a new image reset the session's `ChatState` in place (`ChatState.reset`), and cancel a reply that
is still streaming. `respond` checks the state's conversation count before every write, so a reply of an
older conversation (one the cancel did not reach: an API client, or a yield already on its way) stops
and closes its stream, which stops the generation thread, instead of writing into the new conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import closing

import gradio as gr

from llava.serve.focus import display_size
from llava.serve.inference import (
    MAX_UPLOAD_BYTES,
    ChatModel,
    ChatState,
    UploadError,
    load_upload,
    stream_reply,
)

logger = logging.getLogger(__name__)

MODEL_GROUP = "model"  # concurrency id shared by every event that runs a model
INTRO = (
    "## Align-TI demo\n"
    "Upload an image, ask about it, and see where the last question looks: the instruction-to-vision "
    "attention (Eq. 3's alpha) at the IVA layer, drawn over the image."
)


def _error(text: str) -> str:
    return f"**Error:** {text}"


def build_demo(
    student: ChatModel,
    teacher: ChatModel | None = None,
    examples: Sequence[tuple[str, str]] = (),
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> gr.Blocks:
    """The Blocks app for `student` (and `teacher`'s focus map beside the student's when given)."""
    focus_models = [student] + ([teacher] if teacher is not None else [])

    def on_image(path: str | None, state: ChatState):
        """A new image (or none) starts a new conversation."""
        state.reset()
        if path is None:
            return state, None, [], "", *[None] * len(focus_models)
        try:
            state.image = load_upload(path, max_upload_bytes)
        except UploadError as err:
            return state, None, [], _error(str(err)), *[None] * len(focus_models)
        except Exception as err:  # an unexpected failure still gets a message, and the server goes on
            logger.exception("reading the upload failed")
            message = _error(f"could not read the upload ({type(err).__name__})")
            return state, None, [], message, *[None] * len(focus_models)
        status = f"Image loaded ({state.image.width} x {state.image.height}). Ask a question about it."
        preview = state.image.resize(display_size(state.image.size))  # tiny-world images are 32-64 px
        return state, preview, [], status, *[None] * len(focus_models)

    def on_question(question: str, state: ChatState):
        question = (question or "").strip()
        if not question:
            return "", state, state.messages(), "Type a question first."
        if state.history and state.history[-1][1] is None:  # one turn at a time
            return question, state, state.messages(), "Wait for the answer to the last question."
        state.retry = None  # a new question replaces a failed one
        state.history.append([question, None])
        return "", state, state.messages(), "Generating..."

    def respond(state: ChatState, temperature: float, top_p: float, max_new_tokens: int) -> Iterator[tuple]:
        """Stream the answer to the pending question, then draw the focus maps."""
        no_focus = [gr.skip()] * len(focus_models)
        if not state.history or state.history[-1][1] is not None:
            yield state, state.messages(), gr.skip(), *no_focus
            return
        conversation = state.conversation

        def superseded() -> tuple:
            """Clear or a new image came: show the current chat (over a stale update) and write nothing else."""
            return gr.skip(), state.messages(), gr.skip(), *no_focus

        question, text = state.history[-1][0], ""
        try:
            with closing(stream_reply(student, state, temperature, top_p, int(max_new_tokens))) as stream:
                for text in stream:
                    if state.conversation != conversation:  # Clear or a new image: closing stops generate
                        yield superseded()
                        return
                    yield (
                        state,
                        [*state.messages(), {"role": "assistant", "content": text}],
                        gr.skip(),
                        *no_focus,
                    )
        except Exception as err:  # shown in the page; the server keeps serving
            logger.exception("generation failed")
            if state.conversation != conversation:
                return
            state.retry = state.history.pop()[0]  # not answered: Regenerate asks it again
            yield (
                state,
                state.messages(),
                _error(f"the model failed to answer ({type(err).__name__}: {err}); Regenerate tries again"),
                *no_focus,
            )
            return
        if state.conversation != conversation:
            yield superseded()
            return
        state.history[-1][1] = text
        if state.image is None:
            yield (
                state,
                state.messages(),
                "Answered (no image, so no visual focus).",
                *[None] * len(focus_models),
            )
            return
        maps, notes = [], []
        for chat in focus_models:
            try:
                maps.append(chat.focus_map(state))
            except Exception as err:
                logger.exception("focus map of the %s failed", chat.name)
                maps.append(None)
                notes.append(f"{chat.name} focus failed ({type(err).__name__}: {err})")
        if state.conversation != conversation:  # cleared while the maps were drawn
            yield superseded()
            return
        status = f"Answered. Visual focus of “{question[:60]}”." if not notes else _error("; ".join(notes))
        yield state, state.messages(), status, *maps

    def on_regenerate(state: ChatState):
        if state.retry is not None:  # the last question failed: ask it again
            state.history.append([state.retry, None])
            state.retry = None
            return state, state.messages(), "Retrying..."
        if not state.history:
            return state, [], "Nothing to regenerate yet."
        state.history[-1][1] = None
        return state, state.messages(), "Regenerating..."

    def on_clear(state: ChatState):
        state.reset()
        return state, None, None, [], "", "", *[None] * len(focus_models)

    with gr.Blocks(title="Align-TI demo", analytics_enabled=False) as demo:
        state = gr.State(ChatState())
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(
                    label=f"Image (PNG, JPEG, WebP...; at most {max_upload_bytes / 2**20:.0f} MB)",
                    file_types=["image"], type="filepath", elem_id="upload",
                )  # fmt: skip
                preview = gr.Image(
                    label="Image", interactive=False, type="pil", elem_id="preview", height=260
                )
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top p")
                    max_new_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max new tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label=f"Chat ({student.name})", elem_id="chatbot", height=360)
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    question = gr.Textbox(
                        label="Question", show_label=False, placeholder="Ask about the image and press Enter", scale=4,
                        elem_id="question",
                    )  # fmt: skip
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
        gr.Markdown("### Visual focus of the last question")
        with gr.Row():
            focus_images = [
                gr.Image(
                    label=f"{chat.name.capitalize()} (layer {chat.focus_layer})" if chat.focus else
                          f"{chat.name.capitalize()} (no visual-focus plugin installed)",
                    interactive=False,
                    type="pil",
                    elem_id=f"focus-{chat.name}",
                    height=300,
                )  # fmt: skip
                for chat in focus_models
            ]
        if examples:
            gr.Examples(
                examples=[list(e) for e in examples], inputs=[upload, question], label="Tiny-world examples"
            )

        params = [state, temperature, top_p, max_new_tokens]
        answer_outputs = [state, chatbot, status, *focus_images]
        answers = []  # the streaming events, cancelled by Clear and by a new image
        for trigger in (question.submit, send.click):
            asked = trigger(on_question, [question, state], [question, state, chatbot, status], queue=False)
            answers.append(asked.then(respond, params, answer_outputs, concurrency_id=MODEL_GROUP))
        redo = regenerate.click(on_regenerate, [state], [state, chatbot, status], queue=False)
        answers.append(redo.then(respond, params, answer_outputs, concurrency_id=MODEL_GROUP))
        upload.change(
            on_image, [upload, state], [state, preview, chatbot, status, *focus_images], cancels=answers
        )
        clear.click(
            on_clear,
            [state],
            [state, upload, preview, chatbot, question, status, *focus_images],
            queue=False,
            cancels=answers,
        )
    return demo
