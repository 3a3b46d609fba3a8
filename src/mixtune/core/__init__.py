"""The core: what the stages compute with. Reading sources, prompts, the trainer (one way to tune), scoring
(one way to score), metrics, the trial (train at a share and score it, cached), the search's answer, the served model."""
