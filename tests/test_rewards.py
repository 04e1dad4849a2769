"""Every reward source is batch-invariant: a sample scores the same alone as in any batch, whatever the padding, also
for causal models with absolute positions (GPT-2), and the reward adapter scores as the adapter alone does."""

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS
from peft import LoraConfig, PeftModel, get_peft_model

from lit_vhead import AutoModelForCausalLMWithValueHead
from lit_vhead.rewards import FunctionReward, RewardAdapter, RewardInputs, RewardModel, even_token_fraction

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
RESPONSES = [[20, 21, 22], [23, 24, 25, 26, 27, 28], [29, 1]]  # the last one ends with EOS (1)


def ppo_batch(rows: list[int], tokenizer) -> RewardInputs:
    """The PPO layout of ``rows``: left-padded prompts, then right-padded responses (as ``Rollout.full_sequence``)."""
    prompts, responses = [PROMPTS[i] for i in rows], [RESPONSES[i] for i in rows]
    width_q, width_r = max(map(len, prompts)), max(map(len, responses))
    ids, mask = [], []
    for q, r in zip(prompts, responses):
        ids.append([0] * (width_q - len(q)) + q + r + [0] * (width_r - len(r)))
        mask.append([0] * (width_q - len(q)) + [1] * (len(q) + len(r)) + [0] * (width_r - len(r)))
    return RewardInputs(
        prompts=tokenizer.batch_decode(prompts), responses=tokenizer.batch_decode(responses), query_ids=prompts,
        response_ids=responses, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
    )


def assert_batch_invariant(source, tokenizer) -> torch.Tensor:
    alone = torch.stack([source(ppo_batch([i], tokenizer))[0] for i in range(len(PROMPTS))])
    for rows in ([0, 1, 2], [2, 1, 0], [1, 2]):
        torch.testing.assert_close(source(ppo_batch(rows, tokenizer)), alone[rows], rtol=1e-5, atol=1e-5)
    return alone


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.ByT5Tokenizer(extra_ids=0)


def test_function_reward_is_batch_invariant(tokenizer):
    alone = assert_batch_invariant(FunctionReward(even_token_fraction, scale=10.0), tokenizer)
    assert alone.tolist() == pytest.approx([20 / 3, 5.0, 0.0])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_causal_reward_model_is_batch_invariant_whatever_the_tokenizer_pads(tokenizer, padding_side):
    """GPT-2 counts positions from the first column: left padding used to shift every shorter text's positions."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"], num_labels=2, pad_token_id=0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    rm_tokenizer = transformers.ByT5Tokenizer(extra_ids=0, padding_side=padding_side)
    source = RewardModel(model=model, tokenizer=rm_tokenizer, label_index=1)
    source.setup(None, None, torch.device("cpu"))
    alone = assert_batch_invariant(source, tokenizer)
    assert alone.unique().numel() == 3


@pytest.fixture(scope="module")
def adapter_setup(tmp_path_factory):
    """A tiny GPT-2 base on disk and a SEQ_CLS LoRA trained (here: perturbed) on it, saved as TRL's RewardTrainer
    saves one."""
    root = tmp_path_factory.mktemp("reward_adapter")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"], pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=1)
    rm = get_peft_model(classifier, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, param in rm.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.5)
    rm.save_pretrained(root / "adapter")
    return root


def test_reward_adapter_is_batch_invariant_and_scores_as_the_adapter_alone(tokenizer, adapter_setup):
    base = transformers.AutoModelForCausalLM.from_pretrained(adapter_setup / "base")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        base, peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]),
        reward_adapter=str(adapter_setup / "adapter"),
    )
    source = RewardAdapter(str(adapter_setup / "adapter"))
    source.setup(policy, tokenizer, torch.device("cpu"))
    alone = assert_batch_invariant(source, tokenizer)

    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(adapter_setup / "base", num_labels=1)
    reference = PeftModel.from_pretrained(classifier, adapter_setup / "adapter").eval()
    with torch.no_grad():
        expected = [reference(input_ids=torch.tensor([q + r])).logits[0, 0] for q, r in zip(PROMPTS, RESPONSES)]
    torch.testing.assert_close(alone, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_reward_adapter_has_no_adapter_name_knob(adapter_setup):
    """The adapter is always loaded as the policy's ``reward_adapter``: a name setting would do nothing."""
    with pytest.raises(TypeError):
        RewardAdapter(str(adapter_setup / "adapter"), adapter_name="mine")
