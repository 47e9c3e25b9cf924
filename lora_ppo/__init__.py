"""lora_ppo: memory-efficient RLHF. PPO fine-tuning of LLMs with LoRA on one quantized base model,
driven by DeepSpeed.

The entry points, importable from the package (loaded on first use, so `import lora_ppo` stays
cheap); the three training ones run what the CLI runs (lora_ppo/api.py):

    train(config=None, *, reward_funcs, reward_weights, train_dataset, eval_dataset, resume,
          overwrite, overrides) -> Run                         (`lora-ppo train`)
    train_sft(config=None, *, train_dataset, eval_dataset, resume, overwrite, overrides)
          -> Path                                              (`lora-ppo sft`)
    train_reward(config=None, *, ...) -> Path                  (`lora-ppo train-reward`)
    load_config(path, overrides) -> Config                     lora_ppo.config
    export(checkpoint, out), merge(checkpoint, out, ...)       lora_ppo.io.export
"""

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "Config": "lora_ppo.config", "load_config": "lora_ppo.config",
    "train": "lora_ppo.api", "train_sft": "lora_ppo.api", "train_reward": "lora_ppo.api",
    "export": "lora_ppo.io.export",
    "merge": "lora_ppo.io.export",
}
__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'lora_ppo' has no attribute {name!r}")
