"""lora_ppo: memory-efficient RLHF. PPO fine-tuning of LLMs with LoRA on one quantized base model,
driven by DeepSpeed.

The entry points, importable from the package (loaded on first use, so `import lora_ppo` stays
cheap):

    load_config(path, overrides) -> Config       lora_ppo.config
    train(cfg, resume=None) -> Run               lora_ppo.ppo.loop        (`lora-ppo train`)
    train_sft(cfg, resume=None) -> Path          lora_ppo.stages.sft      (`lora-ppo sft`)
    train_reward(cfg, resume=None) -> Path       lora_ppo.stages.reward_model
    export(checkpoint, out), merge(checkpoint, out, ...)   lora_ppo.io.export
"""

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "Config": "lora_ppo.config", "load_config": "lora_ppo.config",
    "train": "lora_ppo.ppo.loop", "train_sft": "lora_ppo.stages.sft",
    "train_reward": "lora_ppo.stages.reward_model", "export": "lora_ppo.io.export",
    "merge": "lora_ppo.io.export",
}
__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'lora_ppo' has no attribute {name!r}")
