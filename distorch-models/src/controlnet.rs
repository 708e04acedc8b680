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
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer, WeightStore,
};
use distorch_core::{Component, SafetensorsIndex};
use serde::Deserialize;

use crate::error::Error;
use crate::keymap::{KeyLayout, KeyMap};
use crate::nn::{Weights, silu};
use crate::unet::UnetInput;
use crate::unet_config::{Blocks, UnetConfig};
use crate::unet_ldm::ldm_map;
use crate::unet_trunk::{Spec, Trunk};

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
        let config: ControlNetConfig = crate::config::read(path.as_ref())?;
        config.check()?;
        Ok(config)
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
        let unsupported = |field, value: String, reason| {
            Err(Error::Unsupported {
                field,
                value,
                reason,
            })
        };
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
        let mismatch = |what: &str, mine: String, theirs: String| {
            Err(Error::Input {
                input: "controlnet",
                reason: format!(
                    "the ControlNet's {what} is {mine}, the UNet's is {theirs}: they were not \
                     made for each other"
                ),
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
    map: Option<KeyMap>,
}

impl<B: Backend> ControlNetModel<B> {
    /// Loads the ControlNet from `component` of `index` at the homes `plan` gives; the key
    /// layout is recognised from the names and every key and shape is checked first.
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: ControlNetConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(ControlNetModel<B>, LoadReport), Error> {
        let blocks = config.blocks()?;
        let layout = KeyLayout::of_unet(component);
        let expected = Self::expected_tensors(&config, layout)?;
        let map = match layout {
            KeyLayout::Diffusers => None,
            KeyLayout::Ldm => Some(ldm_controlnet_map(&config, &blocks)?),
        };
        let options = options.expecting(&expected);
        let (store, report) = WeightStore::load(index, component, plan, devices, &options)?;
        let streamer = Arc::new(Streamer::new(Arc::new(store), lookahead));
        let trunk_config = config.trunk_config();
        Ok((
            ControlNetModel {
                config,
                trunk_config,
                blocks,
                streamer,
                map,
            },
            report,
        ))
    }

    /// The tensors a ControlNet of `config` has, keys in `layout`, in execution order.
    pub fn expected_tensors(
        config: &ControlNetConfig,
        layout: KeyLayout,
    ) -> Result<Vec<ExpectedTensor>, Error> {
        let blocks = config.blocks()?;
        let trunk_config = config.trunk_config();
        let trunk = Trunk {
            c: &trunk_config,
            bl: &blocks,
        };
        let mut s = Spec(Vec::new());
        trunk.spec_embed(&mut s);
        let hint = &config.conditioning_embedding_out_channels;
        s.conv(
            "controlnet_cond_embedding.conv_in",
            hint[0],
            config.conditioning_channels,
            3,
        );
        for (i, pair) in hint.windows(2).enumerate() {
            let p = "controlnet_cond_embedding.blocks";
            s.conv(&format!("{p}.{}", 2 * i), pair[0], pair[0], 3);
            s.conv(&format!("{p}.{}", 2 * i + 1), pair[1], pair[0], 3);
        }
        let last = hint[hint.len() - 1];
        let first = config.unet.block_out_channels[0];
        s.conv("controlnet_cond_embedding.conv_out", first, last, 3);
        let skips = trunk.spec_down_mid(&mut s);
        for (k, &ch) in skips.iter().enumerate() {
            s.conv(&format!("controlnet_down_blocks.{k}"), ch, ch, 1);
        }
        let top = config.unet.block_out_channels[config.unet.block_out_channels.len() - 1];
        s.conv("controlnet_mid_block", top, top, 1);
        Ok(match layout {
            KeyLayout::Diffusers => s.0,
            KeyLayout::Ldm => ldm_controlnet_map(config, &blocks)?.expected(s.0),
        })
    }

    /// The units in the order a forward pass uses them (for the planner).
    pub fn execution_order(
        config: &ControlNetConfig,
        layout: KeyLayout,
    ) -> Result<Vec<String>, Error> {
        Ok(crate::loader::units_in_order(Self::expected_tensors(
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
        let w = Weights::new(&self.streamer, "").with_map(self.map.as_ref());
        let temb = trunk.embed(&w, batch, timesteps, text_time, &device)?;
        let ctx = w.input(ctx);
        let x = w.conv2d("conv_in", w.input(sample), 1, 1)?;

        let p = "controlnet_cond_embedding";
        let mut e = silu(w.conv2d(&format!("{p}.conv_in"), w.input(hint), 1, 1)?);
        for i in 0..2 * (self.config.conditioning_embedding_out_channels.len() - 1) {
            let stride = if i % 2 == 1 { 2 } else { 1 };
            e = silu(w.conv2d(&format!("{p}.blocks.{i}"), e, stride, 1)?);
        }
        let e = w.conv2d(&format!("{p}.conv_out"), e, 1, 1)?;

        let (x, skips) = trunk.down(&w, x + e, &temb, &ctx)?;
        let x = trunk.mid(&w, x, &temb, &ctx)?;
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
        for (k, s) in skips.into_iter().enumerate() {
            let r = w.conv2d(&format!("controlnet_down_blocks.{k}"), s, 1, 0)?;
            down.push(w.output(pool(r.mul_scalar(scales[k]))));
        }
        let mid = w.conv2d("controlnet_mid_block", x, 1, 0)?;
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
    /// ([`crate::unet_ldm::detect`]), the hint embedding's widths from `input_hint_block.*`.
    pub fn detect_ldm<'a>(
        tensors: impl Iterator<Item = (&'a str, &'a [u64])> + Clone,
    ) -> Result<ControlNetConfig, Error> {
        let unet = crate::unet_ldm::detect(tensors.clone())?.config;
        let hint: std::collections::BTreeMap<usize, &[u64]> = tensors
            .filter_map(|(k, s)| {
                let i = k
                    .strip_prefix("input_hint_block.")?
                    .strip_suffix(".weight")?;
                Some((i.parse().ok()?, s))
            })
            .collect();
        let bad = |reason: String| Error::Input {
            input: "checkpoint",
            reason: format!("not a single-file ControlNet: {reason}"),
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

impl<B: Backend> crate::loader::Model<B> for ControlNetModel<B> {
    type Config = ControlNetConfig;
    const KIND: distorch_core::ComponentKind = distorch_core::ComponentKind::ControlNet;
    fn config_from_file(path: &Path) -> Result<ControlNetConfig, Error> {
        ControlNetConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<ControlNetConfig, Error> {
        if KeyLayout::of_unet(c) == KeyLayout::Diffusers {
            return Err(crate::checkpoint::needs_config("ControlNet"));
        }
        let shapes = crate::loader::shape_map(c);
        ControlNetConfig::detect_ldm(shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())))
    }
    fn execution_order(config: &ControlNetConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        ControlNetModel::<B>::execution_order(config, KeyLayout::of_unet(c))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    fn load(
        index: &SafetensorsIndex,
        c: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: ControlNetConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Self, LoadReport), Error> {
        ControlNetModel::load(index, c, plan, devices, config, options, lookahead)
    }
}
