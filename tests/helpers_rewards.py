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


class RaisesOnCall:
    """Scores 1.0 until its ``call``-th call, which raises: call 1 is the start-up probe, call k + 2 PPO step k.
    Use with ``reward.fn._partial_=false +reward.fn.call=<n>``."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, prompts, responses, query_ids, response_ids):
        self.calls += 1
        if self.calls >= self.call:
            raise RuntimeError(f"the reward service went down at call {self.calls}")
        return [1.0 for _ in prompts]


class WaitsForFile:
    """On its first call (the start-up probe) writes ``started``, then waits (up to 120 s) until ``go`` exists: a run
    held at a known point while a test starts another process. Use with ``reward.fn._partial_=false``."""

    def __init__(self, started: str, go: str) -> None:
        self.started, self.go = started, go

    def __call__(self, prompts, responses, query_ids, response_ids):
        import os
        import time

        if not os.path.exists(self.started):
            open(self.started, "w").close()
            deadline = time.time() + 120
            while not os.path.exists(self.go) and time.time() < deadline:
                time.sleep(0.05)
        return [float(len(r) % 3) for r in responses]
