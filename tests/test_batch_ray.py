"""`Studio.generate_batch(engine="ray")` on a local Ray cluster (CPU): the same manifest and images as the local
engine. Skipped without Ray (an optional extra: ``pip install -e '.[ray]'``)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")

from retrieval.synthetic import SMALL_TARGETS, write_synthetic_library  # noqa: E402
from studio.api import Studio  # noqa: E402
from studio.batch import read_manifest  # noqa: E402

JOBS = [
    {"id": "plain", "prompt": "a red star on a black background", "seeds": [0, 1], "steps": 2},
    {"id": "hat", "prompt": "a blue circle", "loras": [["hat_r4_s0", 0.8]], "seeds": [4], "steps": 2},
    {"id": "switch", "prompt": "a green square", "loras": ["stripes_r4_s0", "hat_r4_s0"], "method": "switch",
     "method_params": {"tau": 2}, "seeds": [5], "steps": 2},
]


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report
    # the raylet waits for its agents to start; on a loaded 2-core machine that can take longer than the default
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def test_the_ray_engine_gives_the_local_engines_manifest_and_images(cluster, tmp_path):
    torch.set_num_threads(1)
    write_synthetic_library(tmp_path / "lib", ["hat", "stripes"], ranks=(4,), seeds=(0,), shapes=SMALL_TARGETS,
                            name_style="concept")
    studio = Studio(device="cpu", library=tmp_path / "lib")
    local = studio.generate_batch(JOBS, out=tmp_path / "local", progress=False)
    remote = studio.generate_batch(JOBS, out=tmp_path / "ray", engine="ray", workers=2, progress=False)
    assert (remote.engine, remote.images, remote.generated, remote.groups) == ("ray", 4, 4, 3)
    assert local.generated == 4

    def rows(out):
        return {r["file"]: {k: v for k, v in r.items() if k != "finished_at"} for r in read_manifest(out)}

    assert rows(tmp_path / "ray") == rows(tmp_path / "local")  # keys, jobs, seeds, groups and recipes
    assert sorted(rows(tmp_path / "ray")) == ["hat-seed4.png", "plain-seed0.png", "plain-seed1.png",
                                              "switch-seed5.png"]
    for name in ("plain-seed0.png", "plain-seed1.png"):  # no LoRA: bit for bit
        assert np.array_equal(_pixels(tmp_path / "ray" / name), _pixels(tmp_path / "local" / name))
    for name in ("hat-seed4.png", "switch-seed5.png"):  # up to the fusion runtime's float rounding
        d = np.abs(_pixels(tmp_path / "ray" / name) - _pixels(tmp_path / "local" / name))
        assert d.max() <= 2 and d.mean() < 0.05
    again = studio.generate_batch(JOBS, out=tmp_path / "ray", engine="ray", workers=2, progress=False)
    assert (again.generated, again.skipped) == (0, 4)  # resumed: nothing runs again
