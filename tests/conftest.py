"""Shared fixtures: tiny synthetic clinics (real DICOM files) and a small model config."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

# One OpenMP thread per process, here and in every process a test starts (SuperLinks, SuperNodes,
# ClientApps, studies, benchmarks inherit the environment): make test runs more workers than cores,
# and with torch's default of one thread per core each process's idle threads spin while they wait
# for a core. Measured here, three quick studies side by side: 3 min 43 s of CPU with the default,
# 1 min 5 s with one thread (DEVELOPERS.md, Tests). A value set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from flwr.app import Error, Metadata, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402

from common.config import DataConfig, ModelConfig, SharedConfig  # noqa: E402
from simulations.synthetic import SyntheticSpec, generate_clinics  # noqa: E402

TINY_SPEC = SyntheticSpec(sites=2, studies_per_site=16, image_size=32, slices_per_study=4, seed=7)

# The files that take longest, longest first (measured with --durations). make test runs the suite
# on pytest-xdist workers, one file per worker at a time (--dist loadfile, no reordering): a long
# file that started last would end last, so these start first.
LONGEST_FIRST = ("test_deployment_resume.py", "test_deployment.py", "test_benchmarks.py", "test_predict.py",
                 "test_studies.py", "test_approval.py", "test_privacy.py", "test_simulation.py", "test_phi.py",
                 "test_secure_aggregation.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def tiny_clinics(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_clinics(tmp_path_factory.mktemp("clinics"), TINY_SPEC, progress=False)


@pytest.fixture
def site(tiny_clinics: list[Path], tmp_path: Path) -> Path:
    """A private, writable copy of one tiny clinic (tests may break it)."""
    target = tmp_path / "site"
    shutil.copytree(tiny_clinics[0], target)
    return target


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(SharedConfig(image_size=32, seq_len=4), proj_dim=16, gru_hidden=8, attn_dim=8, dropout=0.0)


@pytest.fixture
def tiny_data_config() -> DataConfig:
    return DataConfig(SharedConfig(image_size=32, seq_len=4))


def reply(content: RecordDict | Error, node_id: int = 1, message_type: str = "train"):
    """A reply Message as the server receives it from node ``node_id``."""
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="q", group_id="1", created_at=time.time(), ttl=60.0,
                        message_type=message_type)
    if isinstance(content, Error):
        return make_message(metadata, error=content)
    return make_message(metadata, content=content)


def site_message(run_config: dict, message_type: str = "train", server_round: int = 1, budget_id: str = "run-7",
                 extra_config: dict | None = None):
    """A message from the centre to a site (node 1, run 7) carrying the initial global model of
    ``run_config``, as the ClientApp handlers receive it (``extra_config``: more entries of its
    config record)."""
    from flwr.app import ConfigRecord

    from common.config import RunConfig
    from common.exchange import to_array_record
    from common.model import build_model, frozen_backbone_hash

    model = build_model(RunConfig.from_mapping(run_config).model)
    content = RecordDict({"arrays": to_array_record(model),
                          "config": ConfigRecord({"server-round": server_round, "budget-id": budget_id,
                                                  "backbone-hash": frozen_backbone_hash(model),
                                                  **(extra_config or {})})})
    metadata = Metadata(run_id=7, message_id=f"q{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=600.0,
                        message_type=message_type)
    return make_message(metadata, content=content)


@pytest.fixture
def server_task():
    """Flower stamps every message it builds with the run of the ServerApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture(autouse=True)
def _project_local_flower_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never touch ~/.flwr from tests.
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr-home"))
    os.environ.setdefault("TQDM_DISABLE", "1")
