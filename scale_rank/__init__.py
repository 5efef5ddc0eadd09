"""scale_rank: adaptive-rank LoRA (AdaLoRA, SoRA, IncreLoRA, PRILoRA, LoRA) for sharded training."""
from .adapt import adapt
from .config import ConfigError, RunConfig, load_config, method_config
from .controller import RankController
from .layer import AdaptiveLoRALayer

__all__ = ["adapt", "RankController", "AdaptiveLoRALayer", "ConfigError", "RunConfig", "load_config",
           "method_config"]
