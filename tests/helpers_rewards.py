"""Reward functions used by the tests through Hydra `_target_`s."""


def two_scores_each(prompts, responses, query_ids, response_ids):
    """A broken reward: two scores per sample instead of one."""
    return [[0.0, 1.0] for _ in prompts]


_calls = {"explodes": 0}


def explodes_after_two_calls(prompts, responses, query_ids, response_ids):
    """Fine for the start-up probe and PPO steps 0-1, then scores so large that the loss overflows."""
    _calls["explodes"] += 1
    return [1e38 if _calls["explodes"] > 3 else 1.0 for _ in prompts]


def nan_for_the_first(prompts, responses, query_ids, response_ids):
    return [float("nan")] + [0.0] * (len(prompts) - 1)


def raises(prompts, responses, query_ids, response_ids):
    raise RuntimeError("the reward service is down")
