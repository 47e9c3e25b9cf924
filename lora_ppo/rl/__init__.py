"""Pure PPO math: masked reductions, KL, rewards, GAE, losses and chunked log-probs.

Every module here imports only torch; none knows about a model, an engine or a rank.
"""

from lora_ppo.rl.gae import compute_gae
from lora_ppo.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from lora_ppo.rl.logprobs import logprobs_and_entropy_from_hidden, logprobs_from_logits
from lora_ppo.rl.losses import (
    PolicyLossOut,
    ValueLossOut,
    entropy_loss,
    explained_variance,
    policy_loss,
    value_loss,
)
from lora_ppo.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from lora_ppo.rl.rewards import RunningMoments, compute_rewards, last_token_index, shape_scores
from lora_ppo.rl.sampler_correction import sampler_mismatch, sampler_weights

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyLossOut",
    "RunningMoments",
    "ValueLossOut",
    "compute_gae",
    "compute_rewards",
    "entropy_loss",
    "explained_variance",
    "kl_penalty",
    "last_token_index",
    "logprobs_and_entropy_from_hidden",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "sampler_mismatch",
    "sampler_weights",
    "shape_scores",
    "value_loss",
]
