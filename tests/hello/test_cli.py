"""Bad input through the CLI: one clear line and exit code 2."""

import numpy as np
from PIL import Image

from vkd.cli import main


def test_ipc_larger_than_class_exits_2(tmp_path, capsys):
    code = main(["distill", "hello", "--set", f"run.output_dir={tmp_path}", "--set", "selection.ipc=500"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vkd: error: selection.ipc=500")


def test_missing_teacher_exits_2(tmp_path, capsys):
    code = main(["distill", "hello", "--set", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "hello-teacher" in err


def test_empty_class_folder_exits_2(tmp_path, capsys):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "0.png")
    code = main(["distill", "hello-teacher", "--set", f"run.output_dir={tmp_path}", "--set", "data.source=imagefolder",
                 "--set", f"data.train_dir={root}", "--set", f"data.val_dir={root}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "contain no images: b" in err


def test_eval_without_run_exits_2(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("task: hello\n")
    code = main(["eval", "hello", "--run", str(tmp_path)])
    assert code == 2 and "projector_adapters" in capsys.readouterr().err
