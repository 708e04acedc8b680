//! The UNet, as diffusers' `UNet2DConditionModel` for SD 1.x/2.x and SDXL: sinusoidal time
//! embedding, ResNet blocks with the time embedding added after the first convolution,
//! spatial transformers (conv or linear projection, N transformer layers, self- and
//! cross-attention, GEGLU feed-forward), strided-conv downsampling, nearest upsampling with
//! skip connections, SDXL's text-time addition embedding, and ControlNet residual inputs.
//! Diffusers' key layout.

pub(crate) mod config;
pub mod cost;
pub(crate) mod layers;
pub mod ldm;
pub(crate) mod trunk;

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::Component;
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};

use crate::error::Error;
use crate::load::keymap::{KeyLayout, KeyMap};
use crate::load::{LoadContext, Model, both_names, needs_config, shape_map};
use crate::nn::spec::{Conv2d, GroupNorm, Spec};
use crate::nn::{Weights, upsample_nearest2x};
use crate::sd::unet::config::{Blocks, UnetConfig};
use crate::sd::unet::layers::{DownMid, Embedding, Level, Resnet, Transformer2d};
use crate::sd::unet::ldm::detect;
use crate::sd::unet::ldm::ldm_map;
use crate::sd::unet::trunk::Trunk;
use distorch_core::ComponentKind;
use distorch_lora::ModelTensor;
use std::path::Path;

/// What one UNet evaluation takes.
#[derive(Debug, Clone)]
pub struct UnetInput<B: Backend> {
    /// Noisy latents, [batch, in_channels, h, w]; h and w divisible by 2^(levels - 1).
    pub sample: Tensor<B, 4>,
    /// Timesteps: one for the whole batch, or one per row.
    pub timesteps: Vec<f32>,
    /// Text conditioning, [batch, tokens, cross_attention_dim].
    pub encoder_hidden_states: Tensor<B, 3>,
    /// SDXL: pooled text embeddings [batch, d] and size/crop conditioning [batch, 6].
    pub text_time: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// ControlNet: one residual per down-block output, added to the skip connections.
    pub down_block_additional_residuals: Option<Vec<Tensor<B, 4>>>,
    /// ControlNet: added to the mid block's output.
    pub mid_block_additional_residual: Option<Tensor<B, 4>>,
}

impl<B: Backend> UnetInput<B> {
    /// An input without SDXL conditioning or ControlNet residuals.
    pub fn new(
        sample: Tensor<B, 4>,
        timesteps: Vec<f32>,
        encoder_hidden_states: Tensor<B, 3>,
    ) -> UnetInput<B> {
        UnetInput {
            sample,
            timesteps,
            encoder_hidden_states,
            text_time: None,
            down_block_additional_residuals: None,
            mid_block_additional_residual: None,
        }
    }

    /// Adds SDXL's `text_embeds` and `time_ids`.
    pub fn with_text_time(mut self, text_embeds: Tensor<B, 2>, time_ids: Tensor<B, 2>) -> Self {
        self.text_time = Some((text_embeds, time_ids));
        self
    }

    /// Adds ControlNet residuals.
    pub fn with_control(mut self, down: Vec<Tensor<B, 4>>, mid: Tensor<B, 4>) -> Self {
        self.down_block_additional_residuals = Some(down);
        self.mid_block_additional_residual = Some(mid);
        self
    }
}

/// A UNet whose weights live where its plan put them.
pub struct Unet2dCondition<B: Backend> {
    config: UnetConfig,
    blocks: Blocks,
    streamer: Arc<Streamer<B>>,
    layers: UnetLayers,
}

/// The UNet's layers in its file's layout, described once from the configuration.
struct UnetLayers {
    embed: Embedding,
    trunk: DownMid,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Every tensor, in the order the forward pass uses them.
    expected: Vec<ExpectedTensor>,
}

impl UnetLayers {
    /// The layers of a UNet of `c`, keys through `map` (the single-file layout) or
    /// diffusers' own.
    fn new(c: &UnetConfig, bl: &Blocks, map: Option<&KeyMap>) -> UnetLayers {
        let mut s = Spec::mapped(map);
        let embed = Embedding::new(&mut s, c);
        let trunk = DownMid::new(&mut s, c, bl);
        let mut skips = trunk.skips.clone();
        let ch = &c.block_out_channels;
        let n = ch.len();
        let mut out = ch[n - 1];
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = n - 1 - i;
            let prev = out;
            out = ch[level];
            let (mut resnets, mut attentions) = (Vec::new(), Vec::new());
            for j in 0..=bl.layers[level] {
                let skip = skips.pop().unwrap_or_default();
                let cin = if j == 0 { prev } else { out } + skip;
                let p = format!("up_blocks.{i}.resnets.{j}");
                resnets.push(Resnet::new(&mut s, &p, c, (cin, out)));
                if bl.up_attn[i] {
                    let p = format!("up_blocks.{i}.attentions.{j}");
                    let shape = (out, bl.depth[level], bl.heads[level]);
                    attentions.push(Transformer2d::new(&mut s, &p, c, bl, shape));
                }
            }
            let sampler = (i + 1 < n).then(|| {
                let p = format!("up_blocks.{i}.upsamplers.0.conv");
                s.conv2d(&p, out, out, 3, 1, 1)
            });
            up.push(Level {
                resnets,
                attentions,
                sampler,
            });
        }
        let (g, eps) = (c.norm_num_groups, c.norm_eps);
        let norm_out = s.group_norm("conv_norm_out", ch[0], g, eps);
        let conv_out = s.conv2d("conv_out", c.out_channels, ch[0], 3, 1, 1);
        UnetLayers {
            embed,
            trunk,
            up,
            norm_out,
            conv_out,
            expected: s.into_expected(),
        }
    }
}

impl<B: Backend> Unet2dCondition<B> {
    /// The tensors a UNet of `config` has, with their keys in `layout`.
    pub fn expected_tensors(
        config: &UnetConfig,
        layout: KeyLayout,
    ) -> Result<Vec<ExpectedTensor>, Error> {
        let blocks = config.blocks()?;
        let map = match layout {
            KeyLayout::Diffusers => None,
            KeyLayout::Ldm => Some(ldm_map(config, &blocks)?),
        };
        Ok(UnetLayers::new(config, &blocks, map.as_ref()).expected)
    }

    /// The units of a UNet of `config`, keys in `layout`, in the order a forward pass uses
    /// them: give it to [`distorch_alloc::Inventory::in_order`] before planning.
    pub fn execution_order(config: &UnetConfig, layout: KeyLayout) -> Result<Vec<String>, Error> {
        Ok(crate::load::units_in_order(&Self::expected_tensors(
            config, layout,
        )?))
    }

    fn trunk(&self) -> Trunk<'_> {
        Trunk {
            c: &self.config,
            bl: &self.blocks,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// One evaluation: the predicted noise (or v), [batch, out_channels, h, w].
    pub fn forward(&self, input: UnetInput<B>) -> Result<Tensor<B, 4>, Error> {
        let UnetInput {
            sample,
            timesteps,
            encoder_hidden_states: ctx,
            text_time,
            down_block_additional_residuals: mut down_res,
            mid_block_additional_residual: mid_res,
        } = input;
        let [batch, _, h, wd] = sample.dims();
        let trunk = self.trunk();
        trunk.check(&sample, &timesteps, &ctx, text_time.as_ref())?;
        let device = sample.device();
        let w = Weights::new(&self.streamer);
        let l = &self.layers;
        let temb = trunk.embed(&w, &l.embed, batch, timesteps, text_time, &device)?;
        let ctx = w.input(ctx);
        let x = l.embed.conv_in.forward(&w, w.input(sample))?;
        let (x, mut skips) = l.trunk.down(&w, x, &temb, &ctx)?;
        if let Some(res) = down_res.take() {
            if res.len() != skips.len() {
                return Err(Error::Input {
                    input: "down_block_additional_residuals",
                    reason: format!(
                        "{} residuals, the UNet has {} skip connections",
                        res.len(),
                        skips.len()
                    ),
                });
            }
            for (k, (s, r)) in skips.iter_mut().zip(res).enumerate() {
                if s.dims() != r.dims() {
                    return Err(Error::Input {
                        input: "down_block_additional_residuals",
                        reason: format!(
                            "residual {k} has shape {:?}, expected {:?}",
                            r.dims(),
                            s.dims()
                        ),
                    });
                }
                *s = s.clone() + w.input(r);
            }
        }

        let mut x = l.trunk.mid(&w, x, &temb, &ctx)?;
        if let Some(r) = mid_res {
            if r.dims() != x.dims() {
                return Err(Error::Input {
                    input: "mid_block_additional_residual",
                    reason: format!("shape {:?}, expected {:?}", r.dims(), x.dims()),
                });
            }
            x = x + w.input(r);
        }

        // Up.
        for level in &l.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                // The expected-tensor check guarantees one skip per up-block resnet.
                let skip = skips.pop().ok_or_else(|| Error::Input {
                    input: "sample",
                    reason: "skip connections ran out".into(),
                })?;
                x = resnet.forward(&w, Tensor::cat(vec![x, skip], 1), Some(&temb))?;
                if let Some(t) = level.attentions.get(j) {
                    x = t.forward(&w, x, &ctx)?;
                }
            }
            if let Some(conv) = &level.sampler {
                x = conv.forward(&w, upsample_nearest2x(x))?;
            }
        }
        x = l.norm_out.forward_silu(&w, x)?;
        let out = l.conv_out.forward(&w, x)?;
        debug_assert_eq!(out.dims()[2..], [h, wd]);
        Ok(w.output(out))
    }
}

impl<B: Backend> Model<B> for Unet2dCondition<B> {
    type Config = UnetConfig;
    const KIND: ComponentKind = ComponentKind::Unet;
    fn config_from_file(path: &Path) -> Result<UnetConfig, Error> {
        UnetConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<UnetConfig, Error> {
        if KeyLayout::of_unet(c) == KeyLayout::Diffusers {
            return Err(needs_config("UNet"));
        }
        let found = UnetConfig::detect(c)?;
        tracing::info!(
            family = found.family.name(),
            "detected the UNet's architecture"
        );
        Ok(found.config)
    }
    fn execution_order(config: &UnetConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Unet2dCondition::<B>::execution_order(config, KeyLayout::of_unet(c))
    }
    /// Each tensor under its diffusers module name and its original (LDM) one, whichever
    /// layout the file has: kohya LoRAs use the former, ComfyUI's own the latter.
    fn lora_tensors(config: &UnetConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        let ours = Unet2dCondition::<B>::expected_tensors(config, KeyLayout::Diffusers)?;
        let ldm = Unet2dCondition::<B>::expected_tensors(config, KeyLayout::Ldm)?;
        let file = Unet2dCondition::<B>::expected_tensors(config, KeyLayout::of_unet(c))?;
        let mut tensors = both_names(ours, file);
        for (t, l) in tensors.iter_mut().zip(ldm) {
            let m = l.name.rsplit_once('.').map_or(l.name.as_str(), |(m, _)| m);
            if !t.modules.iter().any(|x| x == m) {
                t.modules.push(m.to_owned());
            }
        }
        Ok(tensors)
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the UNet from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`](distorch_core::runtime::WeightStore::load)); the key layout (diffusers or the original single-file one) is
    /// recognised from the names, and every tensor's key and shape is checked against the
    /// config first. The streamer records the execution order on the first evaluation.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        let blocks = config.blocks()?;
        let map = match KeyLayout::of_unet(ctx.component) {
            KeyLayout::Diffusers => None,
            KeyLayout::Ldm => Some(ldm_map(&config, &blocks)?),
        };
        let layers = UnetLayers::new(&config, &blocks, map.as_ref());
        let (streamer, report) = ctx.stream_recorded(&layers.expected)?;
        Ok((
            Unet2dCondition {
                config,
                blocks,
                streamer,
                layers,
            },
            report,
        ))
    }
}

impl UnetConfig {
    /// The architecture of a single-file (LDM layout) UNet component, from its keys and
    /// shapes; a diffusers-layout UNet needs its `config.json`. A UNet of unknown family is
    /// detected with assumptions ([`DetectedUnet::assumed`]), which are logged as a warning
    /// naming how to give the configuration instead.
    ///
    /// [`DetectedUnet::assumed`]: crate::sd::unet::ldm::DetectedUnet::assumed
    pub fn detect(c: &Component<'_>) -> Result<crate::sd::unet::ldm::DetectedUnet, Error> {
        let shapes = shape_map(c);
        let found = detect(shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())))?;
        let assumed = found.assumed();
        if !assumed.is_empty() {
            tracing::warn!(
                assumed = assumed.join("; ").as_str(),
                "a UNet of no known family: its shapes do not say these, so they were \
                 assumed; give its configuration (a diffusers config.json, or UnetConfig) if \
                 they are wrong"
            );
        }
        Ok(found)
    }
}
