"""alter-ds: small language models as multi-task learners with a Mixture-of-Task-Adapters.

Kept free of deepspeed and datasets imports so the model library and the ops load anywhere torch does.
"""

from alter_ds.config import ConfigError, ExperimentConfig, load_config
from alter_ds.mta.model import MTAModel

__version__ = "0.1.0"

__all__ = ["ConfigError", "ExperimentConfig", "MTAModel", "__version__", "load_config"]
