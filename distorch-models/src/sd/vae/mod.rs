//! The VAE, as diffusers' `AutoencoderKL`: an encoder to the latent distribution's mean and
//! log-variance (clamped to [-30, 20] as the reference does), and a decoder; ResNet blocks
//! with group norm, a mid block with single-head self-attention, stride-2 downsampling with
//! bottom-right zero padding, nearest-neighbour upsampling. Diffusers' key layout.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::Component;
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};

use crate::error::Error;
use crate::load::keymap::KeyLayout;
use crate::load::{LoadContext, Model, needs_config, shape_map, to_usize};
use crate::nn::Weights;
use distorch_core::ComponentKind;

mod config;
pub use config::VaeConfig;
mod layers;
mod ldm;

use layers::VaeLayers;
pub(crate) use ldm::ldm_map;

impl VaeConfig {
    /// Every tensor the VAE reads, with keys in `layout`.
    pub fn expected_tensors_in(&self, layout: KeyLayout) -> Vec<ExpectedTensor> {
        let map = (layout == KeyLayout::Ldm).then(|| ldm_map(self));
        VaeLayers::new(self, map.as_ref()).expected
    }

    /// Every tensor the VAE reads, diffusers keys.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        VaeLayers::new(self, None).expected
    }
}

/// A VAE whose weights live where its plan put them.
pub struct AutoencoderKl<B: Backend> {
    config: VaeConfig,
    streamer: Arc<Streamer<B>>,
    layers: VaeLayers,
}

impl<B: Backend> AutoencoderKl<B> {
    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    fn weights(&self) -> Weights<'_, B> {
        Weights::new(&self.streamer)
    }

    /// Encodes images [batch, in_channels, h, w] (h and w divisible by 2^(levels-1)) to the
    /// latent distribution's `(mean, logvar)`, each [batch, latent_channels, h/f, w/f].
    pub fn encode(&self, image: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 4>), Error> {
        let c = &self.config;
        let [_, channels, h, wd] = image.dims();
        let factor = 1 << (c.block_out_channels.len() - 1);
        if channels != c.in_channels || h % factor != 0 || wd % factor != 0 || h == 0 || wd == 0 {
            return Err(Error::Input {
                input: "image",
                reason: format!(
                    "shape [_, {channels}, {h}, {wd}]: expected {} channels and a size \
                     divisible by {factor}",
                    c.in_channels
                ),
            });
        }
        let w = self.weights();
        let x = self.layers.encoder.forward(&w, w.input(image))?;
        let lc = c.latent_channels;
        let x = w.output(x);
        let mean = x.clone().narrow(1, 0, lc);
        let logvar = x.narrow(1, lc, lc).clamp(-30.0, 20.0);
        Ok((mean, logvar))
    }

    /// Decodes latents [batch, latent_channels, h, w] to images [batch, out_channels,
    /// h·f, w·f].
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>, Error> {
        let c = &self.config;
        let [_, channels, h, wd] = z.dims();
        if channels != c.latent_channels || h == 0 || wd == 0 {
            return Err(Error::Input {
                input: "z",
                reason: format!(
                    "shape [_, {channels}, {h}, {wd}]: expected {} latent channels",
                    c.latent_channels
                ),
            });
        }
        let w = self.weights();
        let x = self.layers.decoder.forward(&w, w.input(z))?;
        Ok(w.output(x))
    }
}

impl<B: Backend> Model<B> for AutoencoderKl<B> {
    type Config = VaeConfig;
    const KIND: ComponentKind = ComponentKind::Vae;
    fn config_from_file(path: &Path) -> Result<VaeConfig, Error> {
        VaeConfig::from_file(path)
    }
    /// SD 1.x's scaling factor (0.18215) unless a configuration is given: the VAE's
    /// shapes do not tell it (SDXL's is 0.13025; the checkpoint loader sets it). A VAE of 16
    /// latent channels without quant convolutions is taken for FLUX.1's (`ae.safetensors`:
    /// scaling 0.3611, shift 0.1159), with a warning: SD3's has the same shapes.
    fn detect_config(c: &Component<'_>) -> Result<VaeConfig, Error> {
        if KeyLayout::of_vae(c) == KeyLayout::Diffusers {
            return Err(needs_config("VAE"));
        }
        let mut config = VaeConfig::detect(c, 0.18215)?;
        if config.latent_channels == 16 && !config.use_quant_conv && !config.use_post_quant_conv {
            tracing::warn!(
                "a 16-channel VAE without quant convolutions: assumed FLUX.1's (scaling_factor \
                 0.3611, shift_factor 0.1159; SD3's VAE has the same shapes and 1.5305, 0.0609); \
                 give its configuration (VaeConfig or config.json) to choose"
            );
            config.scaling_factor = 0.3611;
            config.shift_factor = Some(0.1159);
        }
        Ok(config)
    }
    fn execution_order(_: &VaeConfig, _: &Component<'_>) -> Result<Vec<String>, Error> {
        // File order: the encoder, then the decoder, is how the VAE is used.
        Ok(Vec::new())
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the VAE from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`](distorch_core::runtime::WeightStore::load)), in diffusers' key layout or the original single-file one
    /// (recognised from the names). The streamer records the execution order on the first
    /// pass, so a decode-only pipeline prefetches decoder units only.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let ldm = KeyLayout::of_vae(ctx.component) == KeyLayout::Ldm;
        let map = ldm.then(|| ldm_map(&config));
        let layers = VaeLayers::new(&config, map.as_ref());
        let (streamer, report) = ctx.stream_recorded(&layers.expected)?;
        Ok((
            AutoencoderKl {
                config,
                streamer,
                layers,
            },
            report,
        ))
    }
}

impl VaeConfig {
    /// The configuration of a single-file (LDM layout) VAE component from its shapes; a
    /// diffusers-layout VAE needs its `config.json`.
    pub fn detect(c: &Component<'_>, scaling_factor: f64) -> Result<VaeConfig, Error> {
        let shapes = shape_map(c);
        VaeConfig::detect_ldm(|k| shapes.get(k).map(|s| to_usize(s)), scaling_factor)
    }
}
