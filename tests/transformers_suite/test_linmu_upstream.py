"""transformers' own Qwen2-VL model test and generation mixin, run against the LinMU classes.

The upstream files live outside the repository (`../shared/transformers-tests`, or `$LINMU_TRANSFORMERS_TESTS`)
and are imported from there, never copied. The model tester is upstream's with a converted (LinMU) config;
tests that cannot apply to a recurrent, constant-size state are skipped with the reason in the message.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SUITE = Path(
    os.environ.get(
        "LINMU_TRANSFORMERS_TESTS", Path(__file__).resolve().parents[3] / "shared/transformers-tests"
    )
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

import transformers  # noqa: E402
import transformers.utils  # noqa: E402

_direct_import = transformers.utils.direct_transformers_import


def _installed_transformers_if_missing(path, *args, **kwargs):
    """upstream's test_pipeline_mixin imports `<suite>/src/transformers` directly; where that is not a checkout
    of transformers' sources (the shared copy holds a plain file there), use the installed package."""
    if not (Path(path) / "__init__.py").is_file():
        return transformers
    return _direct_import(path, *args, **kwargs)


transformers.utils.direct_transformers_import = _installed_transformers_if_missing
from tests.models.qwen2_vl import test_modeling_qwen2_vl as upstream  # noqa: E402

transformers.utils.direct_transformers_import = _direct_import

from transformers import Qwen2VLForConditionalGeneration, Qwen2VLModel  # noqa: E402

import linmu_cli  # noqa: E402, F401  (registers the LinMU classes)
from linmu_cli.config import MateConfig  # noqa: E402
from linmu_cli.layers.cache import LinMUCache  # noqa: E402
from linmu_cli.models import linmu_classes  # noqa: E402

LinMUConfig, LinMUForConditionalGeneration = linmu_classes("qwen2_vl")
LinMUModel = linmu_classes("qwen2_vl", base=True)[1]

# A small M-MATE: a text window shorter than the tester's 39-token prompts, so the ring really slides.
MATE = MateConfig(text_window=8, vision_window=[1, 2, 2]).to_dict()


class LinMUModelTester(upstream.Qwen2VLVisionText2TextModelTester):
    def get_config(self):
        return LinMUConfig(**super().get_config().to_dict() | {"mate": MATE})


def _skip(reason: str):
    def test(self):
        self.skipTest(reason)

    test.__doc__ = reason
    return test


def _lm_head_class_only(name: str):
    """Run upstream's test on the LM-head class only: upstream leaves bare models out of training tests by
    their registered names (MODEL_MAPPING_NAMES), a list that cannot hold LinMU's classes."""

    def test(self):
        self.all_model_classes = (LinMUForConditionalGeneration,)
        getattr(upstream.Qwen2VLModelTest, name)(self)

    test.__doc__ = _lm_head_class_only.__doc__
    return test


def _with_padding(name: str):
    """Run upstream's left-padding test although `has_attentions` is False: upstream uses that flag for "supports
    padding", and LinMU does (padded positions never enter a state, docs/design.md §6)."""

    def test(self):
        self.has_attentions = True
        getattr(upstream.Qwen2VLModelTest, name)(self)

    test.__doc__ = _with_padding.__doc__
    return test


NO_ATTENTION_WEIGHTS = (
    "a LinMU decoder has no attention weights to return (M-MATE: state-space scan + windows)"
)
PACKING = (
    "padding-free packing is refused: a recurrent state would run across packed sequences "
    "(tests/models/test_hf_compat.py checks the refusal)"
)
NOT_A_KV_CACHE = (
    "LinMU's cache is constant-size already: cache_implementation='static' decodes on fast_decode's fixed "
    "buffers (a LinMUCache), not on a StaticCache of keys / values (tests/models/test_hf_compat.py checks it)"
)
NO_COMPILE = (
    "generate() compiles forwards only over a compileable key / value cache; LinMU's compiled decode is "
    "linmu_cli.fast_decode's CUDA-graph step"
)
DECODER_KEEPS_MATE = (
    "the decoder keeps M-MATE whatever attention implementation is asked for (only the vision tower switches; "
    "tests/models/test_hf_compat.py checks it)"
)


class LinMUQwen2VLModelTest(upstream.Qwen2VLModelTest):
    all_model_classes = (LinMUModel, LinMUForConditionalGeneration)
    pipeline_model_mapping = {}
    # upstream's switch for attention-free models (Mamba & co.): no attention weights to return
    has_attentions = False

    def setUp(self):
        self.model_tester = LinMUModelTester(self)
        self.config_tester = upstream.ConfigTester(self, config_class=LinMUConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # upstream picks labels by the registered class name: give LinMU classes what the classes they extend get
        teacher_class = {
            LinMUModel: Qwen2VLModel,
            LinMUForConditionalGeneration: Qwen2VLForConditionalGeneration,
        }
        return super()._prepare_for_class(
            inputs_dict, teacher_class.get(model_class, model_class), return_labels
        )

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """LinMU's cache holds, per layer, the SSM state, the conv tail and a ring of text_window key / value slots
        (at most text_window of them valid): sizes fixed by the batch, not by the sequence (docs/design.md
        §3-4)."""
        self.assertIsInstance(past_key_values, LinMUCache)
        text = config.get_text_config(decoder=True)
        self.assertEqual(len(past_key_values), text.num_hidden_layers)
        mate = MateConfig.from_dict(MATE)
        heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
        head_dim = text.hidden_size // heads
        window = mate.text_window
        for layer in past_key_values.layers:
            self.assertEqual(layer.ssm.shape, (batch_size, heads, head_dim, head_dim))
            self.assertEqual(
                layer.conv.shape, (batch_size, (2 * kv_heads + heads) * head_dim, mate.d_conv - 1)
            )
            self.assertEqual(layer.keys.shape, (batch_size, kv_heads, window, head_dim))
            self.assertEqual(layer.values.shape, (batch_size, kv_heads, window, head_dim))
            self.assertEqual(layer.key_valid.shape, (batch_size, window))
            self.assertLessEqual(int(layer.key_valid.sum(-1).max()), min(seq_length, window))

    test_training = _lm_head_class_only("test_training")
    test_training_gradient_checkpointing = _lm_head_class_only("test_training_gradient_checkpointing")
    test_training_gradient_checkpointing_use_reentrant_false = _lm_head_class_only(
        "test_training_gradient_checkpointing_use_reentrant_false"
    )
    test_training_gradient_checkpointing_use_reentrant_true = _lm_head_class_only(
        "test_training_gradient_checkpointing_use_reentrant_true"
    )
    test_left_padding_compatibility = _with_padding("test_left_padding_compatibility")
    test_capture_outputs_decorator = _skip(NO_ATTENTION_WEIGHTS)
    test_eager_padding_matches_padding_free_with_position_ids = _skip(PACKING)
    test_sdpa_padding_matches_padding_free_with_position_ids = _skip(PACKING)
    test_generate_with_static_cache = _skip(NOT_A_KV_CACHE)
    test_generate_from_inputs_embeds_with_static_cache = _skip(NOT_A_KV_CACHE)
    test_generate_compile_model_forward_fullgraph = _skip(NO_COMPILE)
    test_generate_compilation_all_outputs = _skip(NO_COMPILE)
    test_static_cache_no_recompile_with_smaller_length = _skip(NO_COMPILE)
    test_can_set_attention_dynamically = _skip(DECODER_KEEPS_MATE)
    test_can_set_attention_dynamically_composite_model = _skip(DECODER_KEEPS_MATE)
