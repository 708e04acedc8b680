//! ControlNet, as diffusers' `ControlNetModel` (SD 1.x/2.x and SDXL): the hint (conditioning
//! image) embedding, the UNet's encoder half — time and text-time embedding, down blocks,
//! mid block, shared with [`crate::Unet2dCondition`] — and the zero convolutions whose
//! outputs feed the UNet's additional-residual inputs. Both key layouts: diffusers and the
//! original single-file one (`input_hint_block.*`, `zero_convs.N.0`, `middle_block_out.0`,
//! `input_blocks.*`, with or without `control_model.`).

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::Component;
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use serde::Deserialize;

use crate::error::{Error, unsupported};
use crate::load::LoadContext;
use crate::load::keymap::{KeyLayout, KeyMap};
use crate::nn::spec::{Conv2d, Spec};
use crate::nn::{Weights, silu};
use crate::sd::unet::UnetInput;
use crate::sd::unet::config::{Blocks, UnetConfig};
use crate::sd::unet::layers::{DownMid, Embedding};
use crate::sd::unet::ldm::ldm_map;
use crate::sd::unet::trunk::Trunk;

/// A diffusers `ControlNetModel` config: the UNet fields it shares, and its own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // Field names and meanings are diffusers'.
pub struct ControlNetConfig {
    /// The fields shared with the UNet's config (`up_block_types` is unused: a ControlNet
    /// has no decoder half).
    #[serde(flatten)]
    pub unet: UnetConfig,
    pub conditioning_channels: usize,
    pub conditioning_embedding_out_channels: Vec<usize>,
    pub controlnet_conditioning_channel_order: String,
    pub global_pool_conditions: bool,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        ControlNetConfig {
            unet: UnetConfig::default(),
            conditioning_channels: 3,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            controlnet_conditioning_channel_order: "rgb".into(),
            global_pool_conditions: false,
        }
    }
}

impl ControlNetConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ControlNetConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), ControlNetConfig::check)
    }

    /// The UNet fields with up blocks mirroring the down blocks (what the shared checks
    /// expect of a UNet).
    fn trunk_config(&self) -> UnetConfig {
        let mut c = self.unet.clone();
        c.up_block_types = c
            .down_block_types
            .iter()
            .rev()
            .map(|t| t.replace("Down", "Up"))
            .collect();
        c
    }

    /// Rejects what this ControlNet does not implement.
    pub fn check(&self) -> Result<(), Error> {
        self.blocks().map(|_| ())
    }

    fn blocks(&self) -> Result<Blocks, Error> {
        let blocks = self.trunk_config().blocks()?;
        if !matches!(
            self.controlnet_conditioning_channel_order.as_str(),
            "rgb" | "bgr"
        ) {
            return unsupported(
                "controlnet_conditioning_channel_order",
                self.controlnet_conditioning_channel_order.clone(),
                "rgb or bgr",
            );
        }
        if self.conditioning_embedding_out_channels.is_empty() || self.conditioning_channels == 0 {
            return unsupported(
                "conditioning_embedding_out_channels",
                format!("{:?}", self.conditioning_embedding_out_channels),
                "needs at least one entry, and conditioning_channels > 0",
            );
        }
        Ok(blocks)
    }

    /// How much larger than the latents the hint image is (8 for SD's VAE).
    pub fn hint_factor(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }

    /// Whether this ControlNet can drive a UNet of `unet`: the same encoder widths, levels,
    /// latent channels, text width and SDXL conditioning.
    pub fn check_unet(&self, unet: &UnetConfig) -> Result<(), Error> {
        let me = self.trunk_config().blocks()?;
        let other = unet.blocks()?;
        let mismatch = |what: &'static str, controlnet: String, unet: String| {
            Err(Error::ControlNetMismatch {
                what,
                controlnet,
                unet,
            })
        };
        if self.unet.block_out_channels != unet.block_out_channels {
            return mismatch(
                "block_out_channels",
                format!("{:?}", self.unet.block_out_channels),
                format!("{:?}", unet.block_out_channels),
            );
        }
        if me.layers != other.layers {
            return mismatch(
                "layers_per_block",
                format!("{:?}", me.layers),
                format!("{:?}", other.layers),
            );
        }
        if self.unet.in_channels != unet.in_channels {
            return mismatch(
                "in_channels",
                self.unet.in_channels.to_string(),
                unet.in_channels.to_string(),
            );
        }
        if me.context != other.context {
            return mismatch(
                "cross_attention_dim",
                me.context.to_string(),
                other.context.to_string(),
            );
        }
        if self.unet.has_text_time() != unet.has_text_time() {
            return mismatch(
                "text-time embedding (SDXL)",
                self.unet.has_text_time().to_string(),
                unet.has_text_time().to_string(),
            );
        }
        Ok(())
    }
}

/// What one ControlNet evaluation takes.
#[derive(Debug, Clone)]
pub struct ControlNetInput<B: Backend> {
    /// The UNet's noisy latents, [batch, in_channels, h, w].
    pub sample: Tensor<B, 4>,
    /// Timesteps: one for the whole batch, or one per row.
    pub timesteps: Vec<f32>,
    /// Text conditioning, [batch, tokens, cross_attention_dim].
    pub encoder_hidden_states: Tensor<B, 3>,
    /// The hint image in pixel space, [batch, conditioning_channels, h·8, w·8], values in
    /// [0, 1] as diffusers' pipelines prepare it.
    pub controlnet_cond: Tensor<B, 4>,
    /// Multiplies every output (diffusers' `conditioning_scale`).
    pub conditioning_scale: f32,
    /// SDXL: pooled text embeddings and size/crop conditioning.
    pub text_time: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// diffusers' `guess_mode`: outputs scaled from 0.1 (shallowest) to 1 (mid block).
    pub guess_mode: bool,
}

impl<B: Backend> ControlNetInput<B> {
    /// An input at scale 1, without SDXL conditioning.
    pub fn new(
        sample: Tensor<B, 4>,
        timesteps: Vec<f32>,
        encoder_hidden_states: Tensor<B, 3>,
        controlnet_cond: Tensor<B, 4>,
    ) -> ControlNetInput<B> {
        ControlNetInput {
            sample,
            timesteps,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale: 1.0,
            text_time: None,
            guess_mode: false,
        }
    }

    /// The input with the same latents, time and text as a UNet input, and `hint`.
    pub fn for_unet(input: &UnetInput<B>, hint: Tensor<B, 4>) -> ControlNetInput<B> {
        ControlNetInput {
            text_time: input.text_time.clone(),
            ..ControlNetInput::new(
                input.sample.clone(),
                input.timesteps.clone(),
                input.encoder_hidden_states.clone(),
                hint,
            )
        }
    }

    /// Sets `conditioning_scale`.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.conditioning_scale = scale;
        self
    }

    /// Adds SDXL's `text_embeds` and `time_ids`.
    pub fn with_text_time(mut self, text_embeds: Tensor<B, 2>, time_ids: Tensor<B, 2>) -> Self {
        self.text_time = Some((text_embeds, time_ids));
        self
    }

    /// Sets `guess_mode`.
    pub fn with_guess_mode(mut self, guess: bool) -> Self {
        self.guess_mode = guess;
        self
    }
}

/// A ControlNet's residuals, in the UNet's skip-connection order.
#[derive(Debug, Clone)]
pub struct ControlNetOutput<B: Backend> {
    /// One per down-block output (diffusers' `down_block_res_samples`).
    pub down_block_res_samples: Vec<Tensor<B, 4>>,
    /// The mid block's (`mid_block_res_sample`).
    pub mid_block_res_sample: Tensor<B, 4>,
}

impl<B: Backend> ControlNetOutput<B> {
    /// `input` with these residuals added (or summed into residuals already there, as
    /// diffusers' multi-ControlNet does).
    pub fn apply(self, mut input: UnetInput<B>) -> UnetInput<B> {
        let (down, mid) = match (
            input.down_block_additional_residuals.take(),
            input.mid_block_additional_residual.take(),
        ) {
            (Some(d), Some(m)) if d.len() == self.down_block_res_samples.len() => (
                d.into_iter()
                    .zip(self.down_block_res_samples)
                    .map(|(a, b)| a + b)
                    .collect(),
                m + self.mid_block_res_sample,
            ),
            _ => (self.down_block_res_samples, self.mid_block_res_sample),
        };
        input.with_control(down, mid)
    }
}

/// A ControlNet whose weights live where its plan put them.
pub struct ControlNetModel<B: Backend> {
    config: ControlNetConfig,
    trunk_config: UnetConfig,
    blocks: Blocks,
    streamer: Arc<Streamer<B>>,
    layers: ControlLayers,
}

/// The ControlNet's layers in its file's layout, described once from the configuration.
struct ControlLayers {
    embed: Embedding,
    hint_in: Conv2d,
    hint_blocks: Vec<Conv2d>,
    hint_out: Conv2d,
    trunk: DownMid,
    zero: Vec<Conv2d>,
    mid_out: Conv2d,
    /// Every tensor, in the order the forward pass uses them.
    expected: Vec<ExpectedTensor>,
}

impl ControlLayers {
    fn new(config: &ControlNetConfig, bl: &Blocks, map: Option<&KeyMap>) -> ControlLayers {
        let c = config.trunk_config();
        let mut s = Spec::mapped(map);
        let embed = Embedding::new(&mut s, &c);
        let hint = &config.conditioning_embedding_out_channels;
        let p = "controlnet_cond_embedding";
        let hint_in = s.conv2d(
            &format!("{p}.conv_in"),
            hint[0],
            config.conditioning_channels,
            3,
            1,
            1,
        );
        let mut hint_blocks = Vec::new();
        for (i, pair) in hint.windows(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            hint_blocks.push(s.conv2d(&format!("{p}.blocks.{}", 2 * i), a, a, 3, 1, 1));
            hint_blocks.push(s.conv2d(&format!("{p}.blocks.{}", 2 * i + 1), b, a, 3, 2, 1));
        }
        let first = c.block_out_channels[0];
        let hint_out = s.conv2d(
            &format!("{p}.conv_out"),
            first,
            hint[hint.len() - 1],
            3,
            1,
            1,
        );
        let trunk = DownMid::new(&mut s, &c, bl);
        let zero = trunk
            .skips
            .iter()
            .enumerate()
            .map(|(k, &ch)| s.conv2d(&format!("controlnet_down_blocks.{k}"), ch, ch, 1, 1, 0))
            .collect();
        let top = c.block_out_channels[c.block_out_channels.len() - 1];
        let mid_out = s.conv2d("controlnet_mid_block", top, top, 1, 1, 0);
        ControlLayers {
            embed,
            hint_in,
            hint_blocks,
            hint_out,
            trunk,
            zero,
            mid_out,
            expected: s.into_expected(),
        }
    }
}

impl<B: Backend> ControlNetModel<B> {
    /// The tensors a ControlNet of `config` has, keys in `layout`, in execution order.
    pub fn expected_tensors(
        config: &ControlNetConfig,
        layout: KeyLayout,
    ) -> Result<Vec<ExpectedTensor>, Error> {
        let blocks = config.blocks()?;
        let map = match layout {
            KeyLayout::Diffusers => None,
            KeyLayout::Ldm => Some(ldm_controlnet_map(config, &blocks)?),
        };
        Ok(ControlLayers::new(config, &blocks, map.as_ref()).expected)
    }

    /// The units in the order a forward pass uses them (for the planner).
    pub fn execution_order(
        config: &ControlNetConfig,
        layout: KeyLayout,
    ) -> Result<Vec<String>, Error> {
        Ok(crate::load::units_in_order(&Self::expected_tensors(
            config, layout,
        )?))
    }

    /// The configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// One evaluation: the residuals for the UNet.
    pub fn forward(&self, input: ControlNetInput<B>) -> Result<ControlNetOutput<B>, Error> {
        let ControlNetInput {
            sample,
            timesteps,
            encoder_hidden_states: ctx,
            controlnet_cond: hint,
            conditioning_scale: scale,
            text_time,
            guess_mode,
        } = input;
        let trunk = Trunk {
            c: &self.trunk_config,
            bl: &self.blocks,
        };
        trunk.check(&sample, &timesteps, &ctx, text_time.as_ref())?;
        let [batch, _, h, wd] = sample.dims();
        let f = self.config.hint_factor();
        let want = [batch, self.config.conditioning_channels, h * f, wd * f];
        if hint.dims() != want {
            return Err(Error::Input {
                input: "controlnet_cond",
                reason: format!(
                    "shape {:?}: expected {want:?} (the hint is {f}× the latents' size)",
                    hint.dims()
                ),
            });
        }
        let hint = if self.config.controlnet_conditioning_channel_order == "bgr" {
            hint.flip([1])
        } else {
            hint
        };
        let device = sample.device();
        let w = Weights::new(&self.streamer);
        let l = &self.layers;
        let temb = trunk.embed(&w, &l.embed, batch, timesteps, text_time, &device)?;
        let ctx = w.input(ctx);
        let x = l.embed.conv_in.forward(&w, w.input(sample))?;

        let mut e = silu(l.hint_in.forward(&w, w.input(hint))?);
        for conv in &l.hint_blocks {
            e = silu(conv.forward(&w, e)?);
        }
        let e = l.hint_out.forward(&w, e)?;

        let (x, skips) = l.trunk.down(&w, x + e, &temb, &ctx)?;
        let x = l.trunk.mid(&w, x, &temb, &ctx)?;
        let n = skips.len();
        let scales: Vec<f32> = if guess_mode && !self.config.global_pool_conditions {
            // torch.logspace(-1, 0, n + 1) · scale, in f32 as the reference.
            (0..=n)
                .map(|k| {
                    let exp = -1.0 + k as f32 / n as f32;
                    10f32.powf(exp) * scale
                })
                .collect()
        } else {
            vec![scale; n + 1]
        };
        let pool = |t: Tensor<B, 4>| {
            if self.config.global_pool_conditions {
                t.mean_dim(2).mean_dim(3)
            } else {
                t
            }
        };
        let mut down = Vec::with_capacity(n);
        for ((k, s), conv) in skips.into_iter().enumerate().zip(&l.zero) {
            let r = conv.forward(&w, s)?;
            down.push(w.output(pool(r.mul_scalar(scales[k]))));
        }
        let mid = l.mid_out.forward(&w, x)?;
        Ok(ControlNetOutput {
            down_block_res_samples: down,
            mid_block_res_sample: w.output(pool(mid.mul_scalar(scales[n]))),
        })
    }
}

/// diffusers names to the original layout's: the UNet's encoder half as the UNet's map, and
/// the hint, zero and mid-output convolutions.
fn ldm_controlnet_map(config: &ControlNetConfig, blocks: &Blocks) -> Result<KeyMap, Error> {
    let mut m = ldm_map(&config.trunk_config(), blocks)?;
    let convs = 2 * (config.conditioning_embedding_out_channels.len() - 1);
    m.prefix("controlnet_cond_embedding.conv_in", "input_hint_block.0");
    for i in 0..convs {
        m.prefix(
            format!("controlnet_cond_embedding.blocks.{i}"),
            format!("input_hint_block.{}", 2 * (i + 1)),
        );
    }
    m.prefix(
        "controlnet_cond_embedding.conv_out",
        format!("input_hint_block.{}", 2 * (convs + 1)),
    );
    let skips = blocks.layers.iter().map(|l| l + 1).sum::<usize>();
    for k in 0..skips {
        m.prefix(
            format!("controlnet_down_blocks.{k}"),
            format!("zero_convs.{k}.0"),
        );
    }
    m.prefix("controlnet_mid_block", "middle_block_out.0");
    Ok(m)
}

impl ControlNetConfig {
    /// Reads a single-file (original layout) ControlNet's architecture from its keys
    /// (`control_model.` stripped) and shapes: the encoder half as a UNet's
    /// ([`crate::sd::unet::ldm::detect`]), the hint embedding's widths from `input_hint_block.*`.
    pub fn detect_ldm<'a>(
        tensors: impl Iterator<Item = (&'a str, &'a [u64])> + Clone,
    ) -> Result<ControlNetConfig, Error> {
        let unet = crate::sd::unet::ldm::detect(tensors.clone())?.config;
        let hint: std::collections::BTreeMap<usize, &[u64]> = tensors
            .filter_map(|(k, s)| {
                let i = k
                    .strip_prefix("input_hint_block.")?
                    .strip_suffix(".weight")?;
                Some((i.parse().ok()?, s))
            })
            .collect();
        let bad = |reason: String| Error::NotTheModel {
            model: "single-file ControlNet",
            reason,
        };
        let convs: Vec<&[u64]> = hint.values().copied().collect();
        let ok = convs.len() >= 2
            && convs.len().is_multiple_of(2)
            && hint.keys().copied().eq((0..convs.len()).map(|i| 2 * i))
            && convs.iter().all(|s| s.len() == 4);
        if !ok {
            return Err(bad(format!(
                "input_hint_block convolutions at {:?}, expected 0, 2, 4, ... (an even count)",
                hint.keys().collect::<Vec<_>>()
            )));
        }
        // conv_in, then pairs (same width, then the next width at stride 2), then conv_out.
        let mut widths = vec![convs[0][0] as usize];
        for pair in convs[1..convs.len() - 1].chunks(2) {
            if let [_, down] = pair {
                widths.push(down[0] as usize);
            }
        }
        let config = ControlNetConfig {
            unet,
            conditioning_channels: convs[0][1] as usize,
            conditioning_embedding_out_channels: widths,
            ..ControlNetConfig::default()
        };
        config.check()?;
        Ok(config)
    }
}

impl<B: Backend> crate::load::Model<B> for ControlNetModel<B> {
    type Config = ControlNetConfig;
    const KIND: distorch_core::ComponentKind = distorch_core::ComponentKind::ControlNet;
    fn config_from_file(path: &Path) -> Result<ControlNetConfig, Error> {
        ControlNetConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<ControlNetConfig, Error> {
        if KeyLayout::of_unet(c) == KeyLayout::Diffusers {
            return Err(crate::load::needs_config("ControlNet"));
        }
        let shapes = crate::load::shape_map(c);
        ControlNetConfig::detect_ldm(shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())))
    }
    fn execution_order(config: &ControlNetConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        ControlNetModel::<B>::execution_order(config, KeyLayout::of_unet(c))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the ControlNet from `component` of `index` at the homes `plan` gives; the key
    /// layout is recognised from the names and every key and shape is checked first.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        let blocks = config.blocks()?;
        let map = match KeyLayout::of_unet(ctx.component) {
            KeyLayout::Diffusers => None,
            KeyLayout::Ldm => Some(ldm_controlnet_map(&config, &blocks)?),
        };
        let layers = ControlLayers::new(&config, &blocks, map.as_ref());
        let (streamer, report) = ctx.stream_recorded(&layers.expected)?;
        let trunk_config = config.trunk_config();
        Ok((
            ControlNetModel {
                config,
                trunk_config,
                blocks,
                streamer,
                layers,
            },
            report,
        ))
    }
}
