import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The longest cases (about 10-25 s each on 2 cores) whose feature a shorter case of the default run also covers:
# marked `extended`, they leave the default run (kept under 10 minutes on a fresh clone) and .ci/run runs them
# after it (`python -m pytest -q -m "bench or extended"`).
EXTENDED = {
    "tests/test_memory.py::test_peak_rss_flat_when_checkpoint_doubles[byte-copy]",
    "tests/test_s3.py::test_conversions_through_a_slow_throttling_endpoint",
    "tests/test_adapter_extra_experts.py::test_split_gives_peft_deltas_and_fuses_back_byte_identical[2-True]",
    "tests/test_adapter_convert.py::test_other_family_peft_adapter_splits_per_expert_and_fuses_back[jamba]",
    "tests/test_adapter_convert.py::test_other_family_peft_adapter_splits_per_expert_and_fuses_back[nemotron_h]",
    "tests/test_adapter_convert.py::test_other_family_peft_adapter_splits_per_expert_and_fuses_back[ernie4_5_moe]",
    "tests/test_adapter_convert.py::test_other_family_peft_adapter_splits_per_expert_and_fuses_back[lfm2_moe]",
    "tests/test_launch.py::test_torchrun_ranks_fall_back_to_gloo_where_the_store_is_not_shared",
    "tests/test_batch.py::test_two_torchrun_nodes_on_one_host",
    "tests/test_batch.py::test_strict_manifest_under_torchrun",
    "tests/test_quantized.py::test_mxfp4_gpt_oss_split_and_fuse_back_byte_identical[2]",
    "tests/test_quantized.py::test_mxfp4_gpt_oss_split_and_fuse_back_byte_identical[3]",
    # 8-10 s each on 2 cores; their features stay in the default run through the cases named after each
    "tests/test_errors.py::test_access_denied_on_upload_part_names_the_object[2]",  # [None]
    "tests/test_s3.py::test_resume_after_a_rank_is_killed[s3]",  # [local]; test_safety's S3 resume after a crash
    "tests/test_verify.py::test_fuse_and_split_with_verify_under_torchrun",  # --verify at --nproc; test_launch's torchrun
    "tests/test_dst_lock.py::test_s3_a_lock_from_another_host_is_stale_once_its_heartbeat_is_old",  # crashed job [s3]
    "tests/test_unread_outputs.py::test_mxfp4_split_and_dequantizing_split_are_refused_unless_asked",  # gpt-oss bf16
    "tests/test_families.py::test_llama4_experts_fused_on_disk_split_and_fuse_back",  # pipeline round trip [llama4]
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the EXTENDED cases `extended`; fail the collection when one of them no longer exists (renamed)."""
    found = set()
    for item in items:
        if item.nodeid in EXTENDED:
            item.add_marker(pytest.mark.extended)
            found.add(item.nodeid)
    collected_all = not config.getoption("keyword") and not config.args[1:] and config.args in ([], ["tests"])
    if collected_all and found != EXTENDED:
        raise pytest.UsageError(f"conftest EXTENDED names tests that do not exist: {sorted(EXTENDED - found)}")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 for the module's tests (tests/s3_server.py)."""
    from s3_server import MotoServer

    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3env(s3, monkeypatch, request):
    """An environment pointed at the module's S3 server, with credentials, and its bucket (the test module's
    `BUCKET`) created; returns an s3fs filesystem of the server."""
    import s3fs

    from s3_server import CREDENTIALS

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    bucket = request.module.BUCKET
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.url}, key="testing", secret="testing")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return fs
