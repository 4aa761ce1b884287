"""The config models of every stage and :func:`load_yaml`, the one YAML loader.

``from conan_embedding.config import X`` is the package's API for every name below:
:mod:`.loader` (reading YAML, ``base:`` / ``set:`` / ``drop:``, one error format),
:mod:`.common` (the ``optim:`` / ``engine:`` / ``lora:`` blocks and the checkpoint keys every stage
shares),
:mod:`.train` (the embedding stages) and :mod:`.llm` (the Conan-v2 stages).
"""

from __future__ import annotations

from conan_embedding.config.common import (
    CheckpointFields,
    CheckpointSettings,
    EngineConfig,
    LoraSettings,
    OptimConfig,
    StrictModel,
    move_flat_keys,
)
from conan_embedding.config.llm import (
    PretrainConfig,
    SFTConfig,
    SourceConfig,
    StageConfig,
    SupervisedStageConfig,
    WeakStageConfig,
)
from conan_embedding.config.loader import (
    ConfigError,
    drop_dotted,
    load_yaml,
    read_yaml,
    recipe_path,
    resolve_config_path,
    set_dotted,
)
from conan_embedding.config.train import (
    CBBConfig,
    DynamicNegativesConfig,
    EarlyStoppingConfig,
    HeldoutConfig,
    ModelConfig,
    TaskConfig,
    TeacherFilterConfig,
    TrainConfig,
    ValidationConfig,
    load_config,
)

__all__ = [
    "CBBConfig",
    "CheckpointFields",
    "CheckpointSettings",
    "ConfigError",
    "DynamicNegativesConfig",
    "EarlyStoppingConfig",
    "EngineConfig",
    "HeldoutConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "SFTConfig",
    "SourceConfig",
    "StageConfig",
    "StrictModel",
    "SupervisedStageConfig",
    "TaskConfig",
    "TeacherFilterConfig",
    "TrainConfig",
    "ValidationConfig",
    "WeakStageConfig",
    "drop_dotted",
    "load_config",
    "load_yaml",
    "move_flat_keys",
    "read_yaml",
    "recipe_path",
    "resolve_config_path",
    "set_dotted",
]
