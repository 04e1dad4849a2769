"""Reward functions used by the tests through Hydra `_target_`s."""


def two_scores_each(prompts, responses, query_ids, response_ids):
    """A broken reward: two scores per sample instead of one."""
    return [[0.0, 1.0] for _ in prompts]
