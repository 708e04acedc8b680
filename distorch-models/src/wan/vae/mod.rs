//! Wan 2.1 video VAE, as diffusers' `AutoencoderKLWan`: causal 3-D convolutions, RMS norms,
//! spatial and temporal down/up sampling, a per-frame attention in the middle blocks.
//! Encoding runs over the first frame and then chunks of four, decoding one latent frame at a
//! time, each causal convolution carrying its last frames from chunk to chunk — the same
//! chunks and cache as the reference, so memory stays bounded by a chunk, not the video.
//! Weights in diffusers' or the original Wan layout.
//!
//! Not implemented: the Wan 2.2 (5B) VAE's residual variant (`is_residual`, `patch_size`) and
//! attention at other scales (`attn_scales`); both are refused with a clear error.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use distorch_core::{Component, ComponentKind};

use crate::error::Error;
use crate::load::{LoadContext, Model, units_in_order};
use crate::nn::Weights;
use crate::wan::vae::blocks::CausalCache;

mod blocks;
mod config;
pub use config::{WanVaeConfig, WanVaeLayout};
mod layers;

use layers::WanVaeLayers;

/// A Wan VAE whose weights live where its plan put them.
pub struct WanVae<B: Backend> {
    config: WanVaeConfig,
    layout: WanVaeLayout,
    streamer: Arc<Streamer<B>>,
    layers: WanVaeLayers,
}

impl<B: Backend> WanVae<B> {
    /// The tensors the VAE reads (diffusers naming), encoder then decoder, in forward order.
    pub fn expected_tensors(c: &WanVaeConfig) -> Vec<ExpectedTensor> {
        Self::expected_in(c, WanVaeLayout::Diffusers)
    }

    /// [`WanVae::expected_tensors`] in `layout`.
    pub fn expected_in(c: &WanVaeConfig, layout: WanVaeLayout) -> Vec<ExpectedTensor> {
        WanVaeLayers::new(c, layout).expected
    }

    /// The configuration.
    pub fn config(&self) -> &WanVaeConfig {
        &self.config
    }

    /// The key layout of its weights.
    pub fn layout(&self) -> WanVaeLayout {
        self.layout
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// Encodes `video` ([batch, channels, 1 + 4k frames, height, width], values in [-1, 1])
    /// to the latent distribution's mean and log-variance (clamped to [-30, 20]), each
    /// [batch, z_dim, 1 + k·4/temporal_factor frames, height/8, width/8].
    pub fn encode(&self, video: Tensor<B, 5>) -> Result<(Tensor<B, 5>, Tensor<B, 5>), Error> {
        let c = &self.config;
        let [_, ch, frames, h, w] = video.dims();
        let s = c.spatial_factor();
        if ch != c.in_channels || frames == 0 || (frames - 1) % 4 != 0 || h % s != 0 || w % s != 0 {
            return Err(Error::Input {
                input: "video",
                reason: format!(
                    "{ch} channels, {frames} frames, {h}×{w}: the VAE takes {} channels, 1 + 4k \
                     frames and sides divisible by {s}",
                    c.in_channels
                ),
            });
        }
        let (w, l) = (Weights::new(&self.streamer), &self.layers);
        let video = w.input(video);
        let mut cache = CausalCache::new();
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < frames {
            let len = if start == 0 { 1 } else { 4 };
            cache.next_chunk();
            let chunk = video.clone().narrow(2, start, len);
            chunks.push(l.encoder.forward(&w, chunk, &mut cache)?);
            start += len;
        }
        let enc = l.quant.forward(&w, Tensor::cat(chunks, 2), None)?;
        let z = c.z_dim;
        let enc = w.output(enc);
        let mean = enc.clone().narrow(1, 0, z);
        let logvar = enc.narrow(1, z, z).clamp(-30.0, 20.0);
        Ok((mean, logvar))
    }

    /// Decodes latents `z` ([batch, z_dim, frames, h, w]) to video in [-1, 1]: the first
    /// latent frame gives one frame, each other `temporal_factor` frames; sides grow by 8.
    pub fn decode(&self, z: Tensor<B, 5>) -> Result<Tensor<B, 5>, Error> {
        let c = &self.config;
        let [_, ch, frames, _, _] = z.dims();
        if ch != c.z_dim || frames == 0 {
            return Err(Error::Input {
                input: "z",
                reason: format!(
                    "{ch} channels and {frames} frames: the VAE takes {} channels and at least \
                     one frame",
                    c.z_dim
                ),
            });
        }
        let (w, l) = (Weights::new(&self.streamer), &self.layers);
        let x = l.post_quant.forward(&w, w.input(z), None)?;
        let mut cache = CausalCache::new();
        let mut out = Vec::with_capacity(frames);
        for i in 0..frames {
            cache.next_chunk();
            out.push(
                l.decoder
                    .forward(&w, x.clone().narrow(2, i, 1), &mut cache)?,
            );
        }
        Ok(w.output(Tensor::cat(out, 2)).clamp(-1.0, 1.0))
    }
}

impl<B: Backend> Model<B> for WanVae<B> {
    type Config = WanVaeConfig;
    const KIND: ComponentKind = ComponentKind::Vae;
    fn config_from_file(path: &Path) -> Result<WanVaeConfig, Error> {
        WanVaeConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<WanVaeConfig, Error> {
        WanVaeConfig::detect(c)
    }
    fn execution_order(config: &WanVaeConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Ok(units_in_order(&Self::expected_in(
            config,
            WanVaeLayout::of(c),
        )))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the VAE from `component` of `index` at the homes `plan` gives (either layout).
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let layout = WanVaeLayout::of(ctx.component);
        let layers = WanVaeLayers::new(&config, layout);
        let (streamer, report) = ctx.stream_declared(&layers.expected)?;
        Ok((
            WanVae {
                config,
                layout,
                streamer,
                layers,
            },
            report,
        ))
    }
}
