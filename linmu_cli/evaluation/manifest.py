"""lmms-eval 0.7.x model registration (registry v2): the `lmms_eval.models` entry point loads `manifests`.

Kept free of heavy imports: lmms-eval loads every entry point when `lmms_eval.models` is first imported.
"""

from __future__ import annotations

MODEL_ID = "linmu"
CLASS_PATH = "linmu_cli.evaluation.plugin.LinMU"


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
