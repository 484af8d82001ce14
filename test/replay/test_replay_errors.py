"""Bad input: each case gets a clear BagError, or is processed as far as it can be with the rest reported."""

from __future__ import annotations

import os

import pytest

from pdlm_ros.data.bags import DETECTIONS_TOPIC, IMAGE_TOPIC, SampleBagSpec, write_sample_bag
from pdlm_ros.errors import BagError
from pdlm_ros.eval.replay import ReplayOptions, replay
from pdlm_ros.eval.report import build_report, summary_rows
from pdlm_ros.ros import convert as C
from pdlm_ros.ros import messages as M
from test.replay.conftest import read_bag, stamp, write_bag

OPTIONS = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC)


def _sample_messages(tmp_path, frames=3, **kw):
    """(topic, msgtype, log time, message) of a small sample bag, to rebuild bags with one thing wrong."""
    sample = write_sample_bag(tmp_path / "sample", SampleBagSpec(frames=frames, with_mask=False, **kw))
    msgs = read_bag(sample.bag)
    types = {IMAGE_TOPIC: M.IMAGE, DETECTIONS_TOPIC: M.DETECTION_ARRAY}
    return sorted(((topic, types[topic], t, m) for topic, items in msgs.items() for t, m in items),
                  key=lambda x: x[2])


def test_missing_topic_lists_the_topics_that_exist(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2))
    opts = ReplayOptions(image_topic="/cam/nope", detections_topic=DETECTIONS_TOPIC)
    with pytest.raises(BagError, match=r"--image-topic '/cam/nope' is not in .*topics in the bag: "
                                       r"/camera/image_raw \(sensor_msgs/msg/Image, 2 msgs\), /camera/instance_mask"):
        replay(sample.bag, tmp_path / "out", tiny_captioner, opts)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_wrong_message_type_is_named(tmp_path, tiny_captioner):
    string = M.typestore().types["std_msgs/msg/String"]
    bag = write_bag(tmp_path / "in", [(IMAGE_TOPIC, "std_msgs/msg/String", 1, string(data="not an image")),
                                      (DETECTIONS_TOPIC, "std_msgs/msg/String", 2, string(data="x"))])
    with pytest.raises(BagError, match=r"'/camera/image_raw' carries std_msgs/msg/String, which replay cannot use; "
                                       r"it needs sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage"):
        replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)


def test_no_region_source_is_refused(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=1))
    with pytest.raises(BagError, match="give a region source"):
        replay(sample.bag, tmp_path / "out", tiny_captioner, ReplayOptions(image_topic=IMAGE_TOPIC))


@pytest.mark.parametrize("ros1", [False, True])
def test_truncated_bag_processes_what_is_readable(tmp_path, tiny_captioner, ros1):
    # 480x360 frames close one of rosbags' 1 MiB chunks every 3 frames, so a cut-off file keeps a whole chunk.
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=6, width=480, height=360, with_mask=False,
                                                            ros1=ros1))
    data_file = sample.bag if ros1 else next(sample.bag.glob("*.mcap"))
    with data_file.open("r+b") as f:
        f.truncate(int(os.path.getsize(data_file) * 0.75))  # a recording cut off by a crash: no index, half a chunk

    result = replay(sample.bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert 1 <= len(result.frames) < 6
    assert result.damage[0].startswith("index unreadable") and "reading stopped" in result.damage[1]
    caps = read_bag(result.out_bag)["/pdlm/captions"]
    assert len(caps) == len(result.frames)
    assert [stamp(m.header) for _, m in caps] == [f.stamp_ns for f in result.frames]
    rows = dict(summary_rows(build_report(result)))
    assert "reading stopped" in rows["damaged bag"]


def test_truncated_beyond_salvage_is_a_clear_error(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2))
    data_file = next(sample.bag.glob("*.mcap"))
    with data_file.open("r+b") as f:
        f.truncate(100)
    with pytest.raises(BagError, match="cannot read bag .*no readable topic"):
        replay(sample.bag, tmp_path / "out", tiny_captioner, OPTIONS)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_corrupt_message_is_skipped_and_reported(tmp_path, tiny_captioner, storage):
    msgs = _sample_messages(tmp_path, frames=3)
    images = [i for i, m in enumerate(msgs) if m[0] == IMAGE_TOPIC]
    topic, msgtype, t, _ = msgs[images[1]]
    msgs[images[1]] = (topic, msgtype, t, b"\x00\x01\x00\x00garbage")  # CDR header, then nonsense
    bag = write_bag(tmp_path / "in", msgs, storage=storage)

    result = replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert len(result.frames) == 2
    assert [(s.topic, s.log_time_ns) for s in result.skipped] == [(IMAGE_TOPIC, t)]
    assert "cannot decode a sensor_msgs/msg/Image message" in result.skipped[0].reason
    assert result.sync.expired_regions == 1  # its detections lost their partner, and are counted
    rows = dict(summary_rows(build_report(result)))
    assert rows["skipped messages"].startswith("1") and rows["unpaired"] == "0 images, 1 region messages"


def test_bag_without_detections(tmp_path, tiny_captioner):
    images = [m for m in _sample_messages(tmp_path, frames=2) if m[0] == IMAGE_TOPIC]
    bag = write_bag(tmp_path / "empty", images, extra_topics=[(DETECTIONS_TOPIC, M.DETECTION_ARRAY)])
    with pytest.raises(BagError, match=r"--detections-topic '/detections' has no messages in .*nothing to caption"):
        replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)
    bag = write_bag(tmp_path / "none", images)
    with pytest.raises(BagError, match=r"'/detections' is not in .*topics in the bag: /camera/image_raw"):
        replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)


def test_stamps_that_never_pair(tmp_path, tiny_captioner):
    msgs = []
    for topic, msgtype, t, m in _sample_messages(tmp_path, frames=2):
        if topic == DETECTIONS_TOPIC:  # a detector that stamps its own clock, 1 ms after the image
            m = C.detection_array_msg(C.header_msg(stamp(m.header) + 1_000_000, m.header.frame_id),
                                      C.regions_from_detections(m, 160, 120))
        msgs.append((topic, msgtype, t, m))
    bag = write_bag(tmp_path / "in", msgs)
    with pytest.raises(BagError, match=r"2 images and 2 region messages, none with matching header stamps "
                                       r"\(tolerance 0.0 s.*pass --slop SECONDS"):
        replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert not (tmp_path / "out" / "bag").exists()
    # The fix the message names works: a tolerance below half the frame period pairs them.
    result = replay(bag, tmp_path / "out", tiny_captioner,
                    ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, slop_s=0.002))
    assert len(result.frames) == 2


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    replay(sample.bag, out, tiny_captioner, OPTIONS)  # an existing directory without replay output is fine
    with pytest.raises(BagError, match=r"output exists already: .*out/bag \(pass --overwrite to replace it\)"):
        replay(sample.bag, out, tiny_captioner, OPTIONS)
    result = replay(sample.bag, out, tiny_captioner, OPTIONS, overwrite=True)
    assert len(read_bag(result.out_bag)["/pdlm/captions"]) == 1
    assert (out / "notes.txt").read_text() == "mine"  # overwrite touches only what replay writes
    with pytest.raises(BagError, match="lies inside the output"):
        replay(result.out_bag, out, tiny_captioner, OPTIONS, overwrite=True)


def test_unusable_image_refuses_the_frame_but_keeps_its_regions(tmp_path, tiny_captioner):
    msgs = _sample_messages(tmp_path, frames=2)
    topic, msgtype, t, img = next(m for m in msgs if m[0] == IMAGE_TOPIC)
    bad = M.typestore().types[M.IMAGE](header=img.header, height=img.height, width=img.width, encoding="yuv422",
                                      is_bigendian=0, step=img.step, data=img.data)
    msgs[msgs.index((topic, msgtype, t, img))] = (topic, msgtype, t, bad)
    bag = write_bag(tmp_path / "in", msgs)

    result = replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert len(result.frames) == 2
    refused, ok = result.frames
    assert "unsupported image encoding 'yuv422'" in refused.error and refused.nfe == 0
    caps = read_bag(result.out_bag)["/pdlm/captions"]
    first = caps[0][1]
    assert [r.id for r in first.regions] == ["1", "2", "3"]
    assert all(r.error.startswith("frame refused: unsupported image encoding") and not r.caption
               for r in first.regions)
    assert all(r.caption and not r.error for r in caps[1][1].regions)
    assert build_report(result).summary.refused_frames == 1


def test_sqlite3_bag_damaged_in_the_middle_processes_what_comes_before(tmp_path, tiny_captioner):
    """SQLite opens the file but fails on a damaged page: the pairs before it are captioned, the rest reported."""
    import shutil

    from pdlm_ros.data.bags import open_bag

    sample = write_sample_bag(tmp_path / "clean", SampleBagSpec(frames=6, storage="sqlite3", with_mask=False))
    db = next(sample.bag.glob("*.db3"))
    pages = os.path.getsize(db) // 4096
    for page in range(pages // 3, pages):  # find a b-tree page (not blob data) whose damage stops the reading
        bag = tmp_path / f"damaged_{page}"
        shutil.copytree(sample.bag, bag)
        with (bag / db.name).open("r+b") as f:
            f.seek(page * 4096)
            f.write(b"\xff" * 64)
        with open_bag(bag) as b:
            n = sum(1 for _ in b.messages({IMAGE_TOPIC, DETECTIONS_TOPIC}))
            if 2 <= n < 12 and b.damage:
                break
    else:
        pytest.fail("no damaged page stopped the reading part-way")
    result = replay(bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert 1 <= len(result.frames) < 6
    assert "reading stopped after" in result.damage[0] and "malformed" in result.damage[0]
    assert len(read_bag(result.out_bag)["/pdlm/captions"]) == len(result.frames)
