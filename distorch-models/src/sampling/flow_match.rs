//! Flow-matching Euler sampler, as diffusers' `FlowMatchEulerDiscreteScheduler` with a static
//! shift (Wan's sampler: shift 3.0 at 480p, 5.0 at 720p): sigmas from 1 down, shifted by
//! `σ' = s·σ / (1 + (s − 1)·σ)`, timesteps `σ · 1000`, and `x ← x + (σ_next − σ) · v`.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::error::Error;

/// The fields of a diffusers `FlowMatchEulerDiscreteScheduler` config this sampler reads;
/// options it does not implement are refused by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchConfig {
    /// Training timesteps.
    pub num_train_timesteps: usize,
    /// The static shift.
    pub shift: f64,
    /// Resolution-dependent shifting: not supported.
    pub use_dynamic_shifting: bool,
    /// Not supported.
    pub invert_sigmas: bool,
    /// Not supported.
    pub shift_terminal: Option<f64>,
    /// Not supported.
    pub use_karras_sigmas: bool,
    /// Not supported.
    pub use_exponential_sigmas: bool,
    /// Not supported.
    pub use_beta_sigmas: bool,
    /// Not supported.
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchConfig {
    /// A static `shift` over 1000 training steps.
    pub fn with_shift(shift: f64) -> FlowMatchConfig {
        FlowMatchConfig {
            shift,
            ..FlowMatchConfig::default()
        }
    }

    /// Reads a `scheduler_config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<FlowMatchConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), FlowMatchConfig::check)
    }

    /// Refuses the options this sampler does not implement.
    pub fn check(&self) -> Result<(), Error> {
        let refused = [
            ("use_dynamic_shifting", self.use_dynamic_shifting),
            ("invert_sigmas", self.invert_sigmas),
            ("shift_terminal", self.shift_terminal.is_some()),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, on)| *on) {
            return Err(Error::Unsupported {
                field,
                value: "set".into(),
                reason: "the flow-matching sampler implements a static shift only",
            });
        }
        if self.shift.is_nan() || self.shift <= 0.0 || self.num_train_timesteps == 0 {
            return Err(Error::Unsupported {
                field: "shift",
                value: self.shift.to_string(),
                reason: "must be positive, with at least one training step",
            });
        }
        Ok(())
    }
}

/// The flow-matching Euler sampler over `steps` steps.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl FlowMatchEuler {
    /// The schedule for `steps` steps (diffusers' `set_timesteps`: the shift is applied to
    /// the training schedule's ends and again to the steps between them, as there).
    pub fn new(config: &FlowMatchConfig, steps: usize) -> Result<FlowMatchEuler, Error> {
        config.check()?;
        if steps == 0 {
            return Err(Error::Input {
                input: "steps",
                reason: "at least one step".into(),
            });
        }
        let n = config.num_train_timesteps as f64;
        let s = config.shift;
        let shifted = |sigma: f64| s * sigma / (1.0 + (s - 1.0) * sigma);
        // The training schedule's ends, in f32 as diffusers keeps them.
        let sigma_max = shifted(1.0) as f32;
        let sigma_min = shifted(f64::from((1.0 / n) as f32)) as f32;
        let (t_max, t_min) = (f64::from(sigma_max) * n, f64::from(sigma_min) * n);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = if steps == 1 {
                    t_max
                } else {
                    t_max + (t_min - t_max) * i as f64 / (steps - 1) as f64
                };
                shifted(t / n) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|&x| x * n as f32).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEuler { timesteps, sigmas })
    }

    /// Steps.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timestep given to the model at step `i`.
    pub fn timestep(&self, i: usize) -> f32 {
        self.timesteps[i]
    }

    /// The timesteps.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The sigmas, with the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The sample after step `i`: `sample + (σ_{i+1} − σ_i) · velocity`.
    pub fn step<B: Backend, const D: usize>(
        &self,
        velocity: Tensor<B, D>,
        i: usize,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        sample + velocity * f64::from(dt)
    }
}
