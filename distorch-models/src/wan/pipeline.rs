//! Text to video with Wan 2.1 ([`Wan::txt2video`]), as diffusers' `WanPipeline`: prompts
//! cleaned, tokenized to a fixed length and encoded by UMT5 (states past each prompt's end
//! zeroed), seeded latents, flow-matching Euler with classifier-free guidance (both rows in
//! one batch), latents denormalised by the VAE's statistics and decoded.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::runtime::move_to;

use crate::error::Error;
use crate::sampling::flow_match::{FlowMatchConfig, FlowMatchEuler};
use crate::sd::pipeline::{Gaussian, Progress};
use crate::text::t5_tokenizer::T5Tokenizer;
use crate::text::umt5::Umt5Encoder;
use crate::wan::dit::{WanDitInput, WanTransformer};
use crate::wan::vae::WanVae;

/// The models of a Wan text-to-video pipeline.
pub struct Wan<B: Backend> {
    /// The UMT5 tokenizer.
    pub tokenizer: T5Tokenizer,
    /// The UMT5 encoder.
    pub text_encoder: Umt5Encoder<B>,
    /// The transformer.
    pub transformer: WanTransformer<B>,
    /// The VAE.
    pub vae: WanVae<B>,
}

/// One text-to-video request.
#[derive(Debug, Clone)]
pub struct Txt2Video<B: Backend> {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty: an empty prompt, as diffusers).
    pub negative_prompt: String,
    /// Frames: 1 + 4k.
    pub frames: usize,
    /// Width in pixels (a multiple of 16).
    pub width: usize,
    /// Height in pixels (a multiple of 16).
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1: no guidance, one row).
    pub guidance: f64,
    /// The sampler's shift (3.0 for 480p, 5.0 for 720p).
    pub shift: f64,
    /// Tokens per prompt (Wan: 512).
    pub max_sequence_length: usize,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Initial latents instead of seeded noise ([1, z_dim, frames', h/8, w/8]).
    pub latents: Option<Tensor<B, 5>>,
}

impl<B: Backend> Txt2Video<B> {
    /// `prompt` with Wan 2.1's defaults: 81 frames at 832×480, 50 steps, guidance 5, shift
    /// 5 (diffusers' example uses 3.0 at 480p; set it), 512 tokens, seed 0.
    pub fn new(prompt: impl Into<String>) -> Txt2Video<B> {
        Txt2Video {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            frames: 81,
            width: 832,
            height: 480,
            steps: 50,
            guidance: 5.0,
            shift: 5.0,
            max_sequence_length: 512,
            seed: 0,
            latents: None,
        }
    }
}

/// A generated video.
pub struct Video<B: Backend> {
    /// The final latents (as the transformer sees them).
    pub latents: Tensor<B, 5>,
    /// The frames, [1, 3, frames, height, width], values in [0, 1].
    pub video: Tensor<B, 5>,
    /// Each denoising step's time.
    pub step_times: Vec<Duration>,
}

/// Wan's prompt cleaning without ftfy: the five basic HTML entities and numeric references
/// unescaped (twice, as `html.unescape` is applied twice), whitespace collapsed and trimmed.
pub fn clean_prompt(text: &str) -> String {
    let once = |s: &str| -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find('&') {
            out.push_str(&rest[..i]);
            rest = &rest[i..];
            let end = rest.find(';').filter(|&e| e <= 10);
            let decoded = end.and_then(|e| {
                let name = &rest[1..e];
                let c = match name {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" | "#39" => Some('\''),
                    n if n.starts_with("#x") || n.starts_with("#X") => {
                        u32::from_str_radix(&n[2..], 16)
                            .ok()
                            .and_then(char::from_u32)
                    }
                    n if n.starts_with('#') => n[1..].parse().ok().and_then(char::from_u32),
                    _ => None,
                };
                c.map(|c| (c, e))
            });
            match decoded {
                Some((c, e)) => {
                    out.push(c);
                    rest = &rest[e + 1..];
                }
                None => {
                    out.push('&');
                    rest = &rest[1..];
                }
            }
        }
        out.push_str(rest);
        out
    };
    once(&once(text))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl<B: Backend> Wan<B> {
    /// The prompt's UMT5 states, [1, max_len, d_model], zero past the prompt's end.
    pub fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<Tensor<B, 3>, Error> {
        let (ids, mask) = self.tokenizer.encode(&clean_prompt(prompt), max_len)?;
        let states = self.text_encoder.forward(&ids, &mask, 1)?;
        let device = states.device();
        let keep: Vec<f32> = mask
            .iter()
            .map(|&m| if m == 0 { 0.0 } else { 1.0 })
            .collect();
        let keep = Tensor::<B, 1>::from_data(TensorData::new(keep, [max_len]), &device)
            .reshape([1, max_len, 1]);
        Ok(states * keep)
    }

    /// Generates a video; `progress` is told when prompts are encoded, after each step and
    /// when the video is decoded.
    pub fn txt2video(
        &self,
        req: &Txt2Video<B>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Video<B>, Error> {
        let shape = self.latent_shape(req)?;
        let scheduler = FlowMatchEuler::new(&FlowMatchConfig::with_shift(req.shift), req.steps)?;
        let start = Instant::now();
        let cond = self.encode_prompt(&req.prompt, req.max_sequence_length)?;
        let guided = req.guidance > 1.0;
        let context = if guided {
            let uncond = self.encode_prompt(&req.negative_prompt, req.max_sequence_length)?;
            Tensor::cat(vec![cond, uncond], 0)
        } else {
            cond
        };
        progress(Progress::Encoded {
            elapsed: start.elapsed(),
        });

        // The transformer's device; the text encoder may compute on another.
        let device = self.transformer.streamer().store().compute().clone();
        let context = move_to(context, &device);
        let mut latents = match &req.latents {
            Some(l) if l.dims() != shape => {
                return Err(Error::Input {
                    input: "latents",
                    reason: format!("shape {:?}, the request needs {shape:?}", l.dims()),
                });
            }
            Some(l) => move_to(l.clone(), &device),
            None => {
                let n: usize = shape.iter().product();
                let mut g = Gaussian::new(req.seed);
                let v: Vec<f32> = (0..n).map(|_| g.sample() as f32).collect();
                Tensor::from_data(TensorData::new(v, shape), &device)
            }
        };
        let rows = if guided { 2 } else { 1 };
        let mut step_times = Vec::with_capacity(scheduler.steps());
        for i in 0..scheduler.steps() {
            let t0 = Instant::now();
            let input = WanDitInput {
                hidden_states: Tensor::cat(vec![latents.clone(); rows], 0),
                timestep: vec![scheduler.timestep(i); rows],
                encoder_hidden_states: context.clone(),
            };
            let out = self.transformer.forward(input)?;
            let velocity = if guided {
                let c = out.clone().narrow(0, 0, 1);
                let u = out.narrow(0, 1, 1);
                u.clone() + (c - u) * req.guidance
            } else {
                out
            };
            latents = scheduler.step(velocity, i, latents);
            let elapsed = t0.elapsed();
            step_times.push(elapsed);
            progress(Progress::Step {
                done: i + 1,
                of: scheduler.steps(),
                elapsed,
            });
        }

        let t0 = Instant::now();
        let vae_device = self.vae.streamer().store().compute().clone();
        let video = self.decode_latents(&move_to(latents.clone(), &vae_device), &vae_device)?;
        progress(Progress::Decoded {
            elapsed: t0.elapsed(),
        });
        Ok(Video {
            latents,
            video,
            step_times,
        })
    }

    /// Checks the request's size against the models; returns the latents' shape.
    fn latent_shape(&self, req: &Txt2Video<B>) -> Result<[usize; 5], Error> {
        let vae = self.vae.config();
        let dit = self.transformer.config();
        let (ts, ss) = (vae.temporal_factor(), vae.spatial_factor());
        let side = ss * dit.patch_size[1].max(dit.patch_size[2]);
        if req.frames == 0 || !(req.frames - 1).is_multiple_of(ts) {
            return Err(Error::Input {
                input: "frames",
                reason: format!("{} frames: the VAE takes 1 + {ts}k", req.frames),
            });
        }
        if !req.width.is_multiple_of(side)
            || !req.height.is_multiple_of(side)
            || req.width == 0
            || req.height == 0
        {
            return Err(Error::Input {
                input: "size",
                reason: format!(
                    "{}×{}: width and height must be positive multiples of {side}",
                    req.width, req.height
                ),
            });
        }
        Ok([
            1,
            dit.in_channels,
            (req.frames - 1) / ts + 1,
            req.height / ss,
            req.width / ss,
        ])
    }

    /// The video the VAE decodes from `latents` (un-normalised by the VAE's latent
    /// statistics), in [0, 1].
    fn decode_latents(
        &self,
        latents: &Tensor<B, 5>,
        device: &B::Device,
    ) -> Result<Tensor<B, 5>, Error> {
        let vae = self.vae.config();
        let z = vae.z_dim;
        let stats = |v: &[f64], what: &'static str| -> Result<Tensor<B, 5>, Error> {
            if v.len() != z {
                return Err(Error::Input {
                    input: what,
                    reason: format!("{} values for {z} latent channels", v.len()),
                });
            }
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Ok(Tensor::from_data(
                TensorData::new(v, [1, z, 1, 1, 1]),
                device,
            ))
        };
        let mean = stats(&vae.latents_mean, "latents_mean")?;
        let std = stats(&vae.latents_std, "latents_std")?;
        let decoded = self.vae.decode(latents.clone() * std + mean)?;
        Ok((decoded * 0.5 + 0.5).clamp(0.0, 1.0))
    }
}

/// Frame `i` of a video tensor ([1, 3, frames, h, w] in [0, 1]) as 8-bit RGB.
pub fn frame_rgb8<B: Backend>(video: &Tensor<B, 5>, i: usize) -> Result<image::RgbImage, Error> {
    let [_, c, _, h, w] = video.dims();
    crate::sd::pipeline::to_rgb8(video.clone().narrow(2, i, 1).reshape([1, c, h, w]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_cleaned_as_wan_does() {
        // Python: whitespace_clean(basic_clean(text)) without ftfy.
        assert_eq!(
            clean_prompt("  a  red\tfox \n in &amp;amp; snow "),
            "a red fox in & snow"
        );
        assert_eq!(
            clean_prompt("&lt;b&gt; &#65;&#x42; &unknown; & alone"),
            "<b> AB &unknown; & alone"
        );
    }
}
