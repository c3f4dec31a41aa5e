"""mmexplain serve (issue 21): the explorer's endpoints give the engine's maps, refuse bad
uploads with a clear message, keep 20 concurrent requests apart, and its page works in
headless Chromium (Playwright; skipped with the reason where either is missing).

Screenshots of each view: MMEXPLAIN_SERVE_SHOTS=docs/serve python -m pytest tests/test_serve.py
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e .[serve])")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (the test extra)")

from starlette.testclient import TestClient  # noqa: E402

from mmexplain import serve  # noqa: E402
from mmexplain.data.shapes import ShapesWorld  # noqa: E402
from mmexplain.render import overlay, to_uint8_image  # noqa: E402
from mmexplain.tasks.caption import explain_caption  # noqa: E402
from mmexplain.tasks.vqa import explain_vqa  # noqa: E402

from conftest import shared_file  # noqa: E402

SEED = 2026
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def app() -> Any:
    return serve.create_app(seed=SEED)


@pytest.fixture(scope="module")
def client(app: Any) -> TestClient:
    with TestClient(app) as c:
        yield c


def adapter_of(app: Any, name: str) -> Any:
    return app.state.explorer.models[name].adapter


def scene_image(index: int) -> tuple[Any, np.ndarray]:
    scene = ShapesWorld(seed=SEED).image(index)
    return scene, to_uint8_image(torch.from_numpy(scene.image))


def caption_maps(adapter: Any, image: np.ndarray, caption: str | None = None, words: Any = "all",
                 method: str = "gradcam") -> tuple[torch.Tensor, list[str], np.ndarray]:
    """The engine's maps (K, h, w) of a caption's words, as the caption command makes them."""
    x, shown, context = adapter.prepare_image(image, None)
    expl, labels = explain_caption(adapter, x, caption, words, method, max_len=20, context=context)
    return expl.maps[0].detach().float(), labels, shown


def vqa_maps(adapter: Any, image: np.ndarray, question: str, answers: list[str],
             method: str = "gradcam") -> torch.Tensor:
    x, _, _ = adapter.prepare_image(image, question)
    return explain_vqa(adapter, x, question, answers, method)[0].maps[0].detach().float()


def decoded(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def explain(client: Any, **body: Any) -> dict[str, Any]:
    response = client.post("/api/explain", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --------------------------------------------------------------------------- the endpoints


def test_caption_words_are_the_engines_maps_and_their_overlays(client: TestClient, app: Any
                                                               ) -> None:
    scene, image = scene_image(11)
    made = client.post("/api/generate/scene", json={"index": 11}).json()
    assert made["truth"]["caption"] == scene.caption.text
    got = explain(client, input=made["input"], task="caption", model="shapes-captioner")
    adapter = adapter_of(app, "shapes-captioner")
    reference, labels, shown = caption_maps(adapter, image)
    assert got["labels"] == labels and got["caption"] == " ".join(labels) and got["own"]
    torch.testing.assert_close(torch.tensor(got["maps"]), reference, rtol=0, atol=1e-6)
    for k in (1, 2):  # one word alone, by its position: the same map as among all K
        alone = caption_maps(adapter, image, words=[k])[0][0]
        torch.testing.assert_close(torch.tensor(got["maps"][k]), alone, rtol=1e-5, atol=1e-6)
    png = client.get(f"/api/result/{got['result']}/overlay/2.png?cmap=gray&alpha=0.3")
    assert png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(decoded(png.content),
                                  overlay(shown, reference[2], 0.3, cmap="gray"))
    with np.load(io.BytesIO(client.get(f"/api/result/{got['result']}/download.npz").content)) as z:
        np.testing.assert_allclose(z["maps"][0], reference.numpy(), atol=1e-6)
        assert z["labels"].tolist() == labels and str(z["method"]) == "gradcam"
    # ground truth: colour and shape words have a mask, the others none
    from mmexplain.data.shapes import COLORS, SHAPE_PLURALS, SHAPES

    named = set(COLORS) | set(SHAPES) | set(SHAPE_PLURALS.values())
    assert [p is not None for p in got["pointing"]] == [w in named for w in labels]
    assert any(p is not None for p in got["pointing"])


def test_a_typed_caption_with_another_method_and_layer(client: TestClient, app: Any) -> None:
    _, image = scene_image(12)
    made = client.post("/api/generate/scene", json={"index": 12}).json()
    got = explain(client, input=made["input"], task="caption", model="shapes-captioner",
                  caption="a red circle", method="gradcam++", layer="conv2")
    view = adapter_of(app, "shapes-captioner").at_layer("conv2")
    reference, labels, _ = caption_maps(view, image, "a red circle", method="gradcam++")
    assert got["labels"] == ["a", "red", "circle"] == labels and not got["own"]
    assert got["layer"] == "conv2" and got["method"] == "gradcam++" and got["grid"] == [32, 32]
    torch.testing.assert_close(torch.tensor(got["maps"]), reference, rtol=0, atol=1e-6)


def test_a_question_and_a_forced_answer(client: TestClient, app: Any) -> None:
    scene, image = scene_image(13)
    qa = next(q for q in scene.qas if q.answer_refs)
    made = client.post("/api/generate/scene", json={"index": 13}).json()
    asked = explain(client, input=made["input"], task="vqa", model="shapes-vqa",
                    question=qa.question)
    own = asked["own"][0]["answer"]
    assert asked["labels"] == [own] and asked["true_answer"] == qa.answer
    forced = next(a for a in ("yellow", "green") if a != own)
    got = explain(client, input=made["input"], task="vqa", model="shapes-vqa",
                  question=qa.question, answers=[forced])
    assert got["labels"] == [own, forced] and got["own"] == asked["own"]
    reference = vqa_maps(adapter_of(app, "shapes-vqa"), image, qa.question, [own, forced])
    torch.testing.assert_close(torch.tensor(got["maps"]), reference, rtol=0, atol=1e-6)
    assert all(isinstance(hit, bool) for hit in got["pointing"])  # the answer's objects
    mask = client.get(f"/api/result/{got['result']}/mask/0.png")
    assert mask.status_code == 200 and decoded(mask.content).shape == (64, 64, 3)


def test_a_clip_is_the_video_commands_work(client: TestClient, tmp_path: Path) -> None:
    from mmexplain.cli import main

    made = client.post("/api/generate/clip", json={"index": 4}).json()
    clip = ShapesWorld(seed=SEED).clip(4)
    assert made["truth"]["action"] == clip.action_name
    got = explain(client, input=made["input"], task="video", model="shapes-c3d", frames=16)
    assert got["frames"] == 16 and got["windows"] == 1 and len(got["importance"][0]) == 16
    assert len(got["pointing"][0]) == 16  # the actor's mask, frame by frame
    served = client.get(f"/api/result/{got['result']}/download.npz").content
    video = tmp_path / "clip.mp4"  # the same bytes, through the command
    video.write_bytes(serve.clip_input(SEED, 4).video)
    assert main(["video", str(video), "--model", "shapes-c3d", "--top", "3", "--sequential",
                 "--out", str(tmp_path / "out")]) == 0
    with np.load(io.BytesIO(served)) as ours, np.load(tmp_path / "out" /
                                                     "clip_shapes-c3d_gradcam.npz") as theirs:
        np.testing.assert_allclose(ours["frame_maps"], theirs["frame_maps"], atol=1e-6)
        assert ours["labels"].tolist() == theirs["labels"].tolist()
    asked = explain(client, input=made["input"], task="video", model="shapes-c3d", frames=16,
                    action="rotating", method="gradcam++")
    assert asked["labels"] == ["rotating"] and asked["actions"][0]["action"] == "rotating"
    with np.load(io.BytesIO(client.get(f"/api/result/{asked['result']}/download.npz").content)
                 ) as z:
        assert z["labels"].tolist() == [["rotating"]] and str(z["method"]) == "gradcam++"
    frame = client.get(f"/api/result/{got['result']}/overlay/0.png?frame=5")
    assert decoded(frame.content).shape == (64, 64, 3)
    mp4 = client.get(f"/api/result/{got['result']}/download.mp4")
    assert mp4.content[4:8] == b"ftyp" and mp4.headers["accept-ranges"] == "bytes"
    part = client.get(f"/api/result/{got['result']}/download.mp4", headers={"Range": "bytes=4-7"})
    assert part.status_code == 206 and part.content == b"ftyp"
    assert part.headers["content-range"] == f"bytes 4-7/{len(mp4.content)}"
    tail = client.get(f"/api/result/{got['result']}/download.mp4", headers={"Range": "bytes=-3"})
    assert tail.content == mp4.content[-3:]


def test_bad_uploads_and_requests_answer_a_clear_json_error(client: TestClient, app: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    text = client.post("/api/upload/image", files={"file": ("notes.png", b"just some text\n")})
    assert text.status_code == 415
    assert text.json()["error"] == ("image: expected a PNG, JPEG, GIF, BMP, TIFF or WEBP image, "
                                    "received 'notes.png' (15 bytes), which is not an image file")
    bad_video = client.post("/api/upload/video", files={"file": ("clip.mp4", b"not a video")})
    assert bad_video.status_code == 415 and "'clip.mp4'" in bad_video.json()["error"]
    assert "mmexplain-serve-" not in bad_video.json()["error"]  # no server path
    small = serve.create_app(models=app.state.explorer.models, limits=serve.Limits(image_bytes=1000))
    with TestClient(small) as c:
        big = c.post("/api/upload/image", files={"file": ("big.png", b"\0" * 5000)})
    assert big.status_code == 413 and big.json()["error"] == (
        f"image: expected a file of at most {1000 / 2**20:g} MB, received 'big.png' of "
        f"{5000 / 2**20:.3g} MB")
    assert client.post("/api/upload/image", data={"x": "1"}).status_code == 400
    assert client.post("/api/explain", json={"input": "nope", "task": "caption"}).json() == {
        "error": "input: expected the id of an input this server holds (the newest 64 are "
                 "kept), received 'nope'"}
    made = client.post("/api/generate/scene", json={"index": 1}).json()
    wrong = client.post("/api/explain", json={"input": made["input"], "task": "caption",
                                              "model": "shapes-captioner", "method": "magic"})
    assert wrong.status_code == 400 and wrong.json()["error"].startswith("method: expected one of")
    forged = client.post("/api/generate/scene", json={}, headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403 and forged.json()["error"] == (
        "origin: expected a request from this server's page (testserver), received one from "
        "'http://evil.example'")
    monkeypatch.setitem(serve.EXPLAINERS, "caption", lambda *a: 1 / 0)
    broken = client.post("/api/explain", json={"input": made["input"], "task": "caption",
                                               "model": "shapes-captioner"})
    assert broken.status_code == 500 and "ZeroDivisionError" in broken.json()["error"]
    monkeypatch.undo()
    assert explain(client, input=made["input"], task="caption", model="shapes-captioner")["labels"]


def test_the_page_escapes_and_forbids_other_origins(client: TestClient) -> None:
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "object-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # the one script is a file of this server
    script = client.get("/static/serve.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "http://" not in script and "https://" not in script  # no CDN, no other host


# --------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def live(app: Any) -> str:
    """The app served by uvicorn in a background thread on a free port."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_20_concurrent_requests_each_get_their_own_result(live: str, app: Any) -> None:
    import httpx

    def ask(i: int) -> dict[str, Any]:
        with httpx.Client(base_url=live, timeout=60) as c:
            made = c.post("/api/generate/scene", json={"index": 200 + i // 2}).json()
            body = {"input": made["input"], "model": "shapes-captioner", "task": "caption"}
            if i % 2:
                question = ShapesWorld(seed=SEED).image(200 + i // 2).qas[0].question
                body.update(task="vqa", model="shapes-vqa", question=question)
            return c.post("/api/explain", json=body).json()

    def fail(i: int) -> int:  # failing requests among them: the server goes on
        with httpx.Client(base_url=live, timeout=60) as c:
            return c.post("/api/upload/image", files={"file": (f"{i}.png", b"text")}).status_code

    with ThreadPoolExecutor(24) as pool:
        failed = pool.map(fail, range(4))
        answers = list(pool.map(ask, range(20)))
    assert list(failed) == [415] * 4
    for i, got in enumerate(answers):
        scene, image = scene_image(200 + i // 2)
        if i % 2:
            reference = vqa_maps(adapter_of(app, "shapes-vqa"), image, scene.qas[0].question,
                                 got["labels"])
        else:
            reference = caption_maps(adapter_of(app, "shapes-captioner"), image)[0]
        torch.testing.assert_close(torch.tensor(got["maps"]), reference, rtol=0, atol=1e-6)
    assert len({a["result"] for a in answers}) == 20


# --------------------------------------------------------------------------- the page in Chromium


@pytest.fixture(scope="module")
def page(live: str) -> Any:
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (the test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        # bypass_csp: Playwright's waits evaluate strings, which the page's policy forbids
        context = browser.new_context(viewport={"width": 1180, "height": 780}, bypass_csp=True)
        tab = context.new_page()
        tab.goto(live + "/")
        tab.wait_for_selector("body[data-state=ready]")
        yield tab
        browser.close()


def shot(tab: Any, name: str) -> None:
    """A screenshot of the view into $MMEXPLAIN_SERVE_SHOTS (the README's docs/serve)."""
    folder = os.environ.get("MMEXPLAIN_SERVE_SHOTS")
    if not folder:
        return
    from PIL import Image

    path = (ROOT / folder / f"{name}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(tab.screenshot())).convert("RGB")
    image.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def shown_map(tab: Any, label: str) -> tuple[torch.Tensor, bytes]:
    """The map the page shows once it shows ``label``'s: its values and the PNG it shows."""
    tab.wait_for_selector(f"#map[data-label={json.dumps(label)}]")
    tab.wait_for_function("() => { const m = document.querySelector('#map');"
                          " return m.complete && m.naturalWidth > 0; }")
    values = json.loads(tab.get_attribute("#map", "data-map"))
    return torch.tensor(values), tab.request.get(tab.eval_on_selector("#map", "m => m.src")).body()


def test_the_page_explains_two_words_and_a_forced_answer(page: Any, app: Any) -> None:
    tab = page
    tab.click("#gen-scene")
    tab.wait_for_selector("#words button")
    index = int(tab.text_content("#input-name").split()[-1])
    scene, image = scene_image(index)
    adapter = adapter_of(app, "shapes-captioner")
    reference, labels, shown = caption_maps(adapter, image)
    words = tab.locator("#words button")
    assert words.all_text_contents() == labels
    seen = []
    for k in (1, 2):  # two different words: their maps differ, each the engine's
        words.nth(k).click()
        values, png = shown_map(tab, labels[k])
        torch.testing.assert_close(values, reference[k], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(decoded(png), overlay(shown, reference[k], 0.5))
        seen.append(values)
    assert not torch.allclose(seen[0], seen[1])
    shot(tab, "caption")

    qa = scene.qas[0]
    tab.fill("#question", qa.question)
    tab.click("#ask")
    tab.wait_for_selector("#answers button")
    own = tab.locator("#answers button").first.text_content()
    forced = next(a for a in ("yellow", "green", "purple") if a != own)
    tab.fill("#force", forced)
    tab.click("#force-btn")
    values, _ = shown_map(tab, forced)
    reference = vqa_maps(adapter_of(app, "shapes-vqa"), image, qa.question, [own, forced])
    torch.testing.assert_close(values, reference[1], rtol=0, atol=1e-6)
    assert tab.locator("#answers button").all_text_contents() == [own, forced + "?"]
    shot(tab, "vqa")


def test_the_page_plays_an_uploaded_video_and_scrubs_it(page: Any) -> None:
    tab = page
    tab.fill("#frames", "32")
    tab.set_input_files("#video-file", str(shared_file("video", "armwrestling.mp4")))
    tab.wait_for_function("() => document.querySelector('#map').dataset.frame !== ''"
                          " && document.querySelector('#input-name').textContent"
                          " === 'armwrestling.mp4'")
    tab.wait_for_function("() => document.querySelector('#player').readyState >= 2")
    assert tab.get_attribute("#scrub", "max") == "31"  # 32 frames explained
    tab.evaluate("() => document.querySelector('#player').play()")
    tab.wait_for_function("() => document.querySelector('#player').currentTime > 0.2")
    tab.evaluate("() => document.querySelector('#player').pause()")
    tab.evaluate("() => { const s = document.querySelector('#scrub'); s.value = 20;"
                 " s.dispatchEvent(new Event('input')); }")
    tab.wait_for_selector("#map[data-frame='20']")
    tab.wait_for_function("() => { const p = document.querySelector('#player');"
                          " return !p.seeking && Math.abs(p.currentTime * 28 - 20.5) < 1; }")
    assert "frame 20 of 32" in tab.text_content("#map-caption")
    assert tab.locator("#actions button").count() >= 1
    shot(tab, "video")


def test_the_page_shows_a_clips_truth_and_explains_another_action(page: Any) -> None:
    tab = page
    before = tab.get_attribute("#map", "data-result")
    tab.click("#gen-clip")
    tab.wait_for_function("old => { const m = document.querySelector('#map');"
                          " return m.dataset.result && m.dataset.result !== old; }", arg=before)
    index = int(tab.text_content("#input-name").split()[-1])
    clip = ShapesWorld(seed=SEED).clip(index)
    truth = tab.locator("#truth-list dd").all_text_contents()
    actor = clip.objects[clip.actor]
    assert truth == [clip.action_name, f"{actor.color} {actor.shape}"]
    tab.wait_for_selector("#mask-figure:not([hidden])")  # the actor's mask, frame 0
    assert tab.text_content("#pointing").split(":")[0] in ("hit", "miss")
    actions = tab.locator("#actions button").all_text_contents()
    other = actions[1]
    tab.locator("#actions button").nth(1).click()
    tab.wait_for_selector(f"#map[data-label={json.dumps(other)}]")
    assert tab.locator("#actions button").all_text_contents() == actions  # still offered
    assert tab.locator("#targets button").all_text_contents() == [other]
    shot(tab, "clip")


def test_the_page_says_what_is_wrong_and_escapes_names(page: Any) -> None:
    tab = page
    name = "<img src=x onerror=document.title=1>.png"
    tab.set_input_files("#image-file", files=[{"name": name, "mimeType": "image/png",
                                               "buffer": b"just some text, not an image\n"}])
    tab.wait_for_selector("#message:not([hidden])")
    message = tab.text_content("#message")
    assert "which is not an image file" in message and name in message  # shown as text
    assert tab.locator("img[src='x']").count() == 0 and tab.title() == "mmexplain explorer"
    shot(tab, "error")


def test_the_store_keeps_the_newest_within_its_count_and_bytes() -> None:
    store = serve.Store("input", keep=3, budget=100)
    keys = [store.add(f"item {i}", size=40) for i in range(4)]
    assert [store.get(k) for k in keys[2:]] == ["item 2", "item 3"]  # 160 > 100 bytes: 2 left
    with pytest.raises(serve.RequestError, match="received 'nope'") as raised:
        store.get("nope")
    assert raised.value.status == 404
    assert all(len(k) >= 16 for k in keys) and len(set(keys)) == 4  # random, not guessable


def test_a_hugging_face_folder_is_served_beside_the_shapes_models(tmp_path: Path) -> None:
    """--weights DIR alone: the folder's family (config.json), loaded as the commands load it;
    an uploaded PNG's caption maps are the engine's."""
    import hf_tiny
    from mmexplain.adapters import get_adapter
    from mmexplain.render import png_bytes

    folder = hf_tiny.save_folder("blip-caption", tmp_path / "blip")
    with pytest.raises(serve.InputError, match="--model: expected the registered model"):
        serve.load_models(None, str(tmp_path / "blip" / "config.json"), "cpu")
    with pytest.raises(serve.InputError, match="--weights: expected the weights of one --model, "
                       "received 'w.pt' for 2 models"):
        serve.load_models(["resnet18", "r3d_18"], "w.pt", "cpu")
    app = serve.create_app(weights=str(folder))
    assert [m.tasks for m in app.state.explorer.models.values()] == [
        ("caption",), ("vqa",), ("video",), ("caption",)]
    image = hf_tiny.image()
    with TestClient(app) as c:
        made = c.post("/api/upload/image", files={"file": ("photo.png", png_bytes(image))}).json()
        got = explain(c, input=made["input"], task="caption", model="blip-caption",
                      caption=hf_tiny.CORPUS[0])
    reference, labels, _ = caption_maps(get_adapter("blip-caption", path=folder), image,
                                        hf_tiny.CORPUS[0])
    assert got["labels"] == labels and got["pointing"] == [None] * len(labels)
    torch.testing.assert_close(torch.tensor(got["maps"]), reference, rtol=1e-5, atol=1e-6)


def test_the_command_binds_this_machine_by_default(app: Any, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from mmexplain.cli import main

    started, started_apps = [], []
    monkeypatch.setattr(serve, "load_models", lambda *a: app.state.explorer.models)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: (started.append(kw),
                                                          started_apps.append(app)))
    assert main(["serve"]) == 0 and main(["serve", "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert [(s["host"], s["port"]) for s in started] == [("127.0.0.1", 8765), ("0.0.0.0", 9000)]
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8765/" in out and "note: listening on 0.0.0.0" in out
    with TestClient(started_apps[0]) as c:  # bound to this machine: other host names refused
        assert c.get("/api/models").status_code == 400  # TestClient's Host is "testserver"
    with TestClient(started_apps[1]) as c:
        assert c.get("/api/models").status_code == 200
    assert main(["serve", "--max-frames", "0"]) == 2
    assert "--max-frames: expected a positive number, received int 0" in capsys.readouterr().err
