"""DLC-Bench folder reader and the COCO RLE (pycocotools) / polygon decoders, on folders and masks written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pdlm_ros.errors import DatasetError
from pdlm_ros.eval.dlcbench import DLCBench, polygons_to_mask, rle_decode, rle_encode


# ------------------------------------------------------------------------------------------------------------- RLE
@pytest.mark.parametrize("size, text, ones", [
    ([2, 2], "04", [(0, 0), (0, 1), (1, 0), (1, 1)]),  # no background run, then 4 ones
    ([2, 3], "231", [(0, 1), (1, 1), (0, 2)]),  # column-major: 2 off, 3 on, 1 off
    ([2, 5], "1232", [(1, 0), (0, 1), (0, 3), (1, 3), (0, 4), (1, 4)]),  # 4th count stored as 4 - 2 (delta from 2 back)
])
def test_rle_strings_decode_as_hand_worked(size, text, ones):
    mask = rle_decode({"size": size, "counts": text})
    assert sorted(zip(*np.nonzero(mask))) == sorted(ones)
    assert rle_encode(mask)["counts"] == text


def test_rle_decode_is_column_major():
    # Columns first: counts [1, 2, 3] over a 2x3 image -> (0,0)=0, (1,0)=1, (0,1)=1, rest 0.
    mask = rle_decode({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (31, 17), (64, 80)])
def test_rle_round_trip_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.05, 0.5, 1.0):
        mask = rng.random(shape) < density
        for compressed in (True, False):
            rle = rle_encode(mask, compressed=compressed)
            assert rle["size"] == list(shape)
            assert isinstance(rle["counts"], str if compressed else list)
            assert np.array_equal(rle_decode(rle), mask)


def test_rle_round_trip_large_runs():
    mask = np.zeros((300, 400), dtype=bool)
    mask[20:280, 50:390] = True
    rle = rle_encode(mask)
    assert np.array_equal(rle_decode(rle, 300, 400), mask)
    assert sum(rle_encode(mask, compressed=False)["counts"]) == 300 * 400


def test_rle_errors():
    with pytest.raises(DatasetError, match="summing to 6 pixels .*summing to 5"):
        rle_decode({"size": [2, 3], "counts": [1, 4]})
    with pytest.raises(DatasetError, match="does not match the image"):
        rle_decode({"size": [2, 3], "counts": [6]}, 3, 2)
    with pytest.raises(DatasetError, match="needs 'size'"):
        rle_decode({"counts": [6]})
    with pytest.raises(DatasetError, match="not a valid 2x3 mask"):
        rle_decode({"size": [2, 3], "counts": "T"})  # 'T' says another character follows
    with pytest.raises(DatasetError, match="not a valid 2x3 mask"):
        rle_decode({"size": [2, 3], "counts": "25"})  # 7 pixels for 6
    # pycocotools alone would return uninitialised pixels for runs that stop short of the image
    with pytest.raises(DatasetError, match="do not cover the 4x5 image"):
        rle_decode({"size": [4, 5], "counts": "52"})


def test_polygons_to_mask():
    mask = polygons_to_mask([[2, 2, 6, 2, 6, 6, 2, 6], [10, 10, 12, 10, 12, 12]], 16, 16)
    assert mask[4, 4] and mask[2, 2] and mask[6, 6] and not mask[0, 0] and not mask[8, 8]
    assert mask[10:13, 10:13].any()
    assert 16 <= mask[:8, :8].sum() <= 25
    with pytest.raises(DatasetError, match=">= 3"):
        polygons_to_mask([[1, 2, 3, 4]], 8, 8)


# ----------------------------------------------------------------------------------------------------------- folder
def _write_bench(root, rng):
    (root / "images").mkdir(parents=True)
    img_a = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    img_b = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(img_a).save(root / "images" / "a.png")
    Image.fromarray(img_b).save(root / "images" / "b.png")
    m1 = np.zeros((40, 60), bool)
    m1[5:20, 10:30] = True
    m2 = np.zeros((40, 60), bool)
    m2[25:38, 40:58] = True
    m2[30, 20] = True
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "b.png", "height": 30, "width": 20}],
        "annotations": [
            {"id": 11, "image_id": 1, "segmentation": rle_encode(m1), "bbox": [10, 5, 20, 15], "category_id": 1},
            {"id": 12, "image_id": 1, "segmentation": rle_encode(m2, compressed=False), "bbox": [0, 0, 1, 1],
             "category_id": 2},
            {"id": 21, "image_id": 2, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "bbox": [2, 2, 10, 10],
             "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "shoes"}],
    }
    names = {"11": "cup", "12": "shoes", "21": "cup"}
    qa = {
        "11": [{"question": "What colour is the cup?", "choices": [["white", 1], ["black", -1], ["not mentioned", 0]],
                "type": "positive"},
               {"question": "Does it have a lid?", "choices": [["yes", -1], ["not mentioned", 1]],
                "type": "negative", "subtype": "negative part"}],
        "12": [{"question": "Are they laced?", "choices": [["laced", 1], ["not mentioned", 0]], "type": "positive"}],
        "21": [{"question": "Is it a mug?", "choices": [["mug", 1], ["not mentioned", 0]], "type": "positive"}],
    }
    for name, doc in (("annotations.json", coco), ("class_names.json", names), ("qa.json", qa)):
        (root / name).write_text(json.dumps(doc))
    return img_a, img_b, m1, m2


def test_reads_regions_images_masks_and_questions(tmp_path):
    img_a, img_b, m1, m2 = _write_bench(tmp_path, np.random.default_rng(0))
    bench = DLCBench(tmp_path)
    assert len(bench) == 3
    samples = list(bench)
    assert [s.ann_id for s in samples] == ["11", "12", "21"]
    assert [s.class_name for s in samples] == ["cup", "shoes", "cup"]
    assert np.array_equal(samples[0].image, img_a) and np.array_equal(samples[2].image, img_b)
    assert np.array_equal(samples[0].mask, m1) and np.array_equal(samples[1].mask, m2)
    assert samples[2].mask[5, 5] and not samples[2].mask[20, 15]
    q = samples[0].questions
    assert [x.kind for x in q] == ["positive", "negative"]
    assert q[0].choices == [("white", 1.0), ("black", -1.0), ("not mentioned", 0.0)]
    assert q[1].subtype == "negative part" and q[0].attribute == ""


def test_frames_group_regions_by_image_and_respect_the_limit(tmp_path):
    _write_bench(tmp_path, np.random.default_rng(1))
    bench = DLCBench(tmp_path)
    frames = list(bench.frames())
    assert [(f, [i.ann_id for i in items]) for f, _, items in frames] == [("a.png", ["11", "12"]), ("b.png", ["21"])]
    assert [[i.ann_id for i in items] for _, _, items in bench.frames(limit=1)] == [["11"]]


def test_annotation_files_may_sit_in_an_annotations_folder(tmp_path):
    _write_bench(tmp_path, np.random.default_rng(2))
    (tmp_path / "annotations").mkdir()
    for name in ("annotations.json", "class_names.json", "qa.json"):
        (tmp_path / name).rename(tmp_path / "annotations" / name)
    assert len(DLCBench(tmp_path)) == 3


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        DLCBench(tmp_path / "nope")
    _write_bench(tmp_path, np.random.default_rng(3))
    (tmp_path / "qa.json").unlink()
    with pytest.raises(DatasetError, match="DLC-Bench file missing: .*qa.json"):
        DLCBench(tmp_path)


def test_malformed_json(tmp_path):
    _write_bench(tmp_path, np.random.default_rng(4))
    (tmp_path / "class_names.json").write_text("{not json")
    with pytest.raises(DatasetError, match="class_names.json is not valid JSON"):
        DLCBench(tmp_path)


def test_inconsistent_files(tmp_path):
    _write_bench(tmp_path, np.random.default_rng(5))
    qa = json.loads((tmp_path / "qa.json").read_text())
    qa["99"] = []
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    names = json.loads((tmp_path / "class_names.json").read_text())
    with pytest.raises(DatasetError, match="class_names.json has no class for annotation 99"):
        DLCBench(tmp_path)
    (tmp_path / "class_names.json").write_text(json.dumps({**names, "99": "cup"}))
    with pytest.raises(DatasetError, match="annotation 99, which annotations.json lacks"):
        DLCBench(tmp_path)
    del qa["99"]
    qa["11"][0]["type"] = "maybe"
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    with pytest.raises(DatasetError, match="type must be positive or negative"):
        DLCBench(tmp_path)
    qa["11"][0] = {"question": "q"}
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    with pytest.raises(DatasetError, match="annotation 11 is malformed"):
        DLCBench(tmp_path)


def test_missing_image_and_bad_mask_are_reported_when_read(tmp_path):
    _write_bench(tmp_path, np.random.default_rng(6))
    bench = DLCBench(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DatasetError, match="image missing: .*b.png"):
        list(bench.frames())
    coco = json.loads((tmp_path / "annotations.json").read_text())
    coco["annotations"][0]["segmentation"] = {"size": [40, 60], "counts": [1, 2]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    bad = DLCBench(tmp_path)
    with pytest.raises(DatasetError, match="annotation 11: RLE counts must be .*summing to 3"):
        bad.mask(bad.items[0])
