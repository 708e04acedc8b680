//! Flow-matching Euler sampler, as diffusers' `FlowMatchEulerDiscreteScheduler`: sigmas from
//! 1 down, shifted statically by `σ' = s·σ / (1 + (s − 1)·σ)` (Wan's sampler: shift 3.0 at
//! 480p, 5.0 at 720p; FLUX.1-schnell: 1.0) or by the resolution-dependent shift
//! `σ' = eᵘ / (eᵘ + (1/σ − 1))` with `μ` from the image's token count (FLUX.1-dev's
//! `use_dynamic_shifting`), timesteps `σ · 1000`, and `x ← x + (σ_next − σ) · v`.

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
    /// Resolution-dependent shifting (the shift `μ` from the image's token count, see
    /// [`FlowMatchEuler::flux`]).
    pub use_dynamic_shifting: bool,
    /// `μ` at `base_image_seq_len` tokens.
    pub base_shift: f64,
    /// `μ` at `max_image_seq_len` tokens.
    pub max_shift: f64,
    /// The token count of `base_shift`.
    pub base_image_seq_len: usize,
    /// The token count of `max_shift`.
    pub max_image_seq_len: usize,
    /// How `μ` shifts the sigmas.
    pub time_shift_type: TimeShift,
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
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: TimeShift::Exponential,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

/// How the dynamic shift `μ` moves a sigma (diffusers' `time_shift_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeShift {
    /// `eᵘ / (eᵘ + (1/σ − 1))`.
    Exponential,
    /// `μ / (μ + (1/σ − 1))`.
    Linear,
}

impl FlowMatchConfig {
    /// FLUX.1-dev's scheduler: dynamic shifting between 0.5 (256 tokens) and 1.15 (4,096).
    pub fn flux_dev() -> FlowMatchConfig {
        FlowMatchConfig {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..FlowMatchConfig::default()
        }
    }

    /// The dynamic shift `μ` for an image of `tokens` packed latent tokens: linear between
    /// (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`) (diffusers'
    /// `calculate_shift`).
    pub fn mu(&self, tokens: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        tokens as f64 * m + b
    }

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
                reason: "the flow-matching sampler implements static and dynamic shifts only",
            });
        }
        if self.use_dynamic_shifting && self.max_image_seq_len == self.base_image_seq_len {
            return Err(Error::Unsupported {
                field: "max_image_seq_len",
                value: self.max_image_seq_len.to_string(),
                reason: "must differ from base_image_seq_len (the dynamic shift is a line)",
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
    /// A dynamically shifting configuration needs its `μ`: use [`FlowMatchEuler::flux`] or
    /// [`FlowMatchEuler::with_sigmas`].
    pub fn new(config: &FlowMatchConfig, steps: usize) -> Result<FlowMatchEuler, Error> {
        config.check()?;
        check_steps(steps)?;
        if config.use_dynamic_shifting {
            return Err(Error::Input {
                input: "mu",
                reason: "a dynamically shifting schedule needs the image's token count \
                         (FlowMatchEuler::flux)"
                    .into(),
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

    /// The schedule `FluxPipeline` uses for `steps` steps on an image of `tokens` packed
    /// latent tokens: sigmas evenly from 1 to `1 / steps`, shifted by the configuration
    /// (dynamically with `μ` = [`FlowMatchConfig::mu`]`(tokens)`, or statically).
    pub fn flux(
        config: &FlowMatchConfig,
        steps: usize,
        tokens: usize,
    ) -> Result<FlowMatchEuler, Error> {
        check_steps(steps)?;
        let last = 1.0 / steps as f64;
        let sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let f = if steps == 1 {
                    0.0
                } else {
                    i as f64 / (steps - 1) as f64
                };
                (1.0 + (last - 1.0) * f) as f32
            })
            .collect();
        FlowMatchEuler::with_sigmas(config, &sigmas, Some(config.mu(tokens)))
    }

    /// The schedule from given (unshifted) `sigmas`, shifted by the configuration — with
    /// `mu` when it shifts dynamically — as diffusers' `set_timesteps(sigmas=.., mu=..)`
    /// (in f32, as there).
    pub fn with_sigmas(
        config: &FlowMatchConfig,
        sigmas: &[f32],
        mu: Option<f64>,
    ) -> Result<FlowMatchEuler, Error> {
        config.check()?;
        check_steps(sigmas.len())?;
        if let Some(bad) = sigmas.iter().find(|s| !(**s > 0.0 && **s <= 1.0)) {
            return Err(Error::Input {
                input: "sigmas",
                reason: format!("{bad} is outside (0, 1]"),
            });
        }
        let mut sigmas: Vec<f32> = match (config.use_dynamic_shifting, mu) {
            (true, None) => {
                return Err(Error::Input {
                    input: "mu",
                    reason: "a dynamically shifting schedule needs mu".into(),
                });
            }
            (true, Some(mu)) => {
                let e = match config.time_shift_type {
                    TimeShift::Exponential => mu.exp() as f32,
                    TimeShift::Linear => mu as f32,
                };
                sigmas.iter().map(|&s| e / (e + (1.0 / s - 1.0))).collect()
            }
            (false, _) => {
                let shift = config.shift as f32;
                sigmas
                    .iter()
                    .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
                    .collect()
            }
        };
        let n = config.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| s * n).collect();
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

/// At least one step.
fn check_steps(steps: usize) -> Result<(), Error> {
    if steps == 0 {
        return Err(Error::Input {
            input: "steps",
            reason: "at least one step".into(),
        });
    }
    Ok(())
}
