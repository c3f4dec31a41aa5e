"""The embedded default: the shipped shapes-world models work, and the demo report renders.

The demo measures two model sets side by side (supervised and plain); here its "plain" set
is pointed at the supervised models' files (``SETS`` patched), so that the two sets'
figures must come out equal: the side-by-side machinery is checked on values, whether or
not the plain models are shipped (tests/test_plain_models.py checks those).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mmexplain.adapters import get_adapter
from mmexplain.cli import main
from mmexplain.data import shapes as W
from mmexplain.engine import GradCAM
from mmexplain import metrics
from mmexplain.methods import list_methods
from mmexplain.tasks.caption import WordLogProbs
from mmexplain.tasks.shapes import action_accuracy, caption_accuracy, vqa_accuracy

EVAL_SEED = 777  # training used world seed 0 (and 1 for its own check)


def test_shipped_weights_are_small_safetensors() -> None:
    from mmexplain.adapters.shapes import PLAIN, WEIGHT_FILES, weights_dir

    files = [weights_dir() / f for f in WEIGHT_FILES.values()]
    assert all(f.is_file() for name, f in zip(WEIGHT_FILES, files) if not name.endswith(PLAIN))
    files = [f for f in files if f.is_file()]  # the plain twins too, once shipped
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    assert all(f.read_bytes()[8:9] == b"{" for f in files)  # safetensors: u64 header size, JSON


def test_c3d_recognises_actions() -> None:
    clips = W.ShapesWorld(seed=EVAL_SEED).clip_batch(120)
    acc = action_accuracy(get_adapter("shapes-c3d").model, clips)
    assert acc >= 0.90, f"action accuracy {acc:.1%}"


@pytest.fixture(scope="module")
def fresh_scenes() -> W.SceneBatch:
    return W.ShapesWorld(seed=EVAL_SEED).image_batch(300)


def test_captioner_names_what_is_there(fresh_scenes: W.SceneBatch) -> None:
    acc = caption_accuracy(get_adapter("shapes-captioner").model, fresh_scenes)
    assert acc >= 0.90, f"visual words of generated captions {acc:.1%} correct"


def test_vqa_model_answers(fresh_scenes: W.SceneBatch) -> None:
    acc = vqa_accuracy(get_adapter("shapes-vqa").model, fresh_scenes)
    assert acc >= 0.85, f"VQA accuracy {acc:.1%} on {len(fresh_scenes.questions)} questions"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mmexplain.demo as demo

    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(demo, "SETS", {"supervised": "", "plain": ""})  # plain = the same files
        assert main(["demo", "--out", str(out), "--images", "6", "--clips", "2", "--show", "2",
                     "--curves", "1", "--seed", "31"]) == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


def test_demo_measures_both_sets_side_by_side(demo_out: Path) -> None:
    """Both sets are measured by every method (the same models here: equal figures), the
    printed summary names the set, the report has a table per set, the papers' pair on
    both sets and the plots."""
    figures = json.loads((demo_out / "figures.json").read_text())
    sets = figures["sets"]
    assert list(sets) == ["supervised", "plain"]
    assert sets["plain"]["methods"] == sets["supervised"]["methods"]
    assert sets["plain"]["checks"] == sets["supervised"]["checks"]
    assert sets["plain"]["curves"] == sets["supervised"]["curves"]
    assert sets["supervised"]["models"]["vqa"] == "shapes-vqa"
    printed = (demo_out / "printed.txt").read_text().splitlines()
    for s in ("supervised", "plain"):
        assert sum(line.split()[:2] == [s, "Grad-CAM:"] for line in printed) == 1
        assert any(line.startswith(f"{s} models: caption visual words") for line in printed)
    html = (demo_out / "report.html").read_text()
    assert "supervised models (shapes-captioner, shapes-vqa, shapes-c3d)" in html
    assert "The papers&#x27; pair on both sets" in html or "The papers' pair on both sets" in html
    assert html.count("<table>") == 5  # a figures and a checks table per set, the pair's
    # plots: the faithfulness bars, deletion and insertion curves per set
    assert html.count("data:image/png;base64,") >= 1 + 2 * 2 + 4


def test_demo_deletion_figures_are_the_protocols(demo_out: Path) -> None:
    """The deletion AUC and curve of the first scene's VQA answers, as the protocol gives."""
    from mmexplain.tasks import protocols as P

    figures = json.loads((demo_out / "figures.json").read_text())
    scene = W.ShapesWorld(seed=31).images(1)[0]
    entries = P.shapes_perturbation(get_adapter("shapes-vqa"), scene, mode="deletion",
                                    methods=["gradcam"])
    want = P.summarize_perturbation(entries, ["gradcam"])["gradcam"]
    got = figures["sets"]["supervised"]
    assert got["methods"]["gradcam"]["vqa_deletion_auc"] == pytest.approx(want["auc"]["mean"])
    assert got["curves"]["deletion"]["gradcam"] == pytest.approx(want["curve"])
    assert len(want["curve"]) == P.CURVE_STEPS + 1


def test_demo_figures_are_measured(demo_out: Path) -> None:
    text = (demo_out / "figures.json").read_text()
    figures = json.loads(text)["sets"]["supervised"]
    assert "NaN" not in text  # valid JSON: nothing measured is null
    assert list(figures["methods"]) == list_methods()  # every registered method, side by side
    # recompute the Grad-CAM word pointing of the same scenes directly
    scenes = W.ShapesWorld(seed=31).image_batch(6)
    cam = GradCAM(get_adapter("shapes-captioner"))
    hits = []
    for i in range(6):
        refs = scenes.caption_refs[i, 1:]
        pos = [t for t in range(refs.shape[0]) if bool(refs[t].any())]
        expl = cam(scenes.images[i:i + 1], target=WordLogProbs(pos),
                   tokens=scenes.captions[i:i + 1, 1:]).upsample((64, 64))
        masks = torch.stack([scenes.masks[i][refs[t]].any(0) for t in pos])
        hits += metrics.pointing_game(expl.maps[0], masks, tolerance=4).tolist()
    assert figures["methods"]["gradcam"]["word_pointing"] == pytest.approx(sum(hits) / len(hits))
    for m in ("gradcam", "gradcam++"):
        f = figures["methods"][m]
        for key in ("word_pointing", "vqa_pointing", "action_pointing", "instances_covered"):
            assert 0.0 <= f[key] <= 1.0
        assert 0.0 <= f["vqa_average_drop"] <= 100.0
        assert 0.0 <= f["clip_average_drop"] <= 100.0
    win = [figures["methods"][m]["vqa_win_percent"] for m in ("gradcam", "gradcam++")]
    assert sum(win) == pytest.approx(100.0)  # ties count half to each


def test_demo_report_is_self_contained_and_escaped(demo_out: Path) -> None:
    html = (demo_out / "report.html").read_text()
    assert html.index("<h2>Figures") < html.index("<h2>Captioning")  # the summary comes first
    assert "Pointing: caption words (%)" in html and "word_pointing" not in html
    assert "http://" not in html and "https://" not in html
    assert html.count("data:image/png;base64,") >= 4
    # the classic C3D's clips (a row per set in each) and the modern VideoMAE's (--clips 2)
    assert html.count("data:video/mp4;base64,") == 2 + 2
    assert "<script" not in html
    assert "&#x201c;" in html or "“" in html  # captions are text, quoted


def test_demo_explains_the_modern_models_beside_the_classic_ones(demo_out: Path) -> None:
    """shapes-vlm and shapes-video (issue 20) on the same scenes and clips, by every method:
    their accuracies and measures in figures.json, their section in the report."""
    from mmexplain.methods import list_methods

    modern = json.loads((demo_out / "figures.json").read_text())["modern"]
    assert set(modern["methods"]) == set(list_methods())
    checks = modern["checks"]
    assert set(checks) == {"vlm_caption_visual_words_correct", "vlm_vqa_accuracy",
                           "video_action_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in checks.values())
    for f in modern["methods"].values():
        assert f["video_frame_pointing"] is None or 0.0 <= f["video_frame_pointing"] <= 1.0
    html = (demo_out / "report.html").read_text()
    assert html.index("<h2>Figures") < html.index("<h2>Modern models")


CHECK = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const imgs = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const vids = [...document.querySelectorAll('video')].map(v => v.readyState >= 2 && v.videoWidth > 0);
  document.body.setAttribute('data-check', JSON.stringify({imgs, vids}));
}, 2000));
</script></body>"""


def test_report_renders_images_and_videos_in_headless_chromium(demo_out: Path,
                                                                tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    html = (demo_out / "report.html").read_text()
    # the report forbids scripts (CSP); the test copy drops that line and adds a probe
    probe = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    page = tmp_path / "probe.html"
    page.write_text(probe.replace("</body>", CHECK))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, "the probe did not run"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(check["imgs"]) >= 4 and all(check["imgs"])
    assert len(check["vids"]) == 2 + 2 and all(check["vids"])  # classic C3D and modern VideoMAE


def test_a_set_whose_weights_are_not_shipped_is_left_out_with_a_note(
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import mmexplain.adapters.shapes as shapes
    from mmexplain.demo import chosen_sets
    from mmexplain.errors import InputError

    files = {**shapes.WEIGHT_FILES, "shapes-vqa-plain": "missing-vqa-plain.safetensors",
             "shapes-c3d-plain": shapes.WEIGHT_FILES["shapes-c3d"]}
    files["shapes-captioner-plain"] = shapes.WEIGHT_FILES["shapes-captioner"]
    monkeypatch.setattr(shapes, "WEIGHT_FILES", files)
    assert chosen_sets("supervised,plain") == ["supervised"]
    assert capsys.readouterr().out == ("note: the plain models' weights are not shipped "
                                       "(scripts/train_shapes.py --plain makes them); "
                                       "measuring supervised only\n")
    with pytest.raises(InputError, match=r"^--sets: expected model sets whose weights are "
                       r"shipped .*, received str 'plain'$"):
        chosen_sets("plain")
    with pytest.raises(InputError, match=r"^--sets: expected set names among supervised, "
                       r"plain, comma-separated, received str 'both'$"):
        chosen_sets("both")
