"""Point clouds from files: every format reads the same points, resampling and normalisation, refusals."""

import pickle

import numpy as np
import pytest
import torch

from surgery.errors import SurgeryError
from surgery_plugins.imagebind.config import InputError
from surgery_plugins.imagebind.point_loading import (load_and_transform_point_cloud_data, normalize_points,
                                                     read_point_cloud, resample_points)


@pytest.fixture
def points():
    # exactly representable in float32 and in short decimal text, so every format must give them back bit for bit
    g = torch.Generator().manual_seed(0)
    return (torch.randint(-4000, 4000, (600, 3), generator=g) / 64).float()


def write_ascii_ply(path, pts, extra_element=False):
    lines = ["ply", "format ascii 1.0", "comment made by a test"]
    if extra_element:  # an element before the vertices: its lines come first
        lines += ["element camera 2", "property float fov"]
    lines += [f"element vertex {len(pts)}", "property float x", "property float y", "property float z",
              "property uchar red", "element face 1", "property list uchar int vertex_indices", "end_header"]
    if extra_element:
        lines += ["60", "45"]
    lines += [f"{x} {y} {z} 255" for x, y, z in pts.tolist()] + ["3 0 1 2"]
    path.write_text("\n".join(lines) + "\n")


def write_binary_ply(path, pts, order="<"):
    row = np.dtype([("nx", order + "f4"), ("x", order + "f8"), ("y", order + "f8"), ("z", order + "f8"),
                    ("alpha", order + "u2")])
    table = np.zeros(len(pts), dtype=row)
    table["x"], table["y"], table["z"] = pts.double().numpy().T
    fmt = "binary_little_endian" if order == "<" else "binary_big_endian"
    header = (f"ply\nformat {fmt} 1.0\nelement vertex {len(pts)}\nproperty float nx\nproperty double x\n"
              f"property double y\nproperty double z\nproperty ushort alpha\nend_header\n")
    path.write_bytes(header.encode() + table.tobytes())


def write_all(tmp_path, pts):
    np.save(tmp_path / "c.npy", pts.numpy())
    torch.save(pts, tmp_path / "c.pt")
    (tmp_path / "c.xyz").write_text("# x y z r g b\n" + "".join(f"{x} {y} {z} 1 2 3\n" for x, y, z in pts.tolist()))
    (tmp_path / "c.obj").write_text("# obj\no thing\n" + "".join(f"v {x} {y} {z}\n" for x, y, z in pts.tolist())
                                    + "vn 0 0 1\nvt 0.5 0.5\nf 1 2 3\n")
    write_ascii_ply(tmp_path / "c.ply", pts)
    write_ascii_ply(tmp_path / "e.ply", pts, extra_element=True)
    write_binary_ply(tmp_path / "le.ply", pts, "<")
    write_binary_ply(tmp_path / "be.ply", pts, ">")
    return ["c.npy", "c.pt", "c.xyz", "c.obj", "c.ply", "e.ply", "le.ply", "be.ply"]


def test_every_format_reads_the_same_points(tmp_path, points):
    for name in write_all(tmp_path, points):
        got = read_point_cloud(tmp_path / name)
        assert got.dtype == torch.float32 and torch.equal(got, points), name


def test_resampled_to_a_fixed_size_and_normalised(tmp_path, points):
    write_all(tmp_path, points)
    clouds = load_and_transform_point_cloud_data([tmp_path / "c.npy", tmp_path / "c.obj"], num_points=256,
                                                 min_points=8, seed=3)
    assert clouds.shape == (2, 256, 3)
    assert torch.equal(clouds[0], clouds[1])  # the same points drawn from the same seed, whatever the format
    # independently: a seeded subset without repetition, in file order, then pc_normalize
    index = torch.randperm(600, generator=torch.Generator().manual_seed(3))[:256].sort().values
    sub = points[index]
    centred = sub - sub.mean(0)
    torch.testing.assert_close(clouds[0], centred / centred.norm(dim=1).max())
    torch.testing.assert_close(clouds.norm(dim=-1).amax(dim=1), torch.ones(2))
    again = load_and_transform_point_cloud_data([tmp_path / "c.npy"], num_points=256, min_points=8, seed=3)
    assert torch.equal(again[0], clouds[0])


def test_fewer_points_are_kept_and_repeated(points):
    gen = torch.Generator().manual_seed(0)
    grown = resample_points(points[:10], 25, gen)
    assert torch.equal(grown[:10], points[:10])
    assert all(any(torch.equal(row, p) for p in points[:10]) for row in grown[10:])
    assert resample_points(points, 600, gen) is points


def test_unchanged_when_asked(tmp_path, points):
    write_all(tmp_path, points)
    raw = load_and_transform_point_cloud_data(tmp_path / "c.pt", num_points=None, normalize=False, min_points=600)
    assert torch.equal(raw[0], points)
    assert normalize_points(points).norm(dim=1).max() == pytest.approx(1.0)


def refused(call, message):
    with pytest.raises(InputError, match=message) as info:
        call()
    assert isinstance(info.value, SurgeryError)
    assert "\n" not in str(info.value)


class Evil:
    def __reduce__(self):
        return (print, ("ran",))


def test_bad_files_are_named_with_what_was_wrong(tmp_path, points, capsys):
    write_all(tmp_path, points)
    np.save(tmp_path / "wide.npy", np.zeros((10, 6)))
    torch.save(torch.zeros(3, 10), tmp_path / "wide.pt")
    torch.save({"points": points}, tmp_path / "dict.pt")
    (tmp_path / "bad.xyz").write_text("1 2 3\n4 five 6\n")
    (tmp_path / "short.xyz").write_text("1 2\n")
    (tmp_path / "nan.xyz").write_text("1 2 3\nnan 1 1\n")
    (tmp_path / "none.obj").write_text("# no vertices\nf 1 2 3\n")
    (tmp_path / "c.las").write_bytes(b"LASF")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f, protocol=2)
    data = (tmp_path / "le.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-100])
    (tmp_path / "fmt.ply").write_text("ply\nformat ebcdic 1.0\nelement vertex 1\nproperty float x\n"
                                      "property float y\nproperty float z\nend_header\n1 2 3\n")
    (tmp_path / "noxyz.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float u\nend_header\n1\n")
    (tmp_path / "few.ply").write_text("ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
                                      "property float z\nend_header\n1 2 3\n")
    cases = {
        "wide.npy": r"\(N, 3\).*\(10, 6\)", "wide.pt": r"\(N, 3\).*\(3, 10\)", "dict.pt": "holds a dict",
        "bad.xyz": "unreadable as .xyz", "short.xyz": "unreadable as .xyz", "nan.xyz": "finite",
        "none.obj": "no points", "c.las": "unknown file type '.las'", "objects.npy": "unreadable as .npy",
        "evil.pt": "weights_only=True was refused", "cut.ply": "file is shorter", "fmt.ply": "unknown PLY format",
        "noxyz.ply": "no x, y, z", "few.ply": "announces 5 vertices", "missing.npy": "no such file",
    }
    for name, message in cases.items():
        refused(lambda: read_point_cloud(tmp_path / name), f"{name}.*{message}")
    assert "ran" not in capsys.readouterr().out  # the pickle's code never ran


def test_too_few_points_and_bad_arguments(tmp_path, points):
    write_all(tmp_path, points)
    np.save(tmp_path / "small.npy", points[:300].numpy())
    refused(lambda: load_and_transform_point_cloud_data(tmp_path / "small.npy"),
            "300 points, fewer than min_points=512")
    refused(lambda: load_and_transform_point_cloud_data(tmp_path / "c.npy", num_points=100, min_points=200),
            "below min_points")
    refused(lambda: load_and_transform_point_cloud_data([], min_points=1), "no files")
    both = [tmp_path / "c.npy", tmp_path / "small.npy"]
    refused(lambda: load_and_transform_point_cloud_data(both, num_points=None, min_points=8),
            r"different numbers.*\[300, 600\]")
    np.save(tmp_path / "same.npy", np.ones((20, 3)))
    refused(lambda: load_and_transform_point_cloud_data(tmp_path / "same.npy", min_points=8),
            "same.npy.*same place")
