//! Samplers as diffusers' schedulers: Euler, Euler ancestral, DDIM (η = 0) and DPM++ 2M with
//! Karras sigmas, for ε- and v-prediction, on a scaled-linear or linear beta schedule.
//!
//! A [`Scheduler`] is made for a number of steps; for each step `i` the caller evaluates the
//! model at [`Scheduler::timestep`]`(i)` on [`Scheduler::scale_model_input`] and hands the
//! output to [`Scheduler::step`]. Randomness (the ancestral sampler's noise) comes from the
//! caller, so runs are reproducible from a seed.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::error::Error;

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// diffusers' `EulerDiscreteScheduler` (no churn).
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler`: Euler plus fresh noise each step.
    EulerAncestral,
    /// diffusers' `DDIMScheduler`, deterministic (η = 0).
    Ddim,
    /// diffusers' `DPMSolverMultistepScheduler` with `use_karras_sigmas`, second order
    /// (`dpmsolver++`, midpoint), first order on the first and last steps.
    DpmPp2mKarras,
}

impl SamplerKind {
    /// Parses the names the CLI takes: `euler`, `euler_a`, `ddim`, `dpmpp_2m_karras`.
    pub fn from_name(name: &str) -> Result<SamplerKind, Error> {
        Ok(match name {
            "euler" => SamplerKind::Euler,
            "euler_a" | "euler_ancestral" => SamplerKind::EulerAncestral,
            "ddim" => SamplerKind::Ddim,
            "dpmpp_2m_karras" | "dpm++_2m_karras" => SamplerKind::DpmPp2mKarras,
            other => {
                return Err(Error::UnknownSampler {
                    name: other.to_owned(),
                });
            }
        })
    }

    /// Whether [`Scheduler::step`] needs noise.
    pub fn needs_noise(self) -> bool {
        self == SamplerKind::EulerAncestral
    }

    /// diffusers' default timestep spacing for this scheduler class.
    fn default_spacing(self) -> TimestepSpacing {
        match self {
            SamplerKind::Ddim => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        }
    }
}

/// How β grows over the training steps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β linear in the step.
    Linear,
    /// √β linear in the step (Stable Diffusion's).
    ScaledLinear,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// The velocity v (SD 2.x 768 models).
    VPrediction,
}

/// Where the sampling timesteps fall in the training schedule (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from the last training step to the first.
    Linspace,
    /// Multiples of `num_train_timesteps / steps`, plus `steps_offset`.
    Leading,
    /// Evenly back from the last training step.
    Trailing,
}

/// The sigma interpolation diffusers' Euler schedulers support here (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear in the timestep.
    Linear,
}

/// The timestep type diffusers' Euler schedulers support here (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// Integer training steps.
    Discrete,
}

/// The fields of a diffusers `scheduler_config.json` the samplers use (defaults: Stable
/// Diffusion 1.5's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // Field names and meanings are diffusers'.
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    /// Absent: the scheduler class's default.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub rescale_betas_zero_snr: bool,
    pub trained_betas: Option<serde_json::Value>,
    pub interpolation_type: Option<InterpolationType>,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub timestep_type: Option<TimestepType>,
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 1,
            set_alpha_to_one: false,
            timestep_spacing: None,
            rescale_betas_zero_snr: false,
            trained_betas: None,
            interpolation_type: None,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            timestep_type: None,
            thresholding: false,
        }
    }
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<SchedulerConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), SchedulerConfig::check)
    }

    /// Rejects values the samplers do not implement (unknown names of the enumerated fields
    /// are refused while reading, naming the field).
    pub fn check(&self) -> Result<(), Error> {
        let bad = |field, value: &str, reason| {
            Err(Error::Unsupported {
                field,
                value: value.to_owned(),
                reason,
            })
        };
        let flags = [
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("thresholding", self.thresholding),
        ];
        if let Some((field, _)) = flags.into_iter().find(|(_, on)| *on) {
            return bad(field, "true", "not implemented; must be false");
        }
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("trained_betas", "a list", "not implemented; must be null");
        }
        if self.num_train_timesteps < 2 {
            return bad(
                "num_train_timesteps",
                &self.num_train_timesteps.to_string(),
                "at least 2",
            );
        }
        Ok(())
    }

    fn v_prediction(&self) -> bool {
        self.prediction_type == PredictionType::VPrediction
    }

    /// ᾱ_t for every training step, in f32 as diffusers computes it.
    fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let linear = self.beta_schedule == BetaSchedule::Linear;
        let (a, b) = if linear {
            (self.beta_start, self.beta_end)
        } else {
            (self.beta_start.sqrt(), self.beta_end.sqrt())
        };
        let mut acc = 1f32;
        (0..n)
            .map(|i| {
                let x = (a + (b - a) * i as f64 / (n - 1) as f64) as f32;
                let beta = if linear { x } else { x * x };
                acc *= 1.0 - beta;
                acc
            })
            .collect()
    }
}

/// A sampler set up for a number of steps, with the state multistep samplers carry.
pub struct Scheduler<B: Backend> {
    kind: SamplerKind,
    v_prediction: bool,
    timesteps: Vec<f64>,
    /// Noise levels per step, plus the final one (Euler family, DPM++).
    sigmas: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha: f64,
    step_ratio: usize,
    init_noise_sigma: f64,
    /// DPM++: the previous step's data prediction.
    previous: Option<Tensor<B, 4>>,
}

impl<B: Backend> Scheduler<B> {
    /// `kind` for `steps` denoising steps under `config`.
    pub fn new(
        kind: SamplerKind,
        config: &SchedulerConfig,
        steps: usize,
    ) -> Result<Scheduler<B>, Error> {
        config.check()?;
        let n = config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::Input {
                input: "steps",
                reason: format!("{steps} steps; between 1 and {n}"),
            });
        }
        let ac = config.alphas_cumprod();
        let spacing = config.timestep_spacing.unwrap_or(kind.default_spacing());
        let mut timesteps = spaced_timesteps(kind, spacing, config, steps);
        // σ_t = √((1 − ᾱ)/ᾱ), from the f32 ᾱ as diffusers.
        let full: Vec<f64> = ac
            .iter()
            .map(|&a| f64::from(((1.0 - a) / a).sqrt()))
            .collect();
        let mut sigmas = sample_sigmas(kind, &full, &mut timesteps, steps);
        if kind != SamplerKind::Ddim {
            sigmas.push(0.0);
            // Stored in f32 by diffusers.
            for s in &mut sigmas {
                *s = f64::from(*s as f32);
            }
        }
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match kind {
            SamplerKind::Ddim | SamplerKind::DpmPp2mKarras => 1.0,
            _ if matches!(
                spacing,
                TimestepSpacing::Linspace | TimestepSpacing::Trailing
            ) =>
            {
                max_sigma
            }
            _ => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        let final_alpha = if config.set_alpha_to_one {
            1.0
        } else {
            f64::from(ac[0])
        };
        tracing::debug!(?kind, steps, ?timesteps, "scheduler");
        Ok(Scheduler {
            kind,
            v_prediction: config.v_prediction(),
            timesteps,
            sigmas,
            alphas_cumprod: ac,
            final_alpha,
            step_ratio: n / steps,
            init_noise_sigma,
            previous: None,
        })
    }

    /// Which sampler.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The model's timestep at step `i`.
    pub fn timestep(&self, i: usize) -> f64 {
        self.timesteps[i.min(self.timesteps.len() - 1)]
    }

    /// Every step's timestep.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Noise levels (Euler family and DPM++), with the final 0; empty for DDIM.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The standard deviation to scale the initial Gaussian noise by.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The model's input at step `i` (the Euler family divides by √(σ² + 1)).
    pub fn scale_model_input(&self, sample: Tensor<B, 4>, i: usize) -> Tensor<B, 4> {
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let s = self.sigmas[i];
                sample.div_scalar((s * s + 1.0).sqrt())
            }
            SamplerKind::Ddim | SamplerKind::DpmPp2mKarras => sample,
        }
    }

    /// One step from `sample` at step `i` given the model's output there. `noise` (a
    /// standard normal tensor of the sample's shape) is required by the ancestral sampler and
    /// ignored by the others. Steps must be taken in order (DPM++ remembers the previous one).
    pub fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 4>, Error> {
        if i >= self.steps() {
            return Err(Error::Input {
                input: "step",
                reason: format!("step {i} of {}", self.steps()),
            });
        }
        Ok(match self.kind {
            SamplerKind::Euler => {
                let (s, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.x0_from_sigma(model_output, sample.clone(), s);
                let d = (sample.clone() - x0).div_scalar(s);
                sample + d.mul_scalar(next - s)
            }
            SamplerKind::EulerAncestral => {
                let noise = noise.ok_or_else(|| Error::Input {
                    input: "noise",
                    reason: "the ancestral sampler needs noise at every step".into(),
                })?;
                let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                let down = (to * to - up * up).sqrt();
                let x0 = self.x0_from_sigma(model_output, sample.clone(), from);
                let d = (sample.clone() - x0).div_scalar(from);
                sample + d.mul_scalar(down - from) + noise.mul_scalar(up)
            }
            SamplerKind::Ddim => {
                let t = self.timesteps[i] as usize;
                let a_t = f64::from(self.alphas_cumprod[t]);
                let a_prev = t
                    .checked_sub(self.step_ratio)
                    .map_or(self.final_alpha, |p| f64::from(self.alphas_cumprod[p]));
                let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
                let (x0, eps) = if self.v_prediction {
                    (
                        sample.clone().mul_scalar(sa) - model_output.clone().mul_scalar(sb),
                        model_output.mul_scalar(sa) + sample.mul_scalar(sb),
                    )
                } else {
                    (
                        (sample - model_output.clone().mul_scalar(sb)).div_scalar(sa),
                        model_output,
                    )
                };
                x0.mul_scalar(a_prev.sqrt()) + eps.mul_scalar((1.0 - a_prev).sqrt())
            }
            SamplerKind::DpmPp2mKarras => self.dpm_step(model_output, i, sample),
        })
    }

    /// The Euler family's data prediction at noise level `s`.
    fn x0_from_sigma(&self, out: Tensor<B, 4>, sample: Tensor<B, 4>, s: f64) -> Tensor<B, 4> {
        if self.v_prediction {
            out.mul_scalar(-s / (s * s + 1.0).sqrt()) + sample.div_scalar(s * s + 1.0)
        } else {
            sample - out.mul_scalar(s)
        }
    }

    fn dpm_step(&mut self, out: Tensor<B, 4>, i: usize, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        // α_t = 1/√(σ²+1), σ_t = σ·α_t, λ = ln α_t − ln σ_t.
        let at = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let lambda = |(a, s): (f64, f64)| a.ln() - s.ln();
        let s0 = at(self.sigmas[i]);
        let x0 = if self.v_prediction {
            sample.clone().mul_scalar(s0.0) - out.mul_scalar(s0.1)
        } else {
            (sample.clone() - out.mul_scalar(s0.1)).div_scalar(s0.0)
        };
        let t = at(self.sigmas[i + 1]);
        let last = i + 1 == self.steps();
        let previous = self.previous.replace(x0.clone());
        // The final σ is 0: its λ is infinite and the step lands on the data prediction.
        if t.1 == 0.0 {
            return x0;
        }
        let h = lambda(t) - lambda(s0);
        let first = (t.1 / s0.1, t.0 * ((-h).exp() - 1.0));
        match previous {
            Some(prev) if !last && i > 0 => {
                let s1 = at(self.sigmas[i - 1]);
                let r0 = (lambda(s0) - lambda(s1)) / h;
                let d1 = (x0.clone() - prev).div_scalar(r0);
                sample.mul_scalar(first.0) - x0.mul_scalar(first.1) - d1.mul_scalar(0.5 * first.1)
            }
            _ => sample.mul_scalar(first.0) - x0.mul_scalar(first.1),
        }
    }
}

/// Linear interpolation of `table` (indexed by training step) at fractional step `t`.
fn interp(t: f64, table: &[f64]) -> f64 {
    let t = t.clamp(0.0, (table.len() - 1) as f64);
    let lo = t.floor() as usize;
    let hi = (lo + 1).min(table.len() - 1);
    let w = t - lo as f64;
    table[lo] * (1.0 - w) + table[hi] * w
}

/// diffusers' `_sigma_to_t`: the fractional training step whose σ is `sigma`, interpolated
/// in log σ.
fn sigma_to_t(sigma: f64, table: &[f64]) -> f64 {
    let logs: Vec<f64> = table.iter().map(|s| s.ln()).collect();
    let ls = sigma.max(1e-10).ln();
    let low = logs
        .iter()
        .rposition(|&l| ls - l >= 0.0)
        .unwrap_or(0)
        .min(logs.len() - 2);
    let (lo, hi) = (logs[low], logs[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The sampling timesteps for `spacing`, as diffusers' schedulers space them.
fn spaced_timesteps(
    kind: SamplerKind,
    spacing: TimestepSpacing,
    config: &SchedulerConfig,
    steps: usize,
) -> Vec<f64> {
    let n = config.num_train_timesteps;
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            (0..steps)
                .map(|i| (n as f64 - i as f64 * ratio).round() - 1.0)
                .collect()
        }
        TimestepSpacing::Linspace => (0..steps)
            .rev()
            .map(|i| {
                let t = if steps == 1 {
                    0.0
                } else {
                    (n - 1) as f64 * i as f64 / (steps - 1) as f64
                };
                if kind == SamplerKind::Ddim {
                    t.round()
                } else {
                    t
                }
            })
            .collect(),
    }
}

/// The noise levels of `kind` at `timesteps` (σ of every training step in `full`); the
/// Karras schedule replaces the timesteps with its own.
fn sample_sigmas(
    kind: SamplerKind,
    full: &[f64],
    timesteps: &mut Vec<f64>,
    steps: usize,
) -> Vec<f64> {
    let n = full.len();
    match kind {
        SamplerKind::Ddim => Vec::new(),
        SamplerKind::DpmPp2mKarras => {
            let (lo, hi) = (full[0], full[n - 1]);
            let rho = 7.0;
            let (min_inv, max_inv) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
            let karras: Vec<f64> = (0..steps)
                .map(|i| {
                    let ramp = if steps == 1 {
                        0.0
                    } else {
                        i as f64 / (steps - 1) as f64
                    };
                    (max_inv + ramp * (min_inv - max_inv)).powf(rho)
                })
                .collect();
            *timesteps = karras
                .iter()
                .map(|&s| sigma_to_t(s, full).round())
                .collect();
            karras
        }
        _ => timesteps.iter().map(|&t| interp(t, full)).collect(),
    }
}
