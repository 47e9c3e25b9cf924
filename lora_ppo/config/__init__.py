"""The typed config tree (tree.py and its sections), strict YAML loading (load.py) and the
generated reference (reference.py)."""

from lora_ppo.config.load import config_to_dict, load_config, save_config
from lora_ppo.config.tree import Config

__all__ = ["Config", "config_to_dict", "load_config", "save_config"]
