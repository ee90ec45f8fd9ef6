"""megaflow's configuration: typed dataclasses, one source of truth.

Every field is reachable from the command line under Megatron-LM's flag name (`--num-layers`) and from
an optional YAML file (`--config run.yaml`, keys are field or flag names, flat or grouped by section).
Precedence: dataclass default < model-style preset < YAML < command line. `validate()` checks the
combinations and names the offending flag; it runs before any process group is created.

One module per concern: fields (the field helper), model/parallel/data/training (the sections), root
(Config and the section registry), validation (derived fields and checks), cli (flags and YAML).
"""
from megaflow.config.cli import (FIELDS, build_parser, config_from_kwargs, format_config,  # noqa: F401
                                 parse_args)
from megaflow.config.data import DataConfig  # noqa: F401
from megaflow.config.fields import ConfigError  # noqa: F401
from megaflow.config.model import MODEL_STYLES, ModelConfig  # noqa: F401
from megaflow.config.moe import MoEConfig, parse_layer_freq  # noqa: F401
from megaflow.config.parallel import ParallelConfig  # noqa: F401
from megaflow.config.resilience import ResilienceConfig  # noqa: F401
from megaflow.config.root import SECTIONS, Config  # noqa: F401
from megaflow.config.training import CheckpointConfig, LoggingConfig, TrainingConfig  # noqa: F401
from megaflow.config.validation import (finalize, num_microbatches, pad_vocab_size,  # noqa: F401
                                        set_vocab_size, validate, virtual_pipeline_size)
