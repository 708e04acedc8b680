//! Text to image with a loaded [`StableDiffusion`]: prompts through the tokenizer(s) and text
//! encoder(s) (SDXL: both encoders' penultimate layers and the pooled embedding, size
//! conditioning), classifier-free guidance with the conditional and unconditional rows in one
//! batch, a [`Scheduler`], an optional ControlNet, and the VAE decode — as diffusers'
//! `StableDiffusionPipeline` / `StableDiffusionXLPipeline` compute them.
//!
//! The library never prints: progress goes to a callback and to `tracing`.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::runtime::move_to;

use crate::error::Error;
use crate::sampling::scheduler::{SamplerKind, Scheduler, SchedulerConfig};
use crate::sd::checkpoint::StableDiffusion;
use crate::sd::controlnet::{ControlNetInput, ControlNetModel};
use crate::sd::unet::UnetInput;
use crate::text::tokenizer::{ClipTokenizer, MAX_LENGTH};

/// A ControlNet and its hint for one generation.
pub struct Control<'a, B: Backend> {
    /// The ControlNet.
    pub model: &'a ControlNetModel<B>,
    /// The hint image, [1, 3, height, width], values in [0, 1].
    pub hint: Tensor<B, 4>,
    /// `conditioning_scale`.
    pub strength: f32,
}

/// What to generate.
pub struct Txt2Img<'a, B: Backend> {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (the unconditional row of classifier-free guidance).
    pub negative: String,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale; 1 disables classifier-free guidance (one row per step).
    pub cfg: f64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// The scheduler configuration (a diffusers folder's `scheduler/scheduler_config.json`,
    /// or SD 1.5's by default; set `prediction_type` for v-prediction models).
    pub scheduler: SchedulerConfig,
    /// Seed of the initial noise and the ancestral sampler's noise.
    pub seed: u64,
    /// Image width in pixels (a multiple of the VAE's and UNet's downsampling).
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Initial latents to use instead of seeded noise, unscaled ([1, C, h, w]).
    pub latents: Option<Tensor<B, 4>>,
    /// An optional ControlNet.
    pub control: Option<Control<'a, B>>,
}

impl<B: Backend> Txt2Img<'_, B> {
    /// A request with diffusers' defaults: no negative prompt, 20 steps, guidance 7.5,
    /// Euler, seed 0, 512 × 512.
    pub fn new(prompt: impl Into<String>) -> Self {
        Txt2Img {
            prompt: prompt.into(),
            negative: String::new(),
            steps: 20,
            cfg: 7.5,
            sampler: SamplerKind::Euler,
            scheduler: SchedulerConfig::default(),
            seed: 0,
            width: 512,
            height: 512,
            latents: None,
            control: None,
        }
    }
}

/// Where a generation is.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Prompts encoded.
    Encoded {
        /// Time taken.
        elapsed: Duration,
    },
    /// A denoising step finished.
    Step {
        /// Steps done.
        done: usize,
        /// Steps in all.
        of: usize,
        /// This step's time.
        elapsed: Duration,
    },
    /// The image is decoded.
    Decoded {
        /// Time taken.
        elapsed: Duration,
    },
}

/// A generated image.
pub struct Generated<B: Backend> {
    /// The final latents, [1, C, h, w] (unscaled, as the UNet sees them).
    pub latents: Tensor<B, 4>,
    /// The image, [1, 3, height, width], values in [0, 1].
    pub image: Tensor<B, 4>,
    /// Each denoising step's time.
    pub step_times: Vec<Duration>,
}

/// The text conditioning of one prompt.
struct Encoded<B: Backend> {
    context: Tensor<B, 3>,
    pooled: Option<Tensor<B, 2>>,
}

/// A request's conditioning, batched as the UNet takes it.
struct Conditioning<B: Backend> {
    context: Tensor<B, 3>,
    pooled: Option<Tensor<B, 2>>,
    time_ids: Option<Tensor<B, 2>>,
    /// 2 with classifier-free guidance (unconditional row first), else 1.
    rows: usize,
    guided: bool,
}

impl<B: Backend> StableDiffusion<B> {
    /// Generates one image. `tokenizers` has one tokenizer per text encoder (SDXL's second
    /// pads with `!`).
    pub fn txt2img(
        &self,
        tokenizers: &[ClipTokenizer],
        request: &Txt2Img<'_, B>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated<B>, Error> {
        let r = request;
        let (h, w) = self.latent_size(tokenizers, r)?;
        let device = self.unet.streamer().store().compute().clone();

        let start = Instant::now();
        let cond = self.condition(tokenizers, r, &device)?;
        progress(Progress::Encoded {
            elapsed: start.elapsed(),
        });

        let mut scheduler = Scheduler::<B>::new(r.sampler, &r.scheduler, r.steps)?;
        let channels = self.unet.config().in_channels;
        let mut noise = Gaussian::new(r.seed);
        let x = match &r.latents {
            Some(l) if l.dims() == [1, channels, h, w] => move_to(l.clone(), &device),
            Some(l) => {
                return Err(Error::Input {
                    input: "latents",
                    reason: format!("shape {:?}, expected [1, {channels}, {h}, {w}]", l.dims()),
                });
            }
            None => noise.tensor([1, channels, h, w], &device),
        };
        let mut x = x.mul_scalar(scheduler.init_noise_sigma());
        let hint = r.control.as_ref().map(|c| {
            let hint = move_to(c.hint.clone(), &device);
            Tensor::cat(vec![hint; cond.rows], 0)
        });
        let mut step_times = Vec::with_capacity(r.steps);
        for i in 0..scheduler.steps() {
            let t0 = Instant::now();
            let scaled = scheduler.scale_model_input(x.clone(), i);
            let t = scheduler.timestep(i) as f32;
            let out = self.predict(&cond, r, hint.as_ref(), scaled, t)?;
            let step_noise = r
                .sampler
                .needs_noise()
                .then(|| noise.tensor([1, channels, h, w], &device));
            x = scheduler.step(out, i, x, step_noise)?;
            // Force the step to finish so its time is real on asynchronous backends.
            let _ = x.clone().sum().into_scalar();
            let elapsed = t0.elapsed();
            step_times.push(elapsed);
            tracing::info!(
                step = i + 1,
                of = r.steps,
                ms = elapsed.as_millis() as u64,
                "step"
            );
            progress(Progress::Step {
                done: i + 1,
                of: r.steps,
                elapsed,
            });
        }

        let t0 = Instant::now();
        let image = self.decode_latents(&x)?;
        progress(Progress::Decoded {
            elapsed: t0.elapsed(),
        });
        Ok(Generated {
            latents: x,
            image,
            step_times,
        })
    }

    /// Checks the request against the models; returns the latents' height and width.
    fn latent_size(
        &self,
        tokenizers: &[ClipTokenizer],
        r: &Txt2Img<'_, B>,
    ) -> Result<(usize, usize), Error> {
        if tokenizers.len() != self.text_encoders.len() {
            return Err(Error::Input {
                input: "tokenizers",
                reason: format!(
                    "{} tokenizers for {} text encoders",
                    tokenizers.len(),
                    self.text_encoders.len()
                ),
            });
        }
        let vae_scale = 1usize << (self.vae.config().block_out_channels.len() - 1);
        let unet_scale = 1usize << (self.unet.config().block_out_channels.len() - 1);
        let multiple = vae_scale * unet_scale;
        if r.width == 0
            || r.height == 0
            || !r.width.is_multiple_of(multiple)
            || !r.height.is_multiple_of(multiple)
        {
            return Err(Error::Input {
                input: "size",
                reason: format!(
                    "{}×{}: width and height must be positive multiples of {multiple}",
                    r.width, r.height
                ),
            });
        }
        Ok((r.height / vae_scale, r.width / vae_scale))
    }

    /// The image the VAE decodes from latents `x`, in [0, 1].
    fn decode_latents(&self, x: &Tensor<B, 4>) -> Result<Tensor<B, 4>, Error> {
        let vae_device = self.vae.streamer().store().compute().clone();
        let z = move_to(
            x.clone().div_scalar(self.vae.config().scaling_factor),
            &vae_device,
        );
        let image = self.vae.decode(z)?;
        Ok(image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0))
    }

    /// The prompt's (and, with guidance, the negative prompt's) conditioning, batched as the
    /// UNet takes it: unconditional row first.
    fn condition(
        &self,
        tokenizers: &[ClipTokenizer],
        r: &Txt2Img<'_, B>,
        device: &B::Device,
    ) -> Result<Conditioning<B>, Error> {
        let sdxl = self.unet.config().has_text_time();
        let cond = self.encode(tokenizers, &r.prompt, sdxl, device)?;
        let guided = r.cfg != 1.0;
        let uncond = if !guided {
            None
        } else if sdxl && r.negative.is_empty() {
            // SDXL's `force_zeros_for_empty_prompt`.
            Some(Encoded {
                context: cond.context.zeros_like(),
                pooled: cond.pooled.as_ref().map(|p| p.zeros_like()),
            })
        } else {
            Some(self.encode(tokenizers, &r.negative, sdxl, device)?)
        };
        let rows = if guided { 2 } else { 1 };
        let (context, pooled) = match uncond {
            Some(u) => (
                Tensor::cat(vec![u.context, cond.context], 0),
                match (u.pooled, cond.pooled) {
                    (Some(a), Some(b)) => Some(Tensor::cat(vec![a, b], 0)),
                    _ => None,
                },
            ),
            None => (cond.context, cond.pooled),
        };
        let time_ids = sdxl.then(|| {
            let (hh, ww) = (r.height as f32, r.width as f32);
            let one = [hh, ww, 0.0, 0.0, hh, ww];
            let ids: Vec<f32> = (0..rows).flat_map(|_| one).collect();
            Tensor::<B, 2>::from_data(TensorData::new(ids, [rows, 6]), device)
        });
        Ok(Conditioning {
            context,
            pooled,
            time_ids,
            rows,
            guided,
        })
    }

    /// The UNet's guided prediction for the scaled latents `scaled` at timestep `t`, with the
    /// ControlNet's residuals when the request has one.
    fn predict(
        &self,
        cond: &Conditioning<B>,
        r: &Txt2Img<'_, B>,
        hint: Option<&Tensor<B, 4>>,
        scaled: Tensor<B, 4>,
        t: f32,
    ) -> Result<Tensor<B, 4>, Error> {
        let batch = Tensor::cat(vec![scaled; cond.rows], 0);
        let mut input = UnetInput::new(batch, vec![t], cond.context.clone());
        if let (Some(p), Some(ids)) = (&cond.pooled, &cond.time_ids) {
            input = input.with_text_time(p.clone(), ids.clone());
        }
        if let (Some(c), Some(hint)) = (&r.control, hint) {
            let residuals = c
                .model
                .forward(ControlNetInput::for_unet(&input, hint.clone()).with_scale(c.strength))?;
            input = residuals.apply(input);
        }
        let out = self.unet.forward(input)?;
        Ok(if cond.guided {
            let u = out.clone().narrow(0, 0, 1);
            let c = out.narrow(0, 1, 1);
            u.clone() + (c - u).mul_scalar(r.cfg)
        } else {
            out
        })
    }

    /// One prompt's conditioning on `device`.
    fn encode(
        &self,
        tokenizers: &[ClipTokenizer],
        prompt: &str,
        sdxl: bool,
        device: &B::Device,
    ) -> Result<Encoded<B>, Error> {
        let mut contexts = Vec::new();
        let mut pooled = None;
        for (encoder, tokenizer) in self.text_encoders.iter().zip(tokenizers) {
            let (ids, _) = tokenizer.encode_padded(prompt, MAX_LENGTH);
            let out = encoder.forward(&ids, 1)?;
            let n = out.hidden_states.len();
            let context = if sdxl {
                // Both encoders' penultimate layers, without the final norm.
                out.hidden_states[n - 2].clone()
            } else if self.family.penultimate_text_layer() {
                // The single-file OpenCLIP encoder has all 24 layers; SD 2.x conditions on
                // the penultimate one through the final norm (diffusers drops the last layer).
                encoder.final_norm(out.hidden_states[n - 2].clone())?
            } else {
                out.last_hidden_state
            };
            contexts.push(move_to(context, device));
            if let Some(p) = out.text_embeds {
                pooled = Some(move_to(p, device));
            }
        }
        if sdxl && pooled.is_none() {
            return Err(Error::Input {
                input: "text encoders",
                reason: "an SDXL UNet needs a pooled text embedding (an encoder with a \
                         projection)"
                    .into(),
            });
        }
        Ok(Encoded {
            context: Tensor::cat(contexts, 2),
            pooled: if sdxl { pooled } else { None },
        })
    }
}

/// Gaussian noise from a seed, the same on every platform and backend: SplitMix64 and the
/// Box–Muller transform.
pub struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Gaussian {
        Gaussian {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// One standard normal sample.
    pub fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        // Uniform in (0, 1]: never 0, so the logarithm is finite.
        let u1 = ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// A tensor of standard normal samples.
    pub fn tensor<B: Backend>(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.sample() as f32).collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// An image tensor ([1, 3, h, w] in [0, 1]) as 8-bit RGB, rounded as diffusers'
/// `numpy_to_pil`.
pub fn to_rgb8<B: Backend>(image: Tensor<B, 4>) -> Result<image::RgbImage, Error> {
    let [n, c, h, w] = image.dims();
    if n != 1 || c != 3 {
        return Err(Error::Input {
            input: "image",
            reason: format!("shape {:?}, expected [1, 3, h, w]", image.dims()),
        });
    }
    let values = image
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::Input {
            input: "image",
            reason: format!("{e:?}"),
        })?;
    let mut out = image::RgbImage::new(w as u32, h as u32);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let at = |ch: usize| values[(ch * h + y as usize) * w + x as usize];
        *p = image::Rgb([0, 1, 2].map(|ch| (at(ch).clamp(0.0, 1.0) * 255.0).round() as u8));
    }
    Ok(out)
}
