"""data.name: fashion_mnist reads Fashion-MNIST's IDX files (gzipped or not, flat or torchvision's layout) from
data.root; tiny IDX files made here, never the real package. Missing files: one line naming both ways to get them,
exit 2, nothing written."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmdistill.cli import main
from cmdistill.data import DataError, fit_resolution, make_dataset, num_labels, read_idx

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">i", d) for d in a.shape) + a.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n: int = 12, gz: bool = True, split: str = "train", seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    for stem, a in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(a)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files_scaled_and_labelled(tmp_path, gz):
    images, labels = write_fashion(tmp_path, gz=gz)
    ds = make_dataset("fashion_mnist", str(tmp_path), 28, 1)
    assert len(ds) == 12 and num_labels(ds) == 10
    x, y = ds[5]
    assert x.shape == (1, 28, 28) and int(y) == 5
    torch.testing.assert_close(x[0], torch.from_numpy(images[5]).float() / 127.5 - 1)


def test_torchvision_layout_and_padding_to_32(tmp_path):
    images, _ = write_fashion(tmp_path / "FashionMNIST" / "raw")
    ds = make_dataset("fashion_mnist", str(tmp_path), 32, 1)
    x = ds[0][0]
    assert x.shape == (1, 32, 32)
    assert (x[:, :2] == -1).all() and (x[:, -2:] == -1).all() and (x[..., :2] == -1).all()
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(images[0]).float() / 127.5 - 1)
    assert fit_resolution(torch.zeros(1, 1, 28, 28), 14).shape == (1, 1, 14, 14)


def test_truncated_idx_is_one_line(tmp_path):
    (tmp_path / "x.idx").write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "x.idx")


def test_missing_files_one_line_exit_2_nothing_written(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train-teacher", str(ROOT / "recipes" / "fashion-vae.yaml"), "--set",
                                    f"data.root={tmp_path / 'none'}", "--output-dir", str(out)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0] and "torchvision" in err[0]
    assert not out.exists()
