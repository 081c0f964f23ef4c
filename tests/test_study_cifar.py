"""study_cifar.py end to end in --quick mode on a tiny ImageFolder written here (3 classes of
32 px PNGs): the judge, the reference set, the self-supervised teacher, one generation cell
aligned to that teacher (Table 3) and one reconstruction cell with an ablation flag (Table 5);
then the tables and plots, the skip of finished cells on a second call, the re-run of one
unfinished stage only, and the refusal of a folder started with another configuration. ~30 s."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import study_cifar
import tokenizer
import training
from conftest import run_script, user_error

CELLS = ("t3-softvq-8x32", "t5-g1")


def write_folder(root, per_class):
    g = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(3):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            for i in range(n):
                img = g.integers(0, 60, (32, 32, 3)).astype(np.uint8)
                img[8:24, 8:24, c] = 200                     # the class: which channel is bright
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    write_folder(tmp / "data", {"train": 12, "test": 6})
    argv = ["--data", tmp / "data", "--work", tmp / "work", "--out", tmp / "out", "--quick"]
    run_script("study_cifar.py", *argv, "--cells", *CELLS)
    return tmp, argv


def test_cells_run_end_to_end_and_the_tables_show_them(study):
    tmp, _ = study
    work, out = tmp / "work", tmp / "out"
    res = {c: json.load(open(work / c / "results.json")) for c in CELLS}
    for c, r in res.items():
        assert 0 < r["recon"]["psnr"] < 60 and 0 <= r["recon"]["codebook_usage"] <= 1, r["recon"]
        assert r["recon"]["num_images"] == 6 and r["probe"]["val_images"] == 18 and r["rfd"] >= 0
    assert res["t3-softvq-8x32"]["gfd"] >= 0 and 0 <= res["t3-softvq-8x32"]["sample_class_accuracy"] <= 100
    assert "gfd" not in res["t5-g1"]                                       # reconstruction only
    assert not (work / "t3-softvq-8x32" / "latents").exists()             # the cache is deleted when done
    assert (work / "t3-softvq-8x32" / "samples" / "samples.npz").is_file()

    # the cell's own settings reached the tokenizer: L x D, the ablation flag, the alignment
    gen_tok = training.load_checkpoint(str(work / "t3-softvq-8x32" / "tok" / "ckpt.pt"))
    assert (gen_tok["config"]["num_tokens"], gen_tok["config"]["token_dim"]) == (8, 32)
    assert gen_tok["projector"] is not None and gen_tok["train_config"]["teacher"] == "vit-file"
    assert training.load_checkpoint(str(work / "t5-g1" / "tok" / "ckpt.pt"))["config"]["num_codebooks"] == 1

    # the teacher: a project teacher file that train_tok loads, and its probe against random init
    vit, mean, std = tokenizer.load_teacher_checkpoint(str(work / "teacher" / "teacher.pt"), 32, 4)
    assert vit.width == 64 and len(mean) == 3
    probe = json.load(open(work / "teacher" / "probe.json"))
    assert set(probe) >= {"teacher_top1", "random_init_top1"}

    # tables: our numbers where a cell ran, "not yet measured" elsewhere, the paper's beside them
    t3 = json.load(open(out / "table3.json"))
    row = next(r for r in t3 if r["cell"] == "t3-softvq-8x32")
    assert row["psnr"] == res["t3-softvq-8x32"]["recon"]["psnr"] and row["paper_rfid"] == 1.24
    assert next(r for r in t3 if r["cell"] == "t3-vq-8x32")["psnr"] is None
    md = open(out / "table3.md").read()
    assert f"| softvq | 8 x 32 | {res['t3-softvq-8x32']['recon']['psnr']:.2f} |" in md
    assert "| vq | 8 x 32 | not yet measured |" in md and "| 10.97 |" in md
    t5 = open(out / "table5.md").read()
    assert f"| variant | SoftVQ (G = 1) | {res['t5-g1']['recon']['psnr']:.2f} |" in t5 and "| 1.33 |" in t5
    t4 = json.load(open(out / "table4.json"))
    assert t4["teacher_probe"]["teacher_top1"] == probe["teacher_top1"]
    for png in ("psnr_vs_L", "fd_vs_L", "probe", "recon_softvq", "samples_softvq"):
        assert (out / f"{png}.png").stat().st_size > 1000, png


def test_second_call_skips_done_cells_and_resumes_an_unfinished_stage(study, capsys):
    tmp, argv = study
    work = tmp / "work"
    stamps = {c: os.path.getmtime(work / c / "results.json") for c in CELLS}
    capsys.readouterr()
    run_script("study_cifar.py", *argv, "--cells", *CELLS)
    log = capsys.readouterr().out
    assert all(f"[cell {c}] done: skipped" in log for c in CELLS)
    assert "$ python" not in log                                          # no stage ran
    assert stamps == {c: os.path.getmtime(work / c / "results.json") for c in CELLS}

    # a cell killed after its probe: only the judge stage runs again
    os.remove(work / "t5-g1" / "results.json")
    os.remove(tmp / "out" / "cells" / "t5-g1.json")                     # published with results.json
    stages = json.load(open(work / "t5-g1" / "stages.json"))
    del stages["judge"]
    json.dump(stages, open(work / "t5-g1" / "stages.json", "w"))
    run_script("study_cifar.py", *argv, "--cells", "t5-g1")
    log = capsys.readouterr().out
    assert [line.split()[2] for line in log.splitlines() if line.startswith("$ python")] == ["evaluate.py"]
    assert "$ python evaluate.py judge " in log and (work / "t5-g1" / "results.json").is_file()


def test_another_configuration_and_unknown_cells_are_refused(study, capsys):
    tmp, argv = study
    capsys.readouterr()
    run_script("study_cifar.py", *argv, "--list", "--cells", "t3-*-8x32*", "t5-g1")
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert sorted(row[0] for row in listed) == sorted(
        [f"t3-{q}-8x32{s}" for q in ("softvq", "vq", "ae", "kl") for s in ("", "-seed1")] + ["t5-g1"])
    assert {row[0]: row[-1] for row in listed}["t3-softvq-8x32"] == "done"
    assert {row[0]: " ".join(row[-2:]) for row in listed}["t3-vq-8x32"] == "to do"
    os.remove(tmp / "work" / "t5-g1" / "results.json")
    full = [a for a in argv if a != "--quick"]                            # the full budget, same folders
    run_script("study_cifar.py", *full, "--list", "--cells", "t3-softvq-8x32")
    assert capsys.readouterr().out.split()[-4:] == ["done", "with", "another", "configuration"]
    assert "delete that folder" in user_error("study_cifar.py", *full, "--cells", "t5-g1")
    assert "matches no cell" in user_error("study_cifar.py", *argv, "--cells", "t9-*")


def test_a_new_work_folder_starts_from_what_out_keeps(study, capsys):
    """<work> is gone (another machine, a fresh clone): the published results keep the cells done,
    the judge and the teacher are restored instead of retrained, and a cell scored by another
    judge does not count."""
    tmp, argv = study
    out, work2 = tmp / "out", tmp / "work2"
    argv2 = [str(work2) if a == tmp / "work" else a for a in argv]
    capsys.readouterr()
    run_script("study_cifar.py", *argv2, "--cells", "t3-softvq-8x32")
    log = capsys.readouterr().out
    assert "[cell t3-softvq-8x32] done: skipped" in log and "$ python" not in log
    row = next(r for r in json.load(open(out / "table3.json")) if r["cell"] == "t3-softvq-8x32")
    assert row["psnr"] == json.load(open(out / "cells" / "t3-softvq-8x32.json"))["recon"]["psnr"]

    run_script("study_cifar.py", *argv2, "--cells", "t5-g2")              # a new cell in the new folder
    log = capsys.readouterr().out
    assert "judge: restored" in log and "teacher: restored" in log
    assert "judge-train" not in log and "teacher step" not in log          # neither retrained
    judge_sha = study_cifar.sha256(out / "study" / "judge" / "judge.pt")
    assert study_cifar.sha256(work2 / "judge" / "judge.pt") == judge_sha
    assert json.load(open(out / "cells" / "t5-g2.json"))["judge_sha256"] == judge_sha

    record = json.load(open(out / "cells" / "t5-g2.json"))
    record["judge_sha256"] = "0" * 64                                     # scored by another judge
    json.dump(record, open(out / "cells" / "t5-g2.json", "w"))
    os.remove(work2 / "t5-g2" / "results.json")
    run_script("study_cifar.py", *argv2, "--list", "--cells", "t5-g2")
    assert capsys.readouterr().out.split()[-4:] == ["done", "with", "another", "configuration"]

    # a work folder with another judge never replaces the published one
    with open(work2 / "judge" / "judge.pt", "ab") as f:
        f.write(b"another judge")
    run_script("study_cifar.py", *argv2, "--tables-only")
    assert "not published" in capsys.readouterr().out
    assert study_cifar.sha256(out / "study" / "judge" / "judge.pt") == judge_sha
