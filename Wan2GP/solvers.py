"""The original's sample solver names (``sample_solver``), apart from their schedulers (Wan2GP.schedulers) so
that validating a task does not import diffusers (the ingress never runs a model)."""

SOLVERS = ("euler", "unipc", "dpm++", "dpm++_sde", "lcm", "causvid")
STOCHASTIC_SOLVERS = frozenset({"dpm++_sde"})  # their steps draw noise: seeded from the task's seed
