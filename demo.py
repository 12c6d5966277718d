"""A local web page to talk with an fVLM checkpoint about a video and watch where its queries look.

    python demo.py --checkpoint checkpoints/quickstart/stage2 [--host 127.0.0.1] [--port 7860] \\
        [--samples data/synthetic/mvbench] [--max-upload-mb 200] [--max-new-tokens 64]

Then open http://127.0.0.1:7860. Upload a video or an image (or pick a sample of an MVBench-layout folder:
the quickstart's synthetic set by default), ask a question and read the answer as it is written; follow-up
questions about the same video continue the conversation. The page plays the video with the attention of the
queries of the mode that answered overlaid on each frame, beside the static query's, above both queries'
attention entropy per frame (attention_viz.animation_frames; `attention_viz.py --animate` writes the same
file). A video is read once: its frames, their DINOv2 encoding and, per mode, its visual tokens and
animation are kept for the next question until another video (or frame rate or cap) is asked about.

Built on Gradio Blocks (https://www.gradio.app/docs/gradio/blocks). It listens on 127.0.0.1 unless --host says
otherwise and is never shared publicly; neither the page nor the server makes a request to another host (no
analytics, no version check, system fonts only); uploads and the animations go to a temporary folder,
removed when the server stops.
"""

import cli


def arguments(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training save_dir (its newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--samples", default="data/synthetic/mvbench", help="MVBench-layout folder whose videos the "
                   "page offers (json/<task>.json + video/...); none when it does not exist")
    p.add_argument("--max-upload-mb", type=float, default=200, help="largest upload accepted, in MiB")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    cli.add_device(p)
    cli.add_threads(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no telemetry

import distributed  # noqa: E402  (before torch: it sets OpenMP's wait policy, which torch reads once)
import gradio as gr  # noqa: E402
import torch  # noqa: E402

import attention_viz  # noqa: E402
from config import MODES, FrameConfig, InputSettings  # noqa: E402
from distributed import autocast  # noqa: E402
from encoder import PatchKV  # noqa: E402
from eval_readers import read_mvbench  # noqa: E402
from frames import IMAGE_FIELDS, SkipSample, probe, sampled, stream_clip  # noqa: E402
from model import load_checkpoint  # noqa: E402
from tokenization import prompt_ids  # noqa: E402

ENCODE_CHUNK = 8  # frames encoded at a time: the progress bar moves, and DINO's activations stay small
BUSY = "Still answering the previous question: ask again when its answer is complete."


def conversation(history):
    """[(question, answer), ...] -> chat messages [{role, content}, ...], user and assistant in turn."""
    return [{"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))]


class DemoError(ValueError):
    """Something the user can fix (no video chosen, an empty question, too many frames): shown in the page."""


def read_frames(path, fps, cap, inputs, report=lambda done, total: None):
    """The frames of a video or an image file as the model was trained to see them (`inputs`: its
    config.InputSettings) -> [T, 3, H, W]: a video at `fps` up to `cap` frames, an image replicated. A video is
    decoded ENCODE_CHUNK frames at a time (frames.stream_clip), calling report(done, T) after each chunk."""
    cfg = FrameConfig(frame_size=inputs.frame_size, max_frames=cap, sample_fps=fps,
                      replicate_image_frames=inputs.replicate_image_frames)
    total, chunks = sampled(probe(path), path, cfg), []
    for chunk in stream_clip(path, cfg, ENCODE_CHUNK):
        chunks.append(chunk)
        report(min(sum(c.shape[0] for c in chunks), total), total)
    return torch.cat(chunks)


@dataclass
class Video:
    """What the demo keeps of the video it last read: frames [T, 3, H, W], the model's `encode` output, and per
    mode its visual tokens, attention maps and animation file."""

    key: tuple  # (path, fps, cap): another of these reads the video again
    frames: torch.Tensor
    encoded: tuple = None  # set by Session.encode, once the question is known to fit
    visual: dict = field(default_factory=dict)
    maps: dict = None  # {kind: [L, T, heads, 1+P]}
    entropy: dict = None  # {kind: [L, T]}
    animations: dict = field(default_factory=dict)


def encode_in_chunks(model, frames, report):
    """model.encode of one clip [T, 3, H, W], ENCODE_CHUNK frames at a time, calling report(done, T) after each
    chunk -> (PatchKV of the encoded frames, frame_idx [T], counts [1]), as model.encode returns them."""
    T = frames.shape[0]
    parts, idx, offset = [], [], 0
    for start in range(0, T, ENCODE_CHUNK):
        kv, frame_idx, _ = model.encode(frames[None, start:start + ENCODE_CHUNK])
        parts.append(kv)
        idx.append(frame_idx + offset)
        offset += len(kv)
        report(min(start + ENCODE_CHUNK, T), T)
    cat = lambda tensors: torch.cat(list(tensors))
    features = None if parts[0].features is None else cat(p.features for p in parts)
    kv = PatchKV([cat(k) for k in zip(*(p.keys for p in parts))], [cat(v) for v in zip(*(p.values for p in parts))],
                 features)
    return kv, torch.cat(idx), torch.tensor([T], device=frames.device)


class Session:
    """The model, its tokenizer, and the video it last read; one question at a time (`busy`)."""

    def __init__(self, model, tokenizer, workdir, max_new_tokens=64):
        self.model, self.tokenizer = model, tokenizer
        self.inputs = model.inputs or InputSettings()  # frame size, image frames, system prompt: as trained
        self.device = next(model.parameters()).device
        self.workdir, self.max_new_tokens = workdir, max_new_tokens
        self.context = model.llm.config.max_position_embeddings
        self.busy = threading.Lock()
        self.video = None

    def read(self, path, fps, cap, progress):
        """The Video of `path` read at `fps` frames a second up to `cap` frames (kept from the last question
        when they are the same), not yet encoded; progress(fraction, desc) is told what is being read."""
        key = (path, float(fps), int(cap))
        if self.video is not None and self.video.key == key:
            return self.video
        self.forget()
        name = os.path.basename(path)
        progress(None, f"decoding {name}")
        report = lambda done, T: progress(done / T, f"decoding frame {done} of {T} of {name}")
        try:
            frames = read_frames(path, fps, int(cap), self.inputs, report).to(self.device)
        except SkipSample as e:
            raise DemoError(f"Cannot read {name}: {e}. Upload a video (mp4, webm, mkv, avi, mov) or an image "
                            f"({', '.join(IMAGE_FIELDS)}).") from None
        self.video = Video(key, frames)
        return self.video

    def encode(self, video, progress):
        """Run DINOv2 on the video's frames, once; progress(fraction, desc) after every ENCODE_CHUNK frames."""
        if video.encoded is None:
            report = lambda done, T: progress(done / T, f"encoding frame {done} of {T} with DINOv2")
            with autocast(self.device):
                video.encoded = encode_in_chunks(self.model, video.frames, report)

    def forget(self):
        """Drop the last video and delete its animations."""
        if self.video is not None:
            for path in self.video.animations.values():
                os.remove(path)
        self.video = None

    def prompt(self, history, question, frames):
        """Token ids of the conversation so far and `question`; too long for the LLM's context is a DemoError."""
        ids = prompt_ids(self.tokenizer, conversation(history + [(question, None)])[:-1],
                         self.inputs.system_prompt)
        need = frames + len(ids) + self.max_new_tokens
        if need > self.context:
            raise DemoError(f"Too long for the model: {frames} frames, {len(ids)} tokens of conversation and up "
                            f"to {self.max_new_tokens} of answer make {need} positions, and the LLM reads "
                            f"{self.context}. Lower the frame rate or the frame cap, or pick the video again to "
                            "start a new conversation.")
        return torch.tensor([ids], device=self.device)

    def answer(self, video, ids, mode, progress):
        """The answer to the prompt `ids` about `video` in `mode`, growing: yields the text so far."""
        if mode not in video.visual:
            progress(None, f"the {mode} visual tokens")
            with autocast(self.device):
                video.visual[mode] = self.model.visual_tokens(*video.encoded, mode)[0]
        with autocast(self.device):
            for new in self.model.generate_stream(None, ids, max_new_tokens=self.max_new_tokens, mode=mode,
                                                  eos_token_id=self.tokenizer.eos_token_id,
                                                  encoded=video.encoded, visual=video.visual[mode]):
                yield self.tokenizer.decode(new[0], skip_special_tokens=True).strip()

    def animation(self, video, mode):
        """The mp4 of `mode`'s attention over `video` (attention_viz.animation_frames), written once."""
        if video.maps is None:
            with autocast(self.device):
                maps = self.model.attention_maps(video.frames[None], encoded=video.encoded)
            video.maps = {kind: m[:, 0].float().cpu() for kind, m in maps.items()}
            video.entropy = attention_viz.attention_entropy(video.maps)
        if mode not in video.animations:
            frames = attention_viz.animation_frames(video.frames, video.maps, video.entropy, mode,
                                                    self.model.encoder.patch_size)
            path = tempfile.NamedTemporaryFile(dir=self.workdir, prefix=f"{mode}-", suffix=".mp4", delete=False).name
            video.animations[mode] = attention_viz.write_animation(frames, path)
        return video.animations[mode]


# ---------------------------------------------------------------- the page
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
INTRO = ("## fVLM: ask about a video, and see where the model looks\n"
         "One token a frame: each frame is read by a query, and in the **autoregressive** mode the LLM's state "
         "after frame t chooses the query of frame t+1. Choose a video or an image, then ask.")
LEGEND = ("The frame; the attention over its patches of the queries of the mode that answered (bright: where "
          "it looks); the static query's. Below, the entropy of each query's attention per frame: low is a "
          "focused glance, the dashed line attention spread evenly.")


def respond(session, question, history, source, mode, fps, cap, progress):
    """The Ask handler: yields (conversation, history, animation, status, question box) as the answer grows."""
    question = (question or "").strip()
    if not session.busy.acquire(blocking=False):
        yield gr.skip(), gr.skip(), gr.skip(), BUSY, gr.skip()
        return
    try:
        if source is None:
            raise DemoError("Choose a video or an image first: upload one, or pick a sample.")
        if not question:
            raise DemoError("Type a question first.")
        start = time.perf_counter()
        video = session.read(source, fps, cap, progress)
        ids = session.prompt(history, question, video.frames.shape[0])  # fits the context, or a DemoError
        session.encode(video, progress)
        text = ""
        for text in session.answer(video, ids, mode, progress):
            yield conversation(history + [(question, text)]), gr.skip(), gr.skip(), "Answering...", ""
        history = history + [(question, text)]
        animation = session.animation(video, mode)
        status = (f"Answered in {time.perf_counter() - start:.1f} s from {video.frames.shape[0]} frames "
                  f"({mode}). Ask a follow-up, or choose another video.")
        yield conversation(history), history, animation, status, ""
    except DemoError as e:
        yield gr.skip(), gr.skip(), gr.skip(), f"**{e}**", gr.skip()
    finally:
        session.busy.release()


def choose(path, question=None):
    """A new video or image: a new conversation about it (read at its first question)."""
    status = "Choose a video or an image, then ask." if path is None else \
        f"**{os.path.basename(path)}**: ask a question (the video is read at the first one)."
    return path, [], [], None, status, gr.skip() if question is None else question


def build(session, samples=()):
    """The page, wired to `session`; `samples` (eval_readers MCQs) fill the sample picker."""
    with gr.Blocks(title="fVLM: where the model looks", analytics_enabled=False) as page:
        source, history = gr.State(None), gr.State([])
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                upload = gr.File(label="Video or image", file_types=["video", "image"], height=90, elem_id="upload")
                sample = gr.Dropdown([(f"{q.qid}: {q.prompt.splitlines()[0]}", i) for i, q in enumerate(samples)],
                                     value=None, label="... or a sample", visible=bool(samples), elem_id="sample")
                chat = gr.Chatbot(label="Conversation", height=270, feedback_options=None, render_markdown=False,
                                  buttons=["copy"], elem_id="chat")  # the model's words as written
                with gr.Row():
                    question = gr.Textbox(show_label=False, placeholder="Ask about the video",
                                          max_lines=6, scale=5, elem_id="question")
                    ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                status = gr.Markdown("Choose a video or an image, then ask.", elem_id="status")
            with gr.Column(scale=3):
                overlay = gr.Video(label="Where the queries look", show_label=False, interactive=False, autoplay=True,
                                   loop=True, height=390, buttons=["download"], elem_id="overlay")
                gr.Markdown(LEGEND)
                mode = gr.Radio(list(MODES), value="autoregressive", label="Mode", elem_id="mode")
                with gr.Row():
                    fps = gr.Slider(0.25, 8, value=1.0, step=0.25, label="Frames read per second", elem_id="fps")
                    cap = gr.Slider(1, 256, value=64, step=1, label="Frame cap (then uniform)", elem_id="cap")
        reset = [source, history, chat, overlay, status, question]
        upload.upload(lambda path: choose(path) + (None,), upload, reset + [sample])
        upload.clear(lambda: choose(None), None, reset)
        sample.input(lambda i: choose(samples[i].media.path, samples[i].prompt) + (None,), sample, reset + [upload])

        def answer(question, history, source, mode, fps, cap, progress=gr.Progress()):
            yield from respond(session, question, history, source, mode, fps, cap, progress)

        for event in (ask.click, question.submit):
            event(answer, [question, history, source, mode, fps, cap], [chat, history, overlay, status, question],
                  concurrency_limit=None)  # a second question while one runs is answered "busy", not queued
    return page


def launch(page, workdir, host="127.0.0.1", port=None, max_upload_mb=200, block=True):
    """Serve `page` on host:port (None: the first free port from 7860); returns gradio's (app, local url, None)."""
    return page.launch(server_name=host, server_port=port, share=False, max_file_size=int(max_upload_mb * 2**20),
                       allowed_paths=[workdir], show_error=True, footer_links=[], ssr_mode=False, pwa=False,
                       mcp_server=False, enable_monitoring=False, theme=THEME, prevent_thread_lock=not block)


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    samples = read_mvbench(args.samples) if os.path.isdir(os.path.join(args.samples, "json")) else []
    model, tokenizer, _ = load_checkpoint(args.checkpoint, distributed.pick_device(args.device))
    workdir = tempfile.mkdtemp(prefix="fvlm-demo-")
    os.environ["GRADIO_TEMP_DIR"] = workdir  # uploads and gradio's cache: read when the page is built
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` closes the server as Ctrl-C does
    try:
        session = Session(model.eval(), tokenizer, workdir, args.max_new_tokens)
        launch(build(session, samples), workdir, args.host, args.port, args.max_upload_mb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main, args=ARGS)
