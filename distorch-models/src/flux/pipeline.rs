//! Text to image with FLUX.1 ([`Flux::txt2img`]), as diffusers' `FluxPipeline`: the prompt
//! through CLIP (its pooled output) and T5 (its states, padding attended to, as there), seeded
//! latents packed 2×2 into tokens, flow-matching Euler with FLUX.1-dev's resolution-dependent
//! shift (or schnell's static one), the guidance value embedded (dev) and optionally true
//! classifier-free guidance with a negative prompt, latents unpacked, un-scaled and shifted
//! for the VAE, decoded.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::runtime::move_to;

use crate::error::Error;
use crate::flux::dit::{FluxInput, FluxTransformer, image_ids};
use crate::sampling::flow_match::{FlowMatchConfig, FlowMatchEuler};
use crate::sd::pipeline::{Gaussian, Progress};
use crate::sd::vae::AutoencoderKl;
use crate::text::clip::ClipTextModel;
use crate::text::t5_tokenizer::T5Tokenizer;
use crate::text::tokenizer::ClipTokenizer;
use crate::text::umt5::Umt5Encoder;

/// CLIP's context, in tokens (`FluxPipeline.tokenizer_max_length`).
const CLIP_TOKENS: usize = 77;

/// The models of a FLUX.1 text-to-image pipeline.
pub struct Flux<B: Backend> {
    /// CLIP-L's tokenizer.
    pub clip_tokenizer: ClipTokenizer,
    /// CLIP-L: its pooled output conditions the transformer.
    pub clip: ClipTextModel<B>,
    /// T5's tokenizer.
    pub t5_tokenizer: T5Tokenizer,
    /// T5-XXL (v1.1): its states are the transformer's text tokens.
    pub t5: Umt5Encoder<B>,
    /// The transformer.
    pub transformer: FluxTransformer<B>,
    /// The 16-channel VAE.
    pub vae: AutoencoderKl<B>,
    /// The scheduler's configuration ([`FlowMatchConfig::flux_dev`] for FLUX.1-dev, the
    /// default (static shift 1) for schnell).
    pub scheduler: FlowMatchConfig,
}

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct FluxTxt2Img<B: Backend> {
    /// The prompt (CLIP and T5 both read it).
    pub prompt: String,
    /// A negative prompt for true classifier-free guidance (used when `true_cfg_scale` > 1).
    pub negative_prompt: Option<String>,
    /// Width in pixels (a multiple of twice the VAE's factor: 16 for FLUX.1).
    pub width: usize,
    /// Height in pixels (likewise).
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// The guidance value FLUX.1-dev embeds (ignored by schnell, which has none).
    pub guidance: f64,
    /// True classifier-free guidance scale (two transformer passes a step when > 1 with a
    /// negative prompt).
    pub true_cfg_scale: f64,
    /// T5 tokens (FLUX.1-dev: 512; schnell: 256).
    pub max_sequence_length: usize,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Initial packed latents instead of seeded noise ([1, tokens, in_channels]).
    pub latents: Option<Tensor<B, 3>>,
}

impl<B: Backend> FluxTxt2Img<B> {
    /// `prompt` with FLUX.1-dev's defaults: 1024×1024, 28 steps, guidance 3.5, 512 T5
    /// tokens, seed 0.
    pub fn new(prompt: impl Into<String>) -> FluxTxt2Img<B> {
        FluxTxt2Img {
            prompt: prompt.into(),
            negative_prompt: None,
            width: 1024,
            height: 1024,
            steps: 28,
            guidance: 3.5,
            true_cfg_scale: 1.0,
            max_sequence_length: 512,
            seed: 0,
            latents: None,
        }
    }
}

/// A generated image.
pub struct FluxImage<B: Backend> {
    /// The final packed latents, [1, tokens, in_channels].
    pub latents: Tensor<B, 3>,
    /// The image, [1, 3, height, width], values in [0, 1].
    pub image: Tensor<B, 4>,
    /// Each denoising step's time.
    pub step_times: Vec<Duration>,
}

/// A prompt's conditioning: T5 states and CLIP's pooled output.
struct Prompt<B: Backend> {
    states: Tensor<B, 3>,
    pooled: Tensor<B, 2>,
}

impl<B: Backend> Flux<B> {
    /// The prompt's T5 states ([1, max_len, d_model]) and CLIP pooled output ([1, hidden]).
    fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<Prompt<B>, Error> {
        let (ids, _) = self.clip_tokenizer.encode_padded(prompt, CLIP_TOKENS);
        let pooled = self.clip.forward(&ids, 1)?.pooled_output;
        let (ids, mask) = self.t5_tokenizer.encode(prompt, max_len)?;
        // FluxPipeline gives T5 no attention mask: padding is attended to.
        let all = vec![1; mask.len()];
        let states = self.t5.forward(&ids, &all, 1)?;
        Ok(Prompt { states, pooled })
    }

    /// Generates an image; `progress` is told when prompts are encoded, after each step and
    /// when the image is decoded.
    pub fn txt2img(
        &self,
        req: &FluxTxt2Img<B>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<FluxImage<B>, Error> {
        let (lh, lw) = self.latent_size(req)?;
        let c = self.transformer.config();
        let tokens = (lh / 2) * (lw / 2);
        let scheduler = FlowMatchEuler::flux(&self.scheduler, req.steps, tokens)?;
        let start = Instant::now();
        let cond = self.encode_prompt(&req.prompt, req.max_sequence_length)?;
        let negative = match &req.negative_prompt {
            Some(n) if req.true_cfg_scale > 1.0 => {
                Some(self.encode_prompt(n, req.max_sequence_length)?)
            }
            _ => None,
        };
        progress(Progress::Encoded {
            elapsed: start.elapsed(),
        });

        // The transformer's device; the text encoders may compute on others.
        let device = self.transformer.streamer().store().compute().clone();
        let to = |p: Prompt<B>| Prompt {
            states: move_to(p.states, &device),
            pooled: move_to(p.pooled, &device),
        };
        let (cond, negative) = (to(cond), negative.map(to));
        let mut latents = match &req.latents {
            Some(l) if l.dims() != [1, tokens, c.in_channels] => {
                return Err(Error::Input {
                    input: "latents",
                    reason: format!(
                        "shape {:?}, the request needs [1, {tokens}, {}]",
                        l.dims(),
                        c.in_channels
                    ),
                });
            }
            Some(l) => move_to(l.clone(), &device),
            None => pack(seeded([1, c.in_channels / 4, lh, lw], req.seed, &device)),
        };
        let img_ids = image_ids(lh / 2, lw / 2);
        let txt_ids = vec![[0.0; 3]; req.max_sequence_length];
        let guidance = c.guidance_embeds.then(|| vec![req.guidance as f32]);
        let velocity = |latents: &Tensor<B, 3>, p: &Prompt<B>, t: f32| {
            self.transformer.forward(FluxInput {
                hidden_states: latents.clone(),
                encoder_hidden_states: p.states.clone(),
                pooled_projections: p.pooled.clone(),
                timestep: vec![t],
                img_ids: img_ids.clone(),
                txt_ids: txt_ids.clone(),
                guidance: guidance.clone(),
            })
        };
        let mut step_times = Vec::with_capacity(scheduler.steps());
        for i in 0..scheduler.steps() {
            let t0 = Instant::now();
            let t = scheduler.timestep(i) / 1000.0;
            let mut v = velocity(&latents, &cond, t)?;
            if let Some(neg) = &negative {
                let u = velocity(&latents, neg, t)?;
                v = u.clone() + (v - u) * req.true_cfg_scale;
            }
            latents = scheduler.step(v, i, latents);
            let elapsed = t0.elapsed();
            step_times.push(elapsed);
            progress(Progress::Step {
                done: i + 1,
                of: scheduler.steps(),
                elapsed,
            });
        }

        let t0 = Instant::now();
        let image = self.decode_latents(&latents, lh, lw)?;
        progress(Progress::Decoded {
            elapsed: t0.elapsed(),
        });
        Ok(FluxImage {
            latents,
            image,
            step_times,
        })
    }

    /// Checks the request's size and the models' agreement; returns the latents' height and
    /// width (before packing).
    fn latent_size(&self, req: &FluxTxt2Img<B>) -> Result<(usize, usize), Error> {
        let c = self.transformer.config();
        let vae = self.vae.config();
        let factor = 1 << (vae.block_out_channels.len() - 1);
        let side = 2 * factor;
        if req.width == 0
            || req.height == 0
            || !req.width.is_multiple_of(side)
            || !req.height.is_multiple_of(side)
        {
            return Err(Error::Input {
                input: "size",
                reason: format!(
                    "{}×{}: width and height must be positive multiples of {side}",
                    req.width, req.height
                ),
            });
        }
        if c.in_channels != 4 * vae.latent_channels || c.out_channels() != c.in_channels {
            return Err(Error::Input {
                input: "vae",
                reason: format!(
                    "a VAE of {} latent channels for a transformer of {} packed channels",
                    vae.latent_channels, c.in_channels
                ),
            });
        }
        if req.max_sequence_length == 0 || req.max_sequence_length > 512 {
            return Err(Error::Input {
                input: "max_sequence_length",
                reason: format!(
                    "{} T5 tokens: FLUX takes 1 to 512 (as FluxPipeline)",
                    req.max_sequence_length
                ),
            });
        }
        Ok((req.height / factor, req.width / factor))
    }

    /// The image the VAE decodes from packed `latents` (unpacked, `/ scaling + shift`), in
    /// [0, 1].
    fn decode_latents(
        &self,
        latents: &Tensor<B, 3>,
        lh: usize,
        lw: usize,
    ) -> Result<Tensor<B, 4>, Error> {
        let vae = self.vae.config();
        let z =
            unpack(latents.clone(), lh, lw) / vae.scaling_factor + vae.shift_factor.unwrap_or(0.0);
        let decoded = self
            .vae
            .decode(move_to(z, self.vae.streamer().store().compute()))?;
        Ok((decoded * 0.5 + 0.5).clamp(0.0, 1.0))
    }
}

/// Seeded Gaussian noise of `shape` (the pipelines' shared generator).
fn seeded<B: Backend>(shape: [usize; 4], seed: u64, device: &B::Device) -> Tensor<B, 4> {
    let n: usize = shape.iter().product();
    let mut g = Gaussian::new(seed);
    let v: Vec<f32> = (0..n).map(|_| g.sample() as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Latents [batch, c, h, w] as tokens of 2×2 patches, [batch, (h/2)·(w/2), 4c] (diffusers'
/// `_pack_latents`).
pub fn pack<B: Backend>(latents: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, c, h, w] = latents.dims();
    latents
        .reshape([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4])
}

/// The inverse of [`pack`]: tokens [batch, (h/2)·(w/2), 4c] to latents [batch, c, h, w].
pub fn unpack<B: Backend>(tokens: Tensor<B, 3>, h: usize, w: usize) -> Tensor<B, 4> {
    let [b, _, ch] = tokens.dims();
    tokens
        .reshape([b, h / 2, w / 2, ch / 4, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, ch / 4, h, w])
}
