"""The demo page (demo.py) and what it needs of the model and of attention_viz.py: streamed generation that
equals generate and reuses a video's encoding, the autoregressive queries' attention, the animation files, the
page's answers to bad input, and the page itself driven in headless Chromium (Debian's chromium and
chromium-driver; skipped when they are absent, except in CI)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import av
import numpy as np
import pytest
import torch
from PIL import Image

import attention_viz
import demo
import generate
from config import FrameConfig, InputSettings
from conftest import ROOT, TINY_DINO, DinoCounter, rand_frames, rand_ids, tiny_model_kwargs
from frames import load_clip
from model import MODES, FoveatedVLM, load_checkpoint
from synthetic import encode_mp4, render

SIZE = TINY_DINO["image_size"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LOCAL = "127.0.0.1"
FINAL = ("Answered", "Cannot", "Still answering", "Type a question", "Choose a video", "Too long")  # a done ask
no_progress = lambda *args: None


def synthetic_video(path, frames=6, fps=1):
    """A synthetic-set clip (a red square moving right) as an mp4 file."""
    with open(path, "wb") as f:
        f.write(encode_mp4(render({"colour": "red", "shape": "square", "direction": "right"}, SIZE, frames), fps))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random fVLM saved as a user saves one (weights, config, tokenizer). Its output layer is its own:
    with the input embeddings tied to it, a random LLM repeats the newline it last read, which reads as nothing."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    kwargs = tiny_model_kwargs()
    kwargs["llm_config"]["tie_word_embeddings"] = False
    model = FoveatedVLM(**kwargs)
    model.inputs = InputSettings(frame_size=SIZE)  # what training writes: the size it was trained at
    model.save_pretrained(str(path), tokenizer=tokenizer)
    return str(path)


@pytest.fixture
def session(checkpoint, tmp_path):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    return demo.Session(model.eval(), tokenizer, str(tmp_path), max_new_tokens=6)


# ---------------------------------------------------------------- what the page needs of the model
@pytest.mark.parametrize("mode", MODES)
def test_generate_stream_grows_to_generate_and_reuses_the_encoding(tiny_model, mode):
    x, prompt = rand_frames(1, 3), rand_ids(1, 4)
    expected = tiny_model.generate(x, prompt, max_new_tokens=6, mode=mode)
    steps = list(tiny_model.generate_stream(x, prompt, max_new_tokens=6, mode=mode))
    assert [s.shape[1] for s in steps] == list(range(1, expected.shape[1] + 1))
    assert all(torch.equal(a, b[:, :a.shape[1]]) for a, b in zip(steps, steps[1:]))  # each step extends the last
    assert torch.equal(steps[-1], expected)
    encoded = tiny_model.encode(x)
    visual = tiny_model.visual_tokens(*encoded, mode)[0]
    with DinoCounter(tiny_model) as dino:
        *_, again = tiny_model.generate_stream(None, prompt, max_new_tokens=6, mode=mode, encoded=encoded,
                                               visual=visual)
    assert torch.equal(again, expected) and dino.frames == 0


def test_autoregressive_attention_maps_are_the_answering_queries(tiny_model):
    x = rand_frames(1, 3)
    maps = tiny_model.attention_maps(x)
    ar = maps["autoregressive"]  # [L, B, T, heads, 1+P]
    assert ar.shape == maps["fine"].shape and torch.allclose(ar.sum(-1), torch.ones(ar.shape[:-1]), atol=1e-5)
    assert torch.allclose(ar[:, :, 0], maps["fine"][:, :, 0], atol=1e-6)  # frame 0: q_init in both
    assert (ar[:, :, 1:] - maps["coarse"][:, :, 1:]).abs().max() > 1e-4  # the LLM moved the query
    kv, frame_idx, counts = tiny_model.encode(x)
    tokens, queries = tiny_model._autoregressive_tokens(kv, frame_idx, counts)
    assert torch.allclose(tiny_model._tokens(queries, kv, frame_idx), tokens, atol=1e-6)
    _, layers = tiny_model.encoder.query_attend(queries, kv, frame_idx, return_attention=True)
    assert torch.allclose(torch.stack(layers), ar[:, 0], atol=1e-6)
    prefix = tiny_model.attention_maps(x[:, :2])["autoregressive"]  # frame t's query sees frames < t only
    assert torch.allclose(prefix, ar[:, :, :2], atol=1e-6)


def test_chunked_encoding_answers_as_the_whole_clip(tiny_model, monkeypatch):
    monkeypatch.setattr(demo, "ENCODE_CHUNK", 3)
    x = torch.cat([rand_frames(1, 4)[0], rand_frames(1, 1, seed=1)[0].expand(4, -1, -1, -1)])  # a still at the end
    seen = []
    with DinoCounter(tiny_model) as dino:
        encoded = demo.encode_in_chunks(tiny_model, x, lambda done, T: seen.append((done, T)))
    assert seen == [(3, 8), (6, 8), (8, 8)] and dino.frames == 6  # the still is encoded once per chunk it is in
    prompt = rand_ids(1, 4)
    for mode in MODES:
        expected = tiny_model.generate(x[None], prompt, max_new_tokens=5, mode=mode)
        *_, new = tiny_model.generate_stream(None, prompt, max_new_tokens=5, mode=mode, encoded=encoded)
        assert torch.equal(new, expected), mode


# ---------------------------------------------------------------- the animation (attention_viz --animate)
def test_animate_writes_mp4_and_gif_with_a_frame_per_frame(checkpoint, tmp_path, capsys):
    clip = synthetic_video(tmp_path / "clip.mp4")
    attention_viz.main(["--checkpoint", checkpoint, "--video", clip, "--animate", str(tmp_path / "a.mp4"),
                        "--max-frames", "5", "--threads", "1"])
    assert "a.mp4" in capsys.readouterr().out and not os.path.exists("attention.png")  # no PNG unless --out
    with av.open(str(tmp_path / "a.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape[0] % 2 == 0 and frames[0].shape[1] % 2 == 0
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1  # the frames move
    model, _, _ = load_checkpoint(checkpoint)
    x = load_clip(clip, FrameConfig(frame_size=SIZE, max_frames=5)).frames
    entropy = attention_viz.animate(model, x, str(tmp_path / "a.gif"), "coarse_only", layer=0, verbose=False)
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 5
    assert set(entropy) == {"coarse", "fine", "autoregressive"} and entropy["autoregressive"].shape == (2, 5)
    with pytest.raises(ValueError, match=r"\.mp4 or a \.gif"):
        attention_viz.animate(model, x, str(tmp_path / "a.avi"))
    with pytest.raises(ValueError, match="layers"):
        attention_viz.animate(model, x, str(tmp_path / "b.mp4"), layer=5)


# ---------------------------------------------------------------- the page's logic, without a browser
def ask(session, question, history=(), source=None, mode="autoregressive", fps=1.0, cap=64, progress=no_progress):
    """Everything demo.respond yields: [(chat, history, animation, status, question box), ...]."""
    return list(demo.respond(session, question, list(history), source, mode, fps, cap, progress))


def test_follow_up_questions_reuse_the_video_and_continue_the_conversation(session, tmp_path):
    clip = synthetic_video(tmp_path / "clip.mp4")
    told = []
    with DinoCounter(session.model) as dino:
        first = ask(session, "What moves?", source=clip, progress=lambda *args: told.append(args))
    chat, history, animation, status, box = first[-1]
    assert dino.frames > 0 and "Answered" in status and box == ""
    assert told == [(None, "decoding clip.mp4"), (1.0, "decoding frame 6 of 6 of clip.mp4"),
                    (1.0, "encoding frame 6 of 6 with DINOv2"),
                    (None, "the autoregressive visual tokens")]
    assert history == [("What moves?", chat[-1]["content"])] and os.path.dirname(animation) == str(tmp_path)
    assert len(first) > 2 and all(len(s[0]) == 2 for s in first[:-1])  # the answer grew in the page
    frames = load_clip(clip, FrameConfig(frame_size=SIZE)).frames
    ids = torch.tensor([demo.prompt_ids(session.tokenizer, "What moves?")])
    expected = session.model.generate(frames[None], ids, max_new_tokens=6, eos_token_id=session.tokenizer.eos_token_id)
    assert history[0][1] == session.tokenizer.decode(expected[0], skip_special_tokens=True).strip() != ""
    with DinoCounter(session.model) as dino:
        chat, history, again, status, _ = ask(session, "And then?", history, clip)[-1]
    assert dino.frames == 0 and again == animation and len(chat) == 4 and history[0][0] == "What moves?"
    with DinoCounter(session.model) as dino:
        ask(session, "And then?", history, clip, fps=2.0)  # another frame rate: the video is read again
    assert dino.frames > 0 and not os.path.exists(animation)  # the last video's files are deleted


def test_bad_input_gets_a_message_in_the_page(session, tmp_path):
    clip = synthetic_video(tmp_path / "clip.mp4")
    (tmp_path / "cut.mp4").write_bytes(open(clip, "rb").read()[:200])
    (tmp_path / "notes.txt").write_text("not a video")
    for question, source, message in [
        ("What moves?", None, "Choose a video or an image first"),
        ("   ", clip, "Type a question first"),
        ("What moves?", str(tmp_path / "cut.mp4"), "Cannot read cut.mp4"),
        ("What moves?", str(tmp_path / "notes.txt"), "Cannot read notes.txt"),
    ]:
        (chat, history, animation, status, box), = ask(session, question, source=source)
        assert message in status and chat == history == animation == box == demo.gr.skip()  # the rest unchanged
    with session.busy:  # a question is being answered
        assert ask(session, "What moves?", source=clip)[-1][3] == demo.BUSY
    assert "Answered" in ask(session, "What moves?", source=clip)[-1][3]  # and the page still answers
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.png")
    assert "from 8 frames" in ask(session, "What colour?", source=str(tmp_path / "photo.png"))[-1][3]  # replicated


def test_a_video_longer_than_the_context_is_refused_before_it_is_encoded(tokenizer, tmp_path):
    torch.manual_seed(0)
    kwargs = tiny_model_kwargs()
    kwargs["llm_config"]["max_position_embeddings"] = 40
    model = FoveatedVLM(**kwargs).eval()
    model.inputs = InputSettings(frame_size=SIZE)
    session = demo.Session(model, tokenizer, str(tmp_path), max_new_tokens=6)
    clip = synthetic_video(tmp_path / "long.mp4", frames=20, fps=1)
    with DinoCounter(session.model) as dino:
        status = ask(session, "What moves?", source=clip, fps=1.0)[-1][3]
    assert "Too long for the model" in status and "20 frames" in status and "reads 40" in status
    assert dino.frames == 0
    assert "Answered" in ask(session, "Hi?", source=clip, cap=4)[-1][3]


@pytest.mark.slow
def test_the_command_serves_on_127_0_0_1_and_a_kill_removes_its_temporary_folder(checkpoint, tmp_path):
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))  # where tempfile (and so the demo and gradio) write
    server = subprocess.Popen([sys.executable, "demo.py", "--checkpoint", checkpoint, "--port", str(port),
                               "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{LOCAL}:{port}/", timeout=2) as page:
                    assert page.status == 200 and b"fVLM: where the model looks" in page.read()
                break
            except urllib.error.URLError:
                time.sleep(0.5)
        assert [p.name for p in tmp_path.glob("fvlm-demo-*")], "no temporary folder while serving"
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0 and f"http://{LOCAL}:{port}" in out and "gradio.live" not in out, out
    assert not list(tmp_path.glob("fvlm-demo-*"))  # uploads and animations went with it


# ---------------------------------------------------------------- the page in a real browser
class Outbound:
    """Records (and refuses) this process's connections and name lookups to any host but 127.0.0.1."""

    def __init__(self, monkeypatch):
        self.attempts = []
        connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

        def guarded_connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (LOCAL, "::1", "localhost"):
                self.attempts.append(address)
                raise ConnectionRefusedError(f"test: no connection to {address}")
            return connect(sock, address)

        def guarded_getaddrinfo(host, *args, **kwargs):
            if host not in (LOCAL, "::1", "localhost", None):
                self.attempts.append(host)
                raise socket.gaierror(f"test: no lookup of {host}")
            return getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", guarded_connect)
        monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def free_port():
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def chromium():
    """Headless Chromium through Debian's chromedriver, logging the page's network events; nothing of the
    browser's own (updates, sync, field trials) is fetched."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    return driver


def requested_urls(driver):
    """Every URL the page requested or opened a WebSocket to since the last call (Chrome DevTools events)."""
    urls = []
    for entry in driver.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            urls.append(event["params"]["request"]["url"])
        elif event["method"] == "Network.webSocketCreated":
            urls.append(event["params"]["url"])
    return urls


def wait_for(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition())


def upload(driver, url, media):
    """Open the page and upload `media`."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#question textarea"))
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(media)


def drive(driver, url, media, question):
    """Open the page, upload `media`, ask `question` and wait for the answer; returns the status line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    status = lambda: driver.find_element(By.ID, "status").text
    upload(driver, url, media)
    wait_for(driver, lambda: "ask a question" in status())
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys((Keys.SHIFT + Keys.ENTER + Keys.SHIFT).join(question.splitlines()))  # Enter alone asks
    driver.find_element(By.ID, "ask").click()
    wait_for(driver, lambda: any(word in status() for word in FINAL))
    return status()


def overlay_video(driver, timeout=30):
    """The overlay's <video>: (src, readyState, videoWidth) once the browser has decoded its first frame."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    state = "return [arguments[0].src, arguments[0].readyState, arguments[0].videoWidth]"
    find = lambda d: [d.execute_script(state, v) for v in d.find_elements(By.CSS_SELECTOR, "#overlay video")]
    return WebDriverWait(driver, timeout).until(lambda d: next((v for v in find(d) if v[2] > 0), None))


@pytest.mark.slow
def test_the_page_in_headless_chromium(checkpoint, tmp_path, monkeypatch):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from selenium.webdriver.common.by import By

    outbound = Outbound(monkeypatch)
    workdir = tmp_path / "server"
    workdir.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(workdir))
    before = sorted(os.listdir(ROOT))
    model, tokenizer, frame_size = load_checkpoint(checkpoint)
    session = demo.Session(model.eval(), tokenizer, str(workdir), max_new_tokens=8)
    page = demo.build(session)
    _, url, _ = demo.launch(page, str(workdir), LOCAL, free_port(), max_upload_mb=1, block=False)
    driver = chromium()
    try:
        clip = synthetic_video(tmp_path / "clip.mp4")
        status = drive(driver, url, clip, "What moves in the video?")
        assert "Answered" in status, status
        frames = load_clip(clip, FrameConfig(frame_size=frame_size)).frames
        expected = generate.answer(model, tokenizer, frames, "What moves in the video?", max_new_tokens=8)
        chat = driver.find_element(By.ID, "chat").text
        assert expected and " ".join(expected.split()) in " ".join(chat.split()), (expected, chat)
        src, ready, width = overlay_video(driver)
        assert width == 880 and urlparse(src).hostname == LOCAL and str(workdir) in src  # decoded by the browser
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "demo.png"))
        with Image.open(tmp_path / "demo.png") as shot:
            assert shot.size == (1280, 800)
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"not a video")
        assert "Cannot read bad.mp4" in drive(driver, url, str(bad), "What moves?")
        with session.busy:  # a question is being answered
            assert demo.BUSY in drive(driver, url, clip, "What moves?")
        assert "Answered" in drive(driver, url, clip, "What moves?")  # the server still answers
        big = tmp_path / "big.mp4"
        big.write_bytes(os.urandom(2 * 2**20))  # over the 1 MiB limit
        upload(driver, url, str(big))
        wait_for(driver, lambda: "exceed the maximum allowed size" in driver.find_element(By.TAG_NAME, "body").text)
        elsewhere = [u for u in requested_urls(driver)
                     if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).hostname != LOCAL]
        assert not elsewhere, elsewhere
    finally:
        driver.quit()
        page.close()
    assert not outbound.attempts, outbound.attempts
    assert sorted(os.listdir(ROOT)) == before  # nothing written into the working tree (no flagging folder)
    stored = [f.name for f in workdir.rglob("*") if f.is_file()]
    assert "clip.mp4" in stored and "bad.mp4" in stored and "big.mp4" not in stored  # uploads: the temporary folder
