"""Reward sources for PPO: a separate sequence-classification model with its own tokenizer, and
weighted sums of several sources (reward.sources / reward.weights)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_adapter_dir, tiny_config

from lora_ppo.config.load import load_config
from lora_ppo.errors import UserError
from lora_ppo.generation.samples import left_pad
from lora_ppo.io.data import Prompt
from lora_ppo.modeling.actor_critic import build_actor_critic
from lora_ppo.modeling.loading import load_base_model, load_tokenizer
from lora_ppo.ppo.reward_functions import FunctionReward
from lora_ppo.ppo.reward_sources import ModelReward, WeightedReward, make_reward_source

CPU = torch.device("cpu")
PROMPTS = ["review of the diner :", "my review of the movie :", "thoughts on the laptop :"]
COMPLETIONS = [" the food was great .",
               " the plot was dull and the acting was wooden . skip this one",
               " solid"]
AS_PROMPTS = [Prompt(p, ()) for p in PROMPTS]  # the reward sources' view: text, as the policy read it
LENGTH_REWARD = ("def n_words(prompts, completions, **kw):\n"
                 "    return [len(c.split()) for c in completions]\n")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny LlamaForSequenceClassification (2 labels) whose tokenizer has 300 tokens, trained
    on other reviews than the policy's 512-token one, so the same text gets other ids."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lora_ppo.builtin.corpus import review_corpus
    from lora_ppo.builtin.tiny import build_tokenizer

    tok = build_tokenizer((t for t, _ in review_corpus(300, seed=5)), vocab_size=300)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, num_labels=2, pad_token_id=None,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(std=1.0)  # scores spread widely enough to tell apart
    out = tmp_path_factory.mktemp("seqcls") / "rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rollout_tensors(policy_tok):
    """The policy's view of the samples: its own token ids, as train.score passes them."""
    q = [policy_tok(p)["input_ids"] for p in PROMPTS]
    r = [policy_tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    q_ids, q_mask = left_pad(q, policy_tok.pad_token_id)
    width = max(len(x) for x in r)
    r_ids = torch.full((len(r), width), policy_tok.pad_token_id)
    r_mask = torch.zeros((len(r), width))
    for i, x in enumerate(r):
        r_ids[i, :len(x)], r_mask[i, :len(x)] = torch.tensor(x), 1.0
    return {"query_ids": q_ids, "query_mask": q_mask, "response_ids": r_ids,
            "response_mask": r_mask, "prompt_ids": q, "completion_ids": r}


def _expected(rm_dir, label):
    """Each text alone (no padding at all) through a separately loaded HF model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS):
            out.append(model(**tok(p + c, return_tensors="pt")).logits[0, label].item())
    return torch.tensor(out)


@pytest.fixture(scope="module")
def policy_tok(tiny_model_dir):
    return load_tokenizer(tiny_config(tiny_model_dir, "x").model, str(tiny_model_dir))


def test_model_reward_scores_the_decoded_text_with_its_own_tokenizer(rm_dir, policy_tok):
    from transformers import AutoTokenizer

    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    text = PROMPTS[1] + COMPLETIONS[1]
    assert rm_tok(text)["input_ids"] != policy_tok(text)["input_ids"]  # the vocabularies differ
    expected = _expected(rm_dir, label=1)
    src = ModelReward(str(rm_dir), None, label=1, generation_batch_size=2, device=CPU, dtype=torch.float32)
    scores = src(AS_PROMPTS, COMPLETIONS, _rollout_tensors(policy_tok))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    # The policy's ids are not even valid input for the reward model (its vocab has 300 ids).
    assert max(max(ids) for ids in _rollout_tensors(policy_tok)["completion_ids"]) >= 300


def test_model_reward_label_and_a_pad_token_that_ends_a_text(rm_dir, policy_tok):
    src = ModelReward(str(rm_dir), None, label=0, generation_batch_size=8, device=CPU, dtype=torch.float32)
    # Make the pad token the last token of the first text (" ."): transformers' pooling would
    # then read that row one token early; ModelReward scores such a row on its own.
    last = src.tokenizer(PROMPTS[0] + COMPLETIONS[0])["input_ids"][-1]
    src.tokenizer.pad_token = src.tokenizer.convert_ids_to_tokens(last)
    src.model.config.pad_token_id = last
    scores = src(AS_PROMPTS, COMPLETIONS, _rollout_tensors(policy_tok))
    torch.testing.assert_close(scores, _expected(rm_dir, label=0), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="reward.model_label=2 but"):
        ModelReward(str(rm_dir), None, label=2, generation_batch_size=8, device=CPU, dtype=torch.float32)


def test_weighted_sum_of_a_function_and_a_model(rm_dir, policy_tok, tiny_model_dir, tmp_path):
    fn = tmp_path / "length.py"
    fn.write_text(LENGTH_REWARD)
    cfg = tiny_config(tiny_model_dir, tmp_path, "reward.sources=[function,model]",
                      "reward.weights=[2.0,-0.5]", f"reward.function={fn}:n_words",
                      f"reward.model={rm_dir}", "reward.model_label=1")
    ac = build_actor_critic(cfg, load_base_model(cfg, str(tiny_model_dir), CPU))
    src = make_reward_source(cfg, ac)
    assert isinstance(src, WeightedReward)
    scores = src(AS_PROMPTS, COMPLETIONS, _rollout_tensors(policy_tok))
    words = torch.tensor([5.0, 13.0, 1.0])  # space-separated words, "." included
    model = _expected(rm_dir, label=1)
    torch.testing.assert_close(scores, 2.0 * words - 0.5 * model, rtol=0, atol=1e-5)
    torch.testing.assert_close(src.components["function"], words)
    torch.testing.assert_close(src.components["model"], model, rtol=0, atol=1e-5)


def test_one_source_of_weight_one_is_used_as_is(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    ac = build_actor_critic(cfg, load_base_model(cfg, str(tiny_model_dir), CPU))
    assert isinstance(make_reward_source(cfg, ac), FunctionReward)
    cfg = tiny_config(tiny_model_dir, tmp_path, "reward.sources=[function]", "reward.weights=[3]")
    assert isinstance(make_reward_source(cfg, ac), WeightedReward)


def test_weighted_sum_with_the_reward_adapter(policy_tok, tiny_model_dir, tmp_path):
    fn = tmp_path / "length.py"
    fn.write_text(LENGTH_REWARD)
    adapter = make_adapter_dir(tiny_model_dir, tmp_path / "rm", seed=2, head=True)
    cfg = tiny_config(tiny_model_dir, tmp_path, "reward.sources=[function,adapter]",
                      "reward.weights=[1.0,0.5]", f"reward.function={fn}:n_words",
                      f"reward.adapter={adapter}")
    ac = build_actor_critic(cfg, load_base_model(cfg, str(tiny_model_dir), CPU))
    src = make_reward_source(cfg, ac)
    tensors = _rollout_tensors(policy_tok)
    scores = src(AS_PROMPTS, COMPLETIONS, tensors)
    torch.testing.assert_close(scores, src.components["function"]
                               + 0.5 * src.components["adapter"])
    assert src.components["adapter"].abs().min() > 0


@pytest.mark.parametrize("overrides, expected", [
    (["reward.sources=[function,function]"], "names a source twice"),
    (["reward.sources=[function,model]", "reward.model=/m", "reward.weights=[1]"],
     "reward.weights has 1 entries but reward.sources has 2"),
    (["reward.source=model"], "reward source 'model' needs reward.model="),
    (["reward.sources=[function,adapter]"], "reward source 'adapter' needs reward.adapter="),
    (["reward.source=model", "reward.model=/m", "reward.sources=[function]"],
     "reward.source=model is not in reward.sources=['function']"),
    (["reward.sources=[judge]"], "reward.sources[0]='judge' is not one of"),
    (["reward.model_label=-1"], "reward.model_label=-1 is out of range"),
])
def test_bad_source_combinations_fail_at_load_time(overrides, expected):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)
