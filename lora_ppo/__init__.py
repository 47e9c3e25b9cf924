"""lora_ppo: memory-efficient RLHF. PPO fine-tuning of LLMs with LoRA on one quantized base model,
driven by DeepSpeed."""

__version__ = "0.1.0"
