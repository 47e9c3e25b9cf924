"""The names of the four roles the one base plays, which are also its peft adapters' names
(modeling/actor_critic.py): a module of its own so that checkpoints and export can name the
adapters they write without importing the model."""

POLICY = "policy"        # the trainable LoRA adapter
REFERENCE = "reference"  # the frozen SFT adapter (or the base with adapters off)
CRITIC = "critic"        # the trainable value adapter (value.mode=adapter)
REWARD = "reward"        # the frozen reward adapter with its score head
