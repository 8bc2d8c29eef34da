"""Length-extension training: data pipeline, config, the loop (single process or FSDP2), checkpoints."""

from longgen.train.config import TrainConfig, load_config
from longgen.train.loop import NonFiniteLossError, TrainingInterrupted, request_stop, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainingInterrupted", "load_config", "request_stop", "train"]
