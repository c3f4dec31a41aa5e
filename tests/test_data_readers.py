"""mmexplain.data readers: COCO, caption words, VQA, VQA-HAT, DenseCap, video lists.

The real files live in ../shared/data (see its SOURCES.md); tests that need
them skip where they are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmexplain.data.coco import (
    CocoAnnotations,
    coco_word_table,
    decode_segmentation,
    segmentation_area,
    visual_words,
    word_to_category,
)
from mmexplain.data.densecap import load_densecap
from mmexplain.data.video_folder import list_videos
from mmexplain.data.vqa import load_vqa, normalize_answer, vqa_accuracy, vqa_image_name
from mmexplain.data.vqahat import VqaHatMaps, index_vqahat, load_attention_map
from mmexplain.errors import InputError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test data lives beside the project)")
    return path


@pytest.fixture(scope="module")
def coco() -> CocoAnnotations:
    return CocoAnnotations(shared_file("coco", "instances.json"),
                           shared_file("coco", "captions.json"))


# --------------------------------------------------------------------------- COCO


def test_coco_counts_instances_per_image(coco: CocoAnnotations) -> None:
    assert coco.image_ids() == [397133, 519208]
    assert len(coco.annotations(397133)) == 19
    assert len(coco.annotations(519208)) == 2
    assert len(coco.annotations(397133, "person")) == 2
    assert len(coco.category_names()) == 80
    assert coco.category_id("elephant") == 22 and coco.category_names()[1] == "person"


def test_coco_decoded_polygon_area_matches_annotation_area(coco: CocoAnnotations) -> None:
    for image_id in coco.image_ids():
        info = coco.image_info(image_id)
        for ann in coco.annotations(image_id):
            mask = coco.instance_mask(ann)
            assert mask.shape == (info["height"], info["width"]) and mask.dtype == torch.bool
            # the annotation's area is the polygon's; the raster differs by edge pixels only
            assert abs(int(mask.sum()) - ann["area"]) <= 0.05 * ann["area"] + 3
    elephant = coco.annotations(519208, "elephant")[0]
    pixels = int(coco.instance_mask(elephant).sum())
    assert pixels == pytest.approx(elephant["area"], rel=1e-3)
    assert segmentation_area(elephant["segmentation"], 406, 640) == pixels


def test_coco_category_mask_is_the_union_of_instances(coco: CocoAnnotations) -> None:
    people = [coco.instance_mask(a) for a in coco.annotations(397133, "person")]
    union = coco.category_mask(397133, "person")
    assert torch.equal(union, people[0] | people[1])
    assert int(union.sum()) < int(people[0].sum()) + int(people[1].sum()) + 1
    assert not coco.category_mask(397133, "zebra").any()  # absent: the empty mask
    masks = coco.category_masks(519208)
    assert sorted(masks) == ["elephant", "person"]


def test_decode_rle_compressed_and_uncompressed() -> None:
    from pycocotools import mask as mask_utils

    # uncompressed RLE, column-major: 1 zero, 2 ones, 9 zeros in a 3 x 4 image
    mask = decode_segmentation({"size": [3, 4], "counts": [1, 2, 9]}, 3, 4)
    want = torch.zeros(3, 4, dtype=torch.bool)
    want[1:3, 0] = True
    assert torch.equal(mask, want)
    block = np.zeros((5, 6), dtype=np.uint8, order="F")
    block[1:4, 2:5] = 1
    compressed = mask_utils.encode(block)
    compressed["counts"] = compressed["counts"].decode("ascii")  # as stored in JSON
    assert torch.equal(decode_segmentation(compressed, 5, 6), torch.from_numpy(block).bool())
    assert segmentation_area(compressed, 5, 6) == 9


def test_coco_errors(coco: CocoAnnotations, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="category: expected one of the 80 COCO category"):
        coco.category_mask(397133, "unicorn")
    with pytest.raises(InputError, match="image_id: expected an image id of the loaded"):
        coco.captions(1)
    with pytest.raises(InputError, match="instances: expected an existing COCO annotation JSON"):
        CocoAnnotations(tmp_path / "missing.json")
    with pytest.raises(InputError, match="segmentation: expected polygons"):
        decode_segmentation("polygon", 3, 4)


# --------------------------------------------------------------------------- caption words


def test_word_table_covers_the_80_categories(coco: CocoAnnotations) -> None:
    table = coco_word_table()
    assert sorted(table) == sorted(coco.category_names().values())
    assert sum(len(words) for words in table.values()) >= 300
    for word in ("man", "woman", "person", "people", "boy", "girl", "child", "men"):
        assert word_to_category(word) == "person"
    for word in ("dog", "dogs", "puppy"):
        assert word_to_category(word) == "dog"
    assert word_to_category("Brocolli") == "broccoli"
    assert word_to_category("orange") is None  # mostly the colour in captions
    assert word_to_category("hot dog") == "hot dog"


def test_visual_words_prefer_the_longest_phrase() -> None:
    found = visual_words("A hot dog next to a dog and two men with a teddy bear.")
    assert [(w.start, w.end, w.text, w.category) for w in found] == [
        (1, 3, "hot dog", "hot dog"), (6, 7, "dog", "dog"), (9, 10, "men", "person"),
        (12, 14, "teddy bear", "teddy bear")]
    assert [w.category for w in visual_words(["two", "Puppies"])] == ["dog"]  # a token list


def test_visual_words_of_real_coco_captions(coco: CocoAnnotations) -> None:
    elephant_captions = coco.captions(519208)
    assert len(elephant_captions) == 5
    for caption in elephant_captions:  # every one mentions "man" and "elephant"
        assert {w.category for w in visual_words(caption)} == {"person", "elephant"}
    kitchen = [[w.category for w in visual_words(c)] for c in coco.captions(397133)]
    assert kitchen[0] == ["person", "pizza"]        # "A man is in a kitchen making pizzas."
    assert kitchen[2] == ["person"]                 # "A baker is working in the kitchen ..."
    assert kitchen[3] == ["person", "oven"]         # "A person standing by a stove ..."


# --------------------------------------------------------------------------- VQA


@pytest.fixture(scope="module")
def vqa_items() -> list:
    return load_vqa(shared_file("vqa", "questions_first100.json"),
                    shared_file("vqa", "annotations_first100.json"))


def test_vqa_reader_fields(vqa_items: list) -> None:
    assert len(vqa_items) == 100
    first = vqa_items[0]
    assert (first.question_id, first.image_id, first.question) == \
        (262148000, 262148, "Where is he looking?")
    assert len(first.answers) == 10 and first.answers.count("down") == 7
    assert (first.multiple_choice_answer, first.answer_type) == ("down", "other")
    assert {item.answer_type for item in vqa_items} == {"other", "yes/no", "number"}
    assert vqa_image_name(first.image_id) == "COCO_val2014_000000262148.jpg"
    questions_only = load_vqa(shared_file("vqa", "questions_first100.json"))
    assert questions_only[0].answers == () and questions_only[0].answer_type is None


def test_vqa_accuracy_averages_over_9_of_10_humans(vqa_items: list) -> None:
    by_id = {item.question_id: item for item in vqa_items}
    picnic = by_id[262148002].answers  # 6 "picnic table", 3 "table", 1 "skateboard"
    assert vqa_accuracy("picnic table", picnic) == 1.0
    # 3 humans: the 3 who said it see 2 others (2/3), the other 7 see 3 (1) -> 0.9, not 1
    assert vqa_accuracy("table", picnic) == pytest.approx(0.9)
    assert vqa_accuracy("skateboard", picnic) == pytest.approx(0.3)  # 9 of 10 see 1 -> 1/3
    assert vqa_accuracy("bench", picnic) == 0.0
    # answers are normalised: case, articles, number words, punctuation
    assert vqa_accuracy("The Table.", by_id[262148000].answers) == pytest.approx(0.3)
    assert vqa_accuracy("seven", by_id[262162003].answers) == 1.0
    assert normalize_answer("Two dogs!") == "2 dogs"


def test_vqa_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="human_answers: expected at least one human answer"):
        vqa_accuracy("yes", [])
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"nothing": []}))
    with pytest.raises(InputError, match="questions: expected a VQA JSON file with a "
                                         "'questions' list"):
        load_vqa(bad)


# --------------------------------------------------------------------------- VQA-HAT


def _png(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values).save(path)


def test_vqahat_index_and_maps(tmp_path: Path) -> None:
    val = tmp_path / "vqahat_val"
    val.mkdir()
    _png(val / "123_2.png", np.full((2, 3), 51, dtype=np.uint8))
    _png(val / "123_1.png", np.array([[0, 255, 51], [102, 204, 255]], dtype=np.uint8))
    _png(val / "45_1.png", np.array([[65535, 0]], dtype=np.uint16))  # 16-bit greyscale
    (val / "notes.txt").write_text("not a map")
    _png(val / "cover.png", np.zeros((1, 1), dtype=np.uint8))  # not {qid}_{k}.png

    index = index_vqahat(val)
    assert list(index) == [45, 123]
    assert [p.name for p in index[123]] == ["123_1.png", "123_2.png"]
    hat = VqaHatMaps(tmp_path, split="val")
    assert hat.question_ids() == [45, 123] and 123 in hat and len(hat) == 2
    maps = hat.maps(123)  # (K, H, W)
    assert maps.dtype == torch.float32 and maps.shape == (2, 2, 3)
    torch.testing.assert_close(maps[0], torch.tensor([[0.0, 1.0, 0.2], [0.4, 0.8, 1.0]]))
    torch.testing.assert_close(maps[1], torch.full((2, 3), 0.2))
    assert load_attention_map(val / "45_1.png").tolist() == [[1.0, 0.0]]


def test_vqahat_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"folder: expected VQA-HAT maps named"):
        index_vqahat(tmp_path)
    _png(tmp_path / "7_1.png", np.zeros((2, 2), dtype=np.uint8))
    _png(tmp_path / "7_2.png", np.zeros((3, 2), dtype=np.uint8))
    hat = VqaHatMaps(tmp_path)
    with pytest.raises(InputError, match="question_id: expected maps of one size per question"):
        hat.maps(7)
    with pytest.raises(InputError, match="question_id: expected a question id with maps"):
        hat.paths(8)
    with pytest.raises(InputError, match="split: expected None, 'train' or 'val'"):
        VqaHatMaps(tmp_path, split="test")


# --------------------------------------------------------------------------- DenseCap


def test_densecap_reader_and_boxes_in_original_pixels() -> None:
    results = load_densecap(shared_file("densecap", "results.json"))
    assert len(results) == 1 and results.opt["image_size"] == 720
    image = results["1.jpg"]
    assert len(image) == 75 and image.captions[0] == "two men standing in a room"
    # resized 526 x 720 (longest side 720); an original of 1052 x 1440 is scale 1/2
    # box 1 is [x, y, w, h] = [176.81829833984, 203.23695373535, 246.57604980469, 299.14544677734]
    assert image.boxes((1440, 1052))[1].tolist() == pytest.approx(
        [2 * 176.81829833984, 2 * 203.23695373535, 2 * (176.81829833984 + 246.57604980469),
         2 * (203.23695373535 + 299.14544677734)])
    # a non-integer scale: a 1000 x 800 original was resized by 720 / 1000
    assert image.boxes((1000, 800))[1, 0].item() == pytest.approx(176.81829833984 / 0.72)
    # box 0 starts at x = -11.43 and is clipped to the image
    first = image.boxes((360, 263))[0]
    assert first[0].item() == 0.0
    assert first[3].item() == pytest.approx((22.424560546875 + 595.83190917969) / 2)
    assert image.boxes((360, 263), clip=False)[0, 0].item() == pytest.approx(-11.427108764648 / 2)
    top = image.top(5)
    assert top.scores.tolist() == sorted(image.scores.tolist(), reverse=True)[:5]
    assert top.captions[0] == image.captions[int(image.scores.argmax())]


def test_densecap_errors(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(InputError, match="path: expected a DenseCap results.json with 'opt'"):
        load_densecap(bad)
    bad.write_text(json.dumps({"opt": {"image_size": 720}, "results": [
        {"img_name": "a.jpg", "boxes": [[0, 0, 1, 1]], "scores": [1.0, 2.0], "captions": ["x"]}]}))
    with pytest.raises(InputError, match="expected as many boxes as scores and captions"):
        load_densecap(bad)
    bad.write_text(json.dumps({"opt": {"image_size": 720}, "results": [
        {"img_name": "a.jpg", "boxes": [[0, 0, 1, 1]], "scores": [1.0], "captions": ["x"]}]}))
    with pytest.raises(InputError, match=r"original_size: expected \(height, width\)"):
        load_densecap(bad)[0].boxes((0, 10))


# --------------------------------------------------------------------------- video lists


@pytest.fixture
def video_tree(tmp_path: Path) -> Path:
    for label, names in {"bowling": ["b.mp4", "a.avi"], "arm wrestling": ["x.mp4"]}.items():
        (tmp_path / label).mkdir()
        for name in names:
            (tmp_path / label / name).write_bytes(b"")
    (tmp_path / "bowling" / "notes.txt").write_text("not a video")
    return tmp_path


def test_video_folder_layout(video_tree: Path) -> None:
    items = list_videos(video_tree)
    assert [(i.path.name, i.label, i.label_index) for i in items] == [
        ("x.mp4", "arm wrestling", 0), ("a.avi", "bowling", 1), ("b.mp4", "bowling", 1)]
    named = list_videos(video_tree, classes=["abseiling", "arm wrestling", "bowling"])
    assert [i.label_index for i in named] == [1, 2, 2]


def test_video_csv_and_json_lists(video_tree: Path) -> None:
    csv_file = video_tree / "list.csv"
    csv_file.write_text("path,label\nbowling/b.mp4,bowling\narm wrestling/x.mp4,arm wrestling\n")
    items = list_videos(csv_file)
    assert [(i.path, i.label, i.label_index) for i in items] == [
        (video_tree / "bowling" / "b.mp4", "bowling", 1),
        (video_tree / "arm wrestling" / "x.mp4", "arm wrestling", 0)]
    json_file = video_tree / "list.json"
    json_file.write_text(json.dumps([{"path": "bowling/a.avi", "label": "bowling"},
                                     [str(video_tree / "bowling" / "b.mp4"), "bowling"]]))
    assert [i.path.name for i in list_videos(json_file, classes={"bowling": 7})] == \
        ["a.avi", "b.mp4"]
    assert {i.label_index for i in list_videos(json_file, classes={"bowling": 7})} == {7}


def test_video_list_errors(video_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(InputError, match="source: expected a folder root/<label>/<video> or a "
                                         "[.]csv/[.]json list"):
        list_videos(video_tree / "bowling" / "b.mp4")
    csv_file = video_tree / "list.csv"
    csv_file.write_text("bowling/missing.mp4,bowling\n")
    with pytest.raises(InputError, match="source: expected paths to existing video files, "
                                         "received 1 missing"):
        list_videos(csv_file)
    with pytest.raises(InputError, match=r"classes: expected every label of the videos, "
                                         r"received no class for \['arm wrestling'\]"):
        list_videos(video_tree, classes=["bowling"])
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(InputError, match="source: expected videos"):
        list_videos(empty)
