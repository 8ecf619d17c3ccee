"""Markers of transformers' test-suite (as in its pyproject), so upstream's decorated tests collect cleanly."""

UPSTREAM_MARKERS = (
    "slow", "is_pipeline_test", "is_staging_test", "accelerate_tests", "not_device_test", "torch_compile_test",
    "torch_export_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "all_flash_attn_test",
    "bitsandbytes", "generate", "is_training_test", "is_tensor_parallel_test", "is_expert_parallel_test",
    "is_fsdp_test", "export_test",
)  # fmt: skip


def pytest_configure(config):
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", marker)


def pytest_ignore_collect(collection_path, config):
    """Opt-in: this suite runs when named (`python -m pytest tests/transformers_suite`), not with the CPU suite.

    It imports transformers' own test modules (a package named `tests`, global test settings) and needs their
    copy beside the checkout, which a fresh clone has not.
    """
    if collection_path.name.startswith("test_") and collection_path.suffix == ".py":
        named = any("transformers_suite" in str(arg) for arg in config.args)
        return None if named else True
    return None
