"""One line naming the versions of what lora_ppo runs on (printed by scripts/setup.sh, so CI's
output says what it installed)."""

import importlib.metadata as md
import platform

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "kernels",
            "accelerate", "safetensors", "tokenizers", "datasets", "huggingface_hub")


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return f"python {platform.python_version()}, " + ", ".join(found)


if __name__ == "__main__":
    print(f"lora_ppo setup: {versions()}")
