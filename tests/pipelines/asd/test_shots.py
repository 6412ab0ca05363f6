from __future__ import annotations

import numpy as np

from pipelines.asd.shots import shot_cuts


def _shots(*lengths_and_colours) -> np.ndarray:
    parts = []
    for length, colour in lengths_and_colours:
        part = np.full((length, 144, 256, 3), colour, np.uint8)
        part[:, 40:100, 60:120] = 255 - np.array(colour, np.uint8)  # something in the shot
        parts.append(part)
    return np.concatenate(parts)


def test_cuts_between_shots_and_none_inside_a_still_shot():
    frames = _shots((30, (200, 40, 40)), (30, (30, 160, 220)), (20, (90, 200, 90)))
    assert shot_cuts(frames) == [30, 60]
    assert shot_cuts(frames[:30]) == []


def test_cuts_are_the_ones_pyscenedetect_finds_in_the_video_file(tmp_path):
    """The demo (TaoRuijie/TalkNet-ASD demoTalkNet.py `scene_detect` ~l.76-93) runs PySceneDetect's
    `ContentDetector()` over the video file; fed decoded frames, merg's detector finds the same cuts."""
    import av
    from scenedetect import ContentDetector, detect

    frames = _shots((30, (200, 40, 40)), (20, (30, 160, 220)), (25, (90, 200, 90)))
    path = tmp_path / "shots.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 256, 144, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    scenes = detect(str(path), ContentDetector())
    expected = [start.frame_num for start, _ in scenes][1:]
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert expected == [30, 50] and shot_cuts(decoded) == expected
