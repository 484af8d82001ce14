"""Replay of small generated bags with the real tiny model; the output bag is read back by rosbags itself."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from pdlm_ros.data.bags import (
    DETECTIONS_TOPIC,
    IMAGE_TOPIC,
    MASK_TOPIC,
    SampleBagSpec,
    load_annotations,
    write_sample_bag,
)
from pdlm_ros.data.scenes import ATTRIBUTES, caption_for
from pdlm_ros.eval.replay import ReplayOptions, replay
from pdlm_ros.eval.report import build_report, stability, write_reports
from pdlm_ros.ros import messages as M
from test.replay.conftest import read_bag, stamp

OPTIONS = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC)


def _captions(bag_msgs):
    return [[(r.id, r.caption) for r in m.regions] for _, m in bag_msgs["/pdlm/captions"]]


def _check_output(out_bag, n_pairs, image_topic=IMAGE_TOPIC, region_topic=DETECTIONS_TOPIC, ids_from="detections"):
    """One caption array per pair, stamps equal to the image's, region ids equal to the source's."""
    msgs = read_bag(out_bag)
    caps, images, sources = msgs["/pdlm/captions"], msgs[image_topic], msgs[region_topic]
    assert len(caps) == len(images) == len(sources) == n_pairs
    by_stamp = {stamp(m.header): m for _, m in sources}
    for (_, cap), (_, img) in zip(caps, images):
        assert cap.__msgtype__ == M.CAPTION_ARRAY
        assert stamp(cap.header) == stamp(img.header)
        assert cap.header.frame_id == img.header.frame_id
        src = by_stamp[stamp(cap.header)]
        want = [d.id for d in src.detections] if ids_from == "detections" else None
        if want is not None:
            assert [r.id for r in cap.regions] == want
        assert all(r.caption and not r.error for r in cap.regions)
        if all(r.cached for r in cap.regions):  # the node's cache rule: no decoder pass for this frame
            assert cap.nfe == 0
        else:
            assert cap.nfe > 0 and cap.latency_ms > 0
    assert not any(r.cached for r in caps[0][1].regions)
    return msgs


def test_sqlite3_and_mcap_bags_replay_to_the_same_captioned_bag(tmp_path, tiny_captioner):
    outputs = {}
    for storage in ("sqlite3", "mcap"):
        sample = write_sample_bag(tmp_path / f"in_{storage}", SampleBagSpec(frames=3, storage=storage))
        result = replay(sample.bag, tmp_path / f"out_{storage}", tiny_captioner, OPTIONS)
        assert result.storage == storage
        assert len(result.frames) == 3 and result.sync.expired_images == result.sync.expired_regions == 0
        assert (result.out_bag / "metadata.yaml").is_file() and list(result.out_bag.glob("*.mcap"))
        meta = yaml.safe_load((result.out_bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        # version 8: QoS profiles as a YAML string, which Humble's rosbag2 parses (version 9's list it does not)
        assert meta["version"] == 8
        topics = meta["topics_with_message_count"]
        assert all(isinstance(t["topic_metadata"]["offered_qos_profiles"], str) for t in topics)
        outputs[storage] = _check_output(result.out_bag, 3)
        assert MASK_TOPIC not in outputs[storage]  # only the topics replay read are copied
    # The same scenes in either storage give identical captions: replay is deterministic.
    assert _captions(outputs["sqlite3"]) == _captions(outputs["mcap"])


def test_output_bag_read_back_by_rosbags_with_types_and_counts(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2))
    opts = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, annotated=True)
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, opts)
    from rosbags.highlevel import AnyReader

    with AnyReader([result.out_bag]) as reader:  # rosbags alone, with the definitions stored in the bag
        topics = {name: (info.msgtype, info.msgcount) for name, info in reader.topics.items()}
        assert topics == {IMAGE_TOPIC: (M.IMAGE, 2), DETECTIONS_TOPIC: (M.DETECTION_ARRAY, 2),
                          "/pdlm/captions": (M.CAPTION_ARRAY, 2), "/pdlm/annotated_image": (M.IMAGE, 2),
                          "/pdlm/annotations": (M.IMAGE_ANNOTATIONS, 2)}
        for conn, _, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == "/pdlm/annotated_image":
                assert (msg.width, msg.height, msg.encoding) == (160, 120, "rgb8")
    assert result.written == {k: v[1] for k, v in topics.items()}


def test_ros1_bag_replays_into_a_ros2_bag(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2, ros1=True))
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, OPTIONS)
    assert result.storage == "ros1"
    _check_output(result.out_bag, 2)


def test_instance_mask_regions_carry_the_track_ids(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2))
    opts = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, mask_topic=MASK_TOPIC)
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, opts)
    msgs = _check_output(result.out_bag, 2, region_topic=MASK_TOPIC, ids_from="mask")
    assert len(msgs[DETECTIONS_TOPIC]) == 2  # copied along
    ann = load_annotations(sample.annotations)
    for (_, cap), truth in zip(msgs["/pdlm/captions"], ann.frames):
        assert sorted(r.id for r in cap.regions) == sorted(o.track_id for o in truth.objects)


def test_reports_json_html_plot_scores_and_stability(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=3))
    # every region described, so each frame has a model latency (cached frames have none)
    no_cache = ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, cache=False)
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, no_cache)
    ann = load_annotations(sample.annotations)
    report = build_report(result, ann)
    paths = write_reports(report, tmp_path / "out")

    doc = json.loads(paths.json.read_text())
    s = doc["summary"]
    assert s["frames"] == 3 and s["regions"] == 9 and s["refused_regions"] == 0
    assert 0 < s["latency_p50_ms"] <= s["latency_p95_ms"]
    L = tiny_captioner.config.decoding.caption_len
    assert s["nfe_per_frame"] == L and s["tpf"] == pytest.approx(3.0)  # 3 spans of L tokens in L steps
    assert s["regions_per_s"] > 0
    assert doc["scores"]["regions_scored"] == 9 and doc["scores"]["judge"] == "rule"
    assert doc["scores"]["counts"]["positive"] == 9 * 4  # shape, color, pattern, size per region
    assert [t["track_id"] for t in doc["stability"]["tracks"]] == ["1", "2", "3"]
    assert len(doc["frames"]) == 3 and doc["frames"][0]["regions"][0]["id"] == "1"

    page = paths.html.read_text()
    assert page.count("data:image/png;base64,") == 1 + 3  # the plot and 3 annotated frames, embedded
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # self-contained: no external files
    assert "a large dotted orange star" in page  # the annotated caption in the stability table
    assert paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stability_counts_changes_and_truth(tmp_path, tiny_captioner):
    """Stability computed from known captions: a track that changes once, a stable one."""
    from dataclasses import replace

    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=3, objects=2))
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, OPTIONS)
    ann = load_annotations(sample.annotations)
    truth = {k: t.caption for k, t in ann.tracks.items()}
    t1 = ann.tracks["1"]
    other = {a: next(v for v in values if v != getattr(t1, a)) for a, values in ATTRIBUTES.items()}
    wrong = caption_for(other["size"], other["pattern"], other["color"], other["shape"])  # every attribute wrong
    scripted = {"1": [truth["1"], truth["1"], wrong], "2": [truth["2"]] * 3}
    frames = [replace(f, regions=[replace(c, caption=scripted[c.region_id][f.index]) for c in f.regions])
              for f in result.frames]
    tracks = {t.track_id: t for t in stability(replace(result, frames=frames), ann)}
    assert (tracks["1"].distinct, tracks["1"].changes, tracks["1"].mode_share) == (2, 1, pytest.approx(2 / 3))
    assert tracks["1"].truth_share == pytest.approx(2 / 3)
    assert (tracks["2"].distinct, tracks["2"].changes, tracks["2"].mode_share, tracks["2"].truth_share) == (1, 0, 1, 1)
    # True captions answer all 4 positive questions right; the wrong one answers none.
    report = build_report(replace(result, frames=frames), ann)
    assert report.scores is not None and report.scores.scores.counts.positive_right == 6 * 4 - 4


def test_compressed_images_replay_like_raw_ones(tmp_path, tiny_captioner):
    from pdlm_ros.ros import convert as C
    from test.replay.conftest import write_bag

    sample = write_sample_bag(tmp_path / "raw", SampleBagSpec(frames=2, with_mask=False))
    msgs = []
    for topic, items in read_bag(sample.bag).items():
        for t, m in items:
            if topic == IMAGE_TOPIC:  # PNG keeps the pixels exact, so captions must match the raw replay
                m = C.compressed_to_msg(C.image_from_msg(m), m.header, fmt="png")
                msgs.append(("/camera/image_raw/compressed", M.COMPRESSED_IMAGE, t, m))
            else:
                msgs.append((topic, M.DETECTION_ARRAY, t, m))
    bag = write_bag(tmp_path / "png", sorted(msgs, key=lambda x: x[2]))
    opts = ReplayOptions(image_topic="/camera/image_raw/compressed", detections_topic=DETECTIONS_TOPIC)
    compressed = replay(bag, tmp_path / "out_png", tiny_captioner, opts)
    raw = replay(sample.bag, tmp_path / "out_raw", tiny_captioner, OPTIONS)
    _check_output(compressed.out_bag, 2, image_topic="/camera/image_raw/compressed")
    assert [[c.caption for c in f.regions] for f in compressed.frames] == \
        [[c.caption for c in f.regions] for f in raw.frames]


def test_replay_reuses_captions_by_the_node_cache_rules(tmp_path, tiny_captioner):
    """Replay skipped the caption cache: `cached` was always false in replayed bags, unlike the live node."""
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=4))
    on = replay(sample.bag, tmp_path / "on", tiny_captioner, OPTIONS)
    off = replay(sample.bag, tmp_path / "off", tiny_captioner,
                 ReplayOptions(image_topic=IMAGE_TOPIC, detections_topic=DETECTIONS_TOPIC, cache=False))
    assert not any(r.cached for f in off.frames for r in f.regions)
    last_fresh: dict[str, tuple[int, str]] = {}
    hits = 0
    for f in on.frames:
        for k, r in enumerate(f.regions):
            if r.cached:  # the caption of the frame the track was last described at, aged in frame stamps
                hits += 1
                described_at, caption = last_fresh[r.region_id]
                assert r.caption == caption and f.ages[k] == pytest.approx((f.stamp_ns - described_at) / 1e9)
            else:
                last_fresh[r.region_id] = (f.stamp_ns, r.caption)
    assert hits, "tracked regions of consecutive frames should reuse their captions"
    assert sum(f.nfe for f in on.frames) < sum(f.nfe for f in off.frames)
    caps = read_bag(on.out_bag)["/pdlm/captions"]
    assert any(r.cached and r.age > 0 for _, m in caps for r in m.regions)  # written into the bag as the node does
    # a region computed in both runs gets the same caption (temperature 0, and region isolation: which other regions
    # of the frame came from the cache does not matter)
    fresh = [(a.caption, b.caption) for f_on, f_off in zip(on.frames, off.frames)
             for a, b in zip(f_on.regions, f_off.regions) if not a.cached]
    assert fresh and all(a == b for a, b in fresh)


def test_replayed_bag_carries_foxglove_annotations(tmp_path, tiny_captioner):
    sample = write_sample_bag(tmp_path / "in", SampleBagSpec(frames=2))
    result = replay(sample.bag, tmp_path / "out", tiny_captioner, OPTIONS)
    msgs = read_bag(result.out_bag)
    for (_, ann), (_, cap) in zip(msgs["/pdlm/annotations"], msgs["/pdlm/captions"], strict=True):
        assert len(ann.points) == len(ann.texts) == len(cap.regions)
        for outline, text, r in zip(ann.points, ann.texts, cap.regions):
            assert (outline.timestamp.sec, outline.timestamp.nanosec) == (cap.header.stamp.sec,
                                                                           cap.header.stamp.nanosec)
            assert outline.type == 2 and len(outline.points) == 4  # LINE_LOOP around the box
            assert outline.points[0].x == pytest.approx(r.bbox.center.position.x - r.bbox.size_x / 2)
            assert text.text.startswith(f"{r.id}: ") and r.caption in text.text
