"""transformers' own Qwen2-VL model test and generation mixin, run against the LinMU classes.

The upstream files live outside the repository (`../shared/transformers-tests`, or `$LINMU_TRANSFORMERS_TESTS`)
and are imported from there, never copied. The model tester is upstream's with a converted (LinMU) config;
tests that cannot apply to a recurrent, constant-size state are skipped with the reason in the message.
"""

from __future__ import annotations

import os
import sys
import unittest
from pathlib import Path

import pytest

SUITE = Path(
    os.environ.get("LINMU_TRANSFORMERS_TESTS", Path(__file__).resolve().parents[3] / "shared/transformers-tests")
)
if not (SUITE / "tests/models/qwen2_vl/test_modeling_qwen2_vl.py").is_file():
    pytest.skip(
        f"transformers' test files not found at {SUITE}: set LINMU_TRANSFORMERS_TESTS to a directory holding "
        "upstream tests/models/qwen2_vl and tests/generation",
        allow_module_level=True,
    )
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for path in (SUITE, SUITE / "pylib"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tests.models.qwen2_vl import test_modeling_qwen2_vl as upstream  # noqa: E402

import linmu_cli  # noqa: E402, F401  (registers the LinMU classes)
from linmu_cli.config import MateConfig  # noqa: E402
from linmu_cli.models import linmu_classes  # noqa: E402

LinMUConfig, LinMUForConditionalGeneration = linmu_classes("qwen2_vl")
LinMUModel = linmu_classes("qwen2_vl", base=True)[1]

# A small M-MATE: a text window shorter than the tester's 39-token prompts, so the ring really slides.
MATE = MateConfig(text_window=8, vision_window=[1, 2, 2]).to_dict()


class LinMUModelTester(upstream.Qwen2VLVisionText2TextModelTester):
    def get_config(self):
        return LinMUConfig(**super().get_config().to_dict() | {"mate": MATE})


class LinMUQwen2VLModelTest(upstream.Qwen2VLModelTest):
    all_model_classes = (LinMUModel, LinMUForConditionalGeneration)
    pipeline_model_mapping = {}

    def setUp(self):
        self.model_tester = LinMUModelTester(self)
        self.config_tester = upstream.ConfigTester(self, config_class=LinMUConfig, has_text_modality=False)


