"""veil-demo end to end on the LFW subset (quick settings)."""

from __future__ import annotations

import time

import PIL.Image
import pytest
import torch

from veil_transforms.tools import demo


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_quick_writes_report_and_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    assert demo.main([str(out), "--quick"]) == 0  # on --threads 1
    seconds = time.perf_counter() - t0
    assert torch.get_num_threads() == 2  # restored for the caller
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for row in ("baseline accuracy", "veiled-model accuracy on veiled test images",
                "veiled-model accuracy on original test images", "SSIM(X, X~) mean", "fold-attack SSIM"):
        assert row in report and row in printed
    assert "| measure" in report and "grid.png" in report
    with PIL.Image.open(out / "grid.png") as im:
        assert im.size == (8 * (25 * 4 + 2) + 2, 3 * (25 * 4 + 2) + 2)
    # the shards hold the 140 training images, veiled; the originals never reach them
    assert (out / "shards" / "manifest.json").is_file() and (out / "shards.key").is_file()
    assert seconds < 120, f"quick demo took {seconds:.0f} s"
    # a foreign non-empty folder is refused and left alone
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "precious.txt").write_text("keep me")
    assert demo.main([str(tmp_path / "foreign"), "--quick"]) == 2
    assert (tmp_path / "foreign" / "precious.txt").read_text() == "keep me"


def test_demo_help_lists_modes(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "paper" in out


@pytest.mark.parametrize("flag", ["--steps", "--epochs"])
def test_demo_refuses_zero_steps_and_epochs(flag, capsys):
    """--steps 0 / --epochs 0 silently became the defaults (a helper's review)."""
    with pytest.raises(SystemExit) as e:
        demo.main([flag, "0"])
    assert e.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
