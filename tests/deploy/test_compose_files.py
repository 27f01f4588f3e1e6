"""docker/compose.host.yaml, the override for an engine without a bridge network, covers
every service of docker/compose.yaml (checked without an engine, in the default run)."""
from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_host_override_puts_every_service_on_the_host_network_and_the_scorer_on_loopback() -> None:
    base = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    host = yaml.safe_load((DOCKER / "compose.host.yaml").read_text())
    assert set(host["services"]) == set(base["services"])
    assert all(s.get("network_mode") == "host" for s in host["services"].values())
    scorer = host["services"]["scorer"]["environment"]
    assert scorer["JEST_HOST"] == scorer["JEST_METRICS_HOST"] == "127.0.0.1"
    trainers = [s for s in base["services"].values() if "--remote" in (s.get("command") or [])]
    assert len(trainers) == 2
    for trainer in trainers:
        command = trainer["command"]
        assert command[command.index("--remote") + 1].startswith("${JEST_SCORER_ADDRESS:-scorer:")
    assert "name" not in base, "docker-compose 1.29 refuses a top-level name"
    assert all(set(secret) == {"file"} for secret in base["secrets"].values()), \
        "docker-compose 1.29 reads secrets from files only"
