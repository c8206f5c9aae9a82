"""The drivers (``train``, ``sample``, ``eval``) and what they share: the step, the update, the held-out
evaluation, the config checks. A command never imports another command."""
