"""Tests of the offline judge (evaluate.py judge-train / judge): a small classifier trained here on
the built-in data, whose penultimate features give a Frechet distance and whose predictions give
the class accuracy of class-conditional samples. CPU, ~20 s (one judge trained per module)."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluate  # noqa: E402

SIZE, N = 32, 400


@pytest.fixture(scope="module")
def judge():
    return evaluate.train_judge(data.SyntheticShapes(2000, SIZE, seed=0, train=True), epochs=3, show=False)


def uint8(x):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def held_out(seed, n=N):
    ds = data.SyntheticShapes(n, SIZE, seed=seed, train=False)
    return torch.stack([ds[i][0] for i in range(n)]), np.array([ds[i][1] for i in range(n)])


def blur(x, sigma=2.0):
    r = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 4, 4), mode="reflect"), k.transpose(2, 3), groups=3)


def colour_blobs(labels, seed=0):
    """Soft round blobs in each label's hue on a dark background: the right colour, no shape."""
    g = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5) / SIZE
    out = []
    for label in labels:
        _, hue = data.class_shape_and_hue(int(label))
        bg = g.uniform(0.0, 0.45, 3)
        cx, cy, r = *g.uniform(0.3, 0.7, 2), g.uniform(0.2, 0.32)
        alpha = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.6 * r) ** 2))[..., None]
        out.append(bg * (1 - alpha) + data.hue_colour(hue, g) * alpha)
    return torch.from_numpy(np.stack(out).astype(np.float32)).permute(0, 3, 1, 2) * 2 - 1


def save(tmp_path, name, images, labels=None):
    path = str(tmp_path / f"{name}.npz")
    evaluate.save_images_npz(path, images, labels=labels)
    return path


def test_judge_ranks_real_over_blurred_over_noise_and_needs_the_shape(judge, tmp_path):
    ref, _ = held_out(seed=11)
    real, labels = held_out(seed=12)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sets = {"real": save(tmp_path, "real", uint8(real), labels),
            "blurred": save(tmp_path, "blurred", uint8(blur(real)), labels),
            "noise": save(tmp_path, "noise", uint8(noise), labels),
            "blobs": save(tmp_path, "blobs", uint8(colour_blobs(labels)), labels)}
    res = evaluate.judge_metrics(judge, sets, save(tmp_path, "ref", uint8(ref)))
    fd = {k: v["fd"] for k, v in res.items()}
    assert fd["real"] * 5 < fd["blurred"] and fd["blurred"] * 2 < fd["noise"], fd
    assert res["real"]["class_accuracy"] >= 95.0
    # a blob of the class's colour could be either of the two classes of that hue: not accepted
    assert res["blobs"]["class_accuracy"] <= 60.0, res["blobs"]
    assert all(v["num_images"] == N for v in res.values())


def test_judge_file_round_trip_and_clear_errors(judge, tmp_path):
    path = str(tmp_path / "judge.pt")
    evaluate.save_judge(path, judge, data.SyntheticShapes(10, SIZE).classes)
    again = evaluate.load_judge(path)
    x, _ = held_out(seed=3, n=8)
    with torch.no_grad():
        assert torch.equal(again(x), judge(x))
    with pytest.raises(FileNotFoundError, match="judge-train"):
        evaluate.load_judge(str(tmp_path / "missing.pt"))
    torch.save({"model": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a judge file"):
        evaluate.load_judge(str(tmp_path / "other.pt"))


def test_npz_labels_round_trip_and_are_checked(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)
    path = save(tmp_path, "lab", images, np.arange(5) % 3)
    assert evaluate.load_labels_npz(path).tolist() == [0, 1, 2, 0, 1]
    assert evaluate.load_images_npz(path).shape == (5, 8, 8, 3)
    assert evaluate.load_labels_npz(save(tmp_path, "nolab", images)) is None
    with pytest.raises(ValueError, match="labels"):
        save(tmp_path, "bad", images, np.arange(4))


def test_builtin_classes_need_shape_and_colour():
    """Each hue names two classes of different shapes and each shape two of different hues."""
    pairs = [data.class_shape_and_hue(c) for c in range(10)]
    assert len(set(pairs)) == 10
    for i in range(5):
        assert sorted(s for s, h in pairs if h == i) != [] and len({s for s, h in pairs if h == i}) == 2
        assert len({h for s, h in pairs if s == i}) == 2
