"""Rollouts: the ``Rollout`` record and its batch operations, prompts -> engine -> Rollout, scoring,
prompt order, dynamic sampling."""
