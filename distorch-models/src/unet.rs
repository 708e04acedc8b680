//! The UNet, as diffusers' `UNet2DConditionModel` for SD 1.x/2.x and SDXL: sinusoidal time
//! embedding, ResNet blocks with the time embedding added after the first convolution,
//! spatial transformers (conv or linear projection, N transformer layers, self- and
//! cross-attention, GEGLU feed-forward), strided-conv downsampling, nearest upsampling with
//! skip connections, SDXL's text-time addition embedding, and ControlNet residual inputs.
//! Diffusers' key layout.

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer, WeightStore,
};
use distorch_core::{Component, SafetensorsIndex};

use crate::error::Error;
use crate::keymap::{KeyLayout, KeyMap};
use crate::nn::{Weights, upsample_nearest2x};
use crate::unet_config::{Blocks, UnetConfig};
use crate::unet_ldm::ldm_map;
use crate::unet_trunk::{Spec, Trunk, resnet};

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
    /// diffusers names to the file's, for the single-file layout.
    map: Option<KeyMap>,
}

impl<B: Backend> Unet2dCondition<B> {
    /// Loads the UNet from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`]); the key layout (diffusers or the original single-file one) is
    /// recognised from the names, and every tensor's key and shape is checked against the
    /// config first. The streamer records the execution order on the first evaluation.
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: UnetConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Unet2dCondition<B>, LoadReport), Error> {
        let blocks = config.blocks()?;
        let map = match KeyLayout::of_unet(component) {
            KeyLayout::Diffusers => None,
            KeyLayout::Ldm => Some(ldm_map(&config, &blocks)?),
        };
        let expected = expected_tensors(&config, &blocks);
        let expected = match &map {
            Some(m) => m.expected(expected),
            None => expected,
        };
        let options = options.expecting(&expected);
        let (store, report) = WeightStore::load(index, component, plan, devices, &options)?;
        let streamer = Arc::new(Streamer::new(Arc::new(store), lookahead));
        Ok((
            Unet2dCondition {
                config,
                blocks,
                streamer,
                map,
            },
            report,
        ))
    }

    /// The tensors a UNet of `config` has, with their keys in `layout`.
    pub fn expected_tensors(
        config: &UnetConfig,
        layout: KeyLayout,
    ) -> Result<Vec<ExpectedTensor>, Error> {
        let blocks = config.blocks()?;
        let expected = expected_tensors(config, &blocks);
        Ok(match layout {
            KeyLayout::Diffusers => expected,
            KeyLayout::Ldm => ldm_map(config, &blocks)?.expected(expected),
        })
    }

    /// The units of a UNet of `config`, keys in `layout`, in the order a forward pass uses
    /// them: give it to [`distorch_alloc::Inventory::in_order`] before planning.
    pub fn execution_order(config: &UnetConfig, layout: KeyLayout) -> Result<Vec<String>, Error> {
        Ok(crate::loader::units_in_order(Self::expected_tensors(
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
        let c = &self.config;
        let bl = &self.blocks;
        let n = c.block_out_channels.len();
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
        let w = Weights::new(&self.streamer, "").with_map(self.map.as_ref());
        let eps = c.norm_eps;
        let g = c.norm_num_groups;
        let temb = trunk.embed(&w, batch, timesteps, text_time, &device)?;
        let ctx = w.input(ctx);
        let x = w.conv2d("conv_in", w.input(sample), 1, 1)?;
        let (x, mut skips) = trunk.down(&w, x, &temb, &ctx)?;
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

        let mut x = trunk.mid(&w, x, &temb, &ctx)?;
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
        for i in 0..n {
            let level = n - 1 - i;
            for j in 0..=bl.layers[level] {
                // The expected-tensor check guarantees one skip per up-block resnet.
                let skip = skips.pop().ok_or_else(|| Error::Input {
                    input: "sample",
                    reason: "skip connections ran out".into(),
                })?;
                x = Tensor::cat(vec![x, skip], 1);
                x = resnet(&w, &format!("up_blocks.{i}.resnets.{j}"), x, &temb, g, eps)?;
                if bl.up_attn[i] {
                    let p = format!("up_blocks.{i}.attentions.{j}");
                    x = trunk.transformer(&w, &p, x, &ctx, bl.heads[level], bl.depth[level])?;
                }
            }
            if i + 1 < n {
                let p = format!("up_blocks.{i}.upsamplers.0.conv");
                x = w.conv2d(&p, upsample_nearest2x(x), 1, 1)?;
            }
        }
        x = w.group_norm_silu("conv_norm_out", x, g, eps)?;
        let out = w.conv2d("conv_out", x, 1, 1)?;
        debug_assert_eq!(out.dims()[2..], [h, wd]);
        Ok(w.output(out))
    }
}

fn expected_tensors(c: &UnetConfig, bl: &Blocks) -> Vec<ExpectedTensor> {
    let trunk = Trunk { c, bl };
    let mut s = Spec(Vec::new());
    trunk.spec_embed(&mut s);
    let mut skips = trunk.spec_down_mid(&mut s);
    let ch = &c.block_out_channels;
    let n = ch.len();
    let temb = 4 * ch[0];
    let lin = c.use_linear_projection;
    let top = ch[n - 1];
    let mut out = top;
    for i in 0..n {
        let level = n - 1 - i;
        let prev = out;
        out = ch[level];
        for j in 0..=bl.layers[level] {
            let skip = skips.pop().unwrap_or_default();
            let cin = if j == 0 { prev } else { out } + skip;
            s.resnet(&format!("up_blocks.{i}.resnets.{j}"), cin, out, temb);
            if bl.up_attn[i] {
                let p = format!("up_blocks.{i}.attentions.{j}");
                s.transformer(&p, out, bl.depth[level], bl.context, lin);
            }
        }
        if i + 1 < n {
            s.conv(&format!("up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
        }
    }
    s.norm("conv_norm_out", ch[0]);
    s.conv("conv_out", c.out_channels, ch[0], 3);
    s.0
}
