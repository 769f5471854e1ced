from __future__ import annotations

import numpy as np
import pytest

from ml_backend.data.datasets import SourceError, read_source
from tests.base import FIXTURES, SHARED_DATA, png_bytes


def test_class_folders_take_labels_from_folder_names():
    listing = read_source(FIXTURES / "brain_mri" / "pool")
    assert listing.layout == "class-folders"
    assert len(listing.items) == 160
    labels = {item.label for item in listing.items}
    assert labels == {"glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}


def test_flat_layout_ignores_folder_names():
    listing = read_source(FIXTURES / "brain_mri" / "pool", layout="flat")
    assert all(item.label is None for item in listing.items)


def test_csv_source_and_labels_csv(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"s{i}.png").write_bytes(png_bytes(seed=i))
    (tmp_path / "imgs" / "README.txt").write_text("not a scan")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,label\nimgs/s0.png,cardiomegaly\nimgs/s1.png,normal\n")
    listing = read_source(csv_path)
    assert [(i.name, i.label) for i in listing.items] == [
        ("imgs/s0.png", "cardiomegaly"), ("imgs/s1.png", "normal")]

    labels = tmp_path / "by_name.csv"
    labels.write_text("s2.png,effusion\nmissing.png,normal\n")
    folder = read_source(tmp_path / "imgs", labels_csv=labels)
    assert folder.skipped == ["README.txt"]
    assert {i.name: i.label for i in folder.items}["s2.png"] == "effusion"
    assert folder.unmatched_label_rows == ["missing.png"]


def test_csv_cannot_point_outside_its_folder(tmp_path):
    csv_path = tmp_path / "evil.csv"
    csv_path.write_text("../../etc/passwd,normal\n")
    with pytest.raises(SourceError, match="outside"):
        read_source(csv_path)


def test_npz_split_reads_medmnist():
    path = SHARED_DATA / "pneumoniamnist" / "pneumoniamnist.npz"
    listing = read_source(f"{path}#val")
    assert len(listing.items) == 524
    counts = {}
    for item in listing.items:
        counts[item.label] = counts.get(item.label, 0) + 1
    assert counts == {"normal": 135, "pneumonia": 389}
    assert listing.items[0].load().startswith(b"\x89PNG")


def test_npz_errors_are_clear(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(SourceError, match="no split 'test'; it has train"):
        read_source(f"{path}#test")
    with pytest.raises(SourceError, match="name the split"):
        read_source(path)
    with pytest.raises(SourceError, match="no such file or folder"):
        read_source(tmp_path / "nope")


def test_medmnist_names_for_a_file_named_otherwise(tmp_path):
    """A withheld split saved as pneumoniamnist_test.npz, the colour set bloodmnist_pbc.npz,
    or any name with #split?set=NAME get MedMNIST's class names, not class_0, class_1."""
    arrays = dict(test_images=np.zeros((3, 8, 8), np.uint8),
                  test_labels=np.array([[0], [1], [1]]))
    named = tmp_path / "pneumoniamnist_test.npz"
    np.savez(named, **arrays)
    assert [i.label for i in read_source(f"{named}#test").items] == [
        "normal", "pneumonia", "pneumonia"]
    other = tmp_path / "withheld.npz"
    np.savez(other, **arrays)
    assert read_source(f"{other}#test").items[0].label == "class_0"
    assert read_source(f"{other}#test?set=pneumoniamnist").items[1].label == "pneumonia"
    assert read_source(f"{other}#test?set=bloodmnist").items[0].label == "basophil"
    with pytest.raises(SourceError, match="unknown MedMNIST set 'chestxray'"):
        read_source(f"{other}#test?set=chestxray")
    with pytest.raises(SourceError, match="only set=NAME"):
        read_source(f"{other}#test?names=a")
    blood = SHARED_DATA / "bloodmnist_pbc" / "bloodmnist_pbc.npz"
    assert read_source(f"{blood}#val").items[0].label in {
        "basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet"}
