"""Flow matching on the linear path (t = 0 noise, t = 1 data): path, loss, samplers, guidance."""

from gae_jax.flow.guidance import autoguidance_velocity, cfg_velocity
from gae_jax.flow.path import (flow_loss, interpolate, sample_path, sample_t,
                               target_velocity, time_shift)
from gae_jax.flow.samplers import (SDE_LAST_STEPS, SDE_T0, SDE_T1, VelocityFn,
                                   class_uniform_labels, random_labels, sample, sample_ode,
                                   sample_sde, sde_drift, time_grid)

__all__ = [
    "autoguidance_velocity", "cfg_velocity", "flow_loss", "interpolate", "sample_path",
    "sample_t", "target_velocity", "time_shift", "SDE_LAST_STEPS", "SDE_T0", "SDE_T1",
    "VelocityFn", "class_uniform_labels", "random_labels", "sample", "sample_ode",
    "sample_sde", "sde_drift", "time_grid",
]
