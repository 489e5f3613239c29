"""The Ray executor: cells as tasks on a local two-worker Ray, the same numbers and files as local."""

import pytest

import surgery

ray = pytest.importorskip("ray")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_cells_match_local_cells(tmp_path, local_ray):
    # class_token=0 fails (the head pools on it): a failing cell on a worker is recorded too
    grid = dict(sites={"class_token": [0], "reg_tokens": [2, 4]}, inits=["normal"], seeds=[0, 1], metrics=["drift"],
                threads_per_cell=1, progress=False)
    on_ray = surgery.sweep("vit_tiny_test", executor="ray", workers=2, out=tmp_path / "ray", **grid)
    local = surgery.sweep("vit_tiny_test", out=tmp_path / "local", **grid)
    assert len(on_ray.results) == len(local.results) == 6
    assert {r.cell.key: (r.values, r.error) for r in on_ray.results} == {r.cell.key: (r.values, r.error)
                                                                        for r in local.results}
    assert len(on_ray.failed) == 1 and "CountError" in on_ray.failed[0].error
    assert (tmp_path / "ray" / "results.csv").exists() and (tmp_path / "ray" / "summary.md").exists()
    assert ray.is_initialized()  # a Ray it did not start is left running
