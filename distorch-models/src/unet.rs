//! The UNet, as diffusers' `UNet2DConditionModel` for SD 1.x/2.x and SDXL: sinusoidal time
//! embedding, ResNet blocks with the time embedding added after the first convolution,
//! spatial transformers (conv or linear projection, N transformer layers, self- and
//! cross-attention, GEGLU feed-forward), strided-conv downsampling, nearest upsampling with
//! skip connections, SDXL's text-time addition embedding, and ControlNet residual inputs.
//! Diffusers' key layout.

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer, WeightStore,
};
use distorch_core::{Component, SafetensorsIndex};

use crate::error::Error;
use crate::keymap::{KeyLayout, KeyMap};
use crate::nn::{Weights, attention, silu, timestep_embedding, upsample_nearest2x};
use crate::unet_config::{Blocks, UnetConfig};
use crate::unet_ldm::ldm_map;

/// Group-norm epsilon of the spatial transformers.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;

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
        let mut seen = std::collections::HashSet::new();
        Ok(Self::expected_tensors(config, layout)?
            .into_iter()
            .filter_map(|e| e.name.rsplit_once('.').map(|(u, _)| u.to_owned()))
            .filter(|u| seen.insert(u.clone()))
            .collect())
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
        self.check_input(&sample, &timesteps, &ctx, text_time.as_ref())?;
        let device = sample.device();
        let w = Weights::new(&self.streamer, "").with_map(self.map.as_ref());
        let eps = c.norm_eps;
        let g = c.norm_num_groups;

        // Time (and SDXL text-time) embedding.
        let t: Vec<f32> = if timesteps.len() == 1 {
            vec![timesteps[0]; batch]
        } else {
            timesteps
        };
        let t = Tensor::<B, 1>::from_floats(t.as_slice(), &device);
        let t = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
        let mut emb = w.linear("time_embedding.linear_1", t)?;
        emb = w.linear("time_embedding.linear_2", silu(emb))?;
        if let Some((text_embeds, time_ids)) = text_time {
            let d = c.addition_time_embed_dim.unwrap_or_default();
            let ids = time_ids.reshape([batch * 6]);
            let ids =
                timestep_embedding(ids, d, c.flip_sin_to_cos, c.freq_shift).reshape([batch, 6 * d]);
            let add = Tensor::cat(vec![text_embeds, ids], 1);
            let add = w.linear("add_embedding.linear_1", add)?;
            emb = emb + w.linear("add_embedding.linear_2", silu(add))?;
        }
        let temb = silu(emb);

        // Down.
        let mut x = w.conv2d("conv_in", sample, 1, 1)?;
        let mut skips = vec![x.clone()];
        for i in 0..n {
            for j in 0..bl.layers[i] {
                x = resnet(
                    &w,
                    &format!("down_blocks.{i}.resnets.{j}"),
                    x,
                    &temb,
                    g,
                    eps,
                )?;
                if bl.down_attn[i] {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    x = self.transformer(&w, &p, x, &ctx, bl.heads[i], bl.depth[i])?;
                }
                skips.push(x.clone());
            }
            if i + 1 < n {
                let p = format!("down_blocks.{i}.downsamplers.0.conv");
                x = w.conv2d(&p, x, 2, c.downsample_padding)?;
                skips.push(x.clone());
            }
        }
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
                *s = s.clone() + r;
            }
        }

        // Mid.
        let top = n - 1;
        x = resnet(&w, "mid_block.resnets.0", x, &temb, g, eps)?;
        x = self.transformer(
            &w,
            "mid_block.attentions.0",
            x,
            &ctx,
            bl.heads[top],
            bl.depth[top],
        )?;
        x = resnet(&w, "mid_block.resnets.1", x, &temb, g, eps)?;
        if let Some(r) = mid_res {
            if r.dims() != x.dims() {
                return Err(Error::Input {
                    input: "mid_block_additional_residual",
                    reason: format!("shape {:?}, expected {:?}", r.dims(), x.dims()),
                });
            }
            x = x + r;
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
                    x = self.transformer(&w, &p, x, &ctx, bl.heads[level], bl.depth[level])?;
                }
            }
            if i + 1 < n {
                let p = format!("up_blocks.{i}.upsamplers.0.conv");
                x = w.conv2d(&p, upsample_nearest2x(x), 1, 1)?;
            }
        }
        x = silu(w.group_norm("conv_norm_out", x, g, eps)?);
        let out = w.conv2d("conv_out", x, 1, 1)?;
        debug_assert_eq!(out.dims()[2..], [h, wd]);
        Ok(out)
    }

    fn check_input(
        &self,
        sample: &Tensor<B, 4>,
        timesteps: &[f32],
        ctx: &Tensor<B, 3>,
        text_time: Option<&(Tensor<B, 2>, Tensor<B, 2>)>,
    ) -> Result<(), Error> {
        let c = &self.config;
        let [batch, ch, h, wd] = sample.dims();
        let f = 1 << (c.block_out_channels.len() - 1);
        let bad = |input, reason| Err(Error::Input { input, reason });
        if ch != c.in_channels || h == 0 || wd == 0 || h % f != 0 || wd % f != 0 {
            return bad(
                "sample",
                format!(
                    "shape {:?}: expected {} channels and a size divisible by {f}",
                    sample.dims(),
                    c.in_channels
                ),
            );
        }
        if timesteps.len() != 1 && timesteps.len() != batch {
            return bad(
                "timestep",
                format!("{} timesteps for a batch of {batch}", timesteps.len()),
            );
        }
        let [cb, _, cd] = ctx.dims();
        if cb != batch || cd != self.blocks.context {
            return bad(
                "encoder_hidden_states",
                format!(
                    "shape {:?}: expected [{batch}, _, {}]",
                    ctx.dims(),
                    self.blocks.context
                ),
            );
        }
        match (c.has_text_time(), text_time) {
            (true, None) => bad(
                "text_embeds",
                "this UNet (addition_embed_type text_time, SDXL) needs text_embeds and time_ids"
                    .into(),
            ),
            (false, Some(_)) => bad(
                "text_embeds",
                "this UNet has no text-time embedding (not SDXL)".into(),
            ),
            (true, Some((te, ti))) => {
                let want = c.projection_class_embeddings_input_dim.unwrap_or_default()
                    - 6 * c.addition_time_embed_dim.unwrap_or_default();
                if te.dims() != [batch, want] || ti.dims() != [batch, 6] {
                    return bad(
                        "text_embeds",
                        format!(
                            "text_embeds {:?} and time_ids {:?}: expected [{batch}, {want}] \
                             and [{batch}, 6]",
                            te.dims(),
                            ti.dims()
                        ),
                    );
                }
                Ok(())
            }
            (false, None) => Ok(()),
        }
    }

    /// diffusers' `Transformer2DModel` (continuous input) with `depth` transformer blocks.
    fn transformer(
        &self,
        w: &Weights<'_, B>,
        p: &str,
        x: Tensor<B, 4>,
        ctx: &Tensor<B, 3>,
        heads: usize,
        depth: usize,
    ) -> Result<Tensor<B, 4>, Error> {
        let [n, c, h, wd] = x.dims();
        let g = self.config.norm_num_groups;
        let linear = self.config.use_linear_projection;
        let y = w.group_norm(&format!("{p}.norm"), x.clone(), g, TRANSFORMER_NORM_EPS)?;
        let tokens = |t: Tensor<B, 4>| t.reshape([n, c, h * wd]).swap_dims(1, 2);
        let mut y = if linear {
            w.linear(&format!("{p}.proj_in"), tokens(y))?
        } else {
            tokens(w.conv2d(&format!("{p}.proj_in"), y, 1, 0)?)
        };
        let eps = self.config.norm_eps;
        for b in 0..depth {
            let q = format!("{p}.transformer_blocks.{b}");
            let m = w.layer_norm(&format!("{q}.norm1"), y.clone(), eps)?;
            y = y + self.attend(w, &format!("{q}.attn1"), m.clone(), m, heads)?;
            let m = w.layer_norm(&format!("{q}.norm2"), y.clone(), eps)?;
            y = y + self.attend(w, &format!("{q}.attn2"), m, ctx.clone(), heads)?;
            let m = w.layer_norm(&format!("{q}.norm3"), y.clone(), eps)?;
            let proj = w.linear(&format!("{q}.ff.net.0.proj"), m)?;
            let inner = proj.dims()[2] / 2;
            let geglu = proj.clone().narrow(2, 0, inner) * gelu(proj.narrow(2, inner, inner));
            y = y + w.linear(&format!("{q}.ff.net.2"), geglu)?;
        }
        let spatial = |t: Tensor<B, 3>| t.swap_dims(1, 2).reshape([n, c, h, wd]);
        let out = if linear {
            spatial(w.linear(&format!("{p}.proj_out"), y)?)
        } else {
            w.conv2d(&format!("{p}.proj_out"), spatial(y), 1, 0)?
        };
        Ok(out + x)
    }

    fn attend(
        &self,
        w: &Weights<'_, B>,
        p: &str,
        x: Tensor<B, 3>,
        ctx: Tensor<B, 3>,
        heads: usize,
    ) -> Result<Tensor<B, 3>, Error> {
        let q = w.linear(&format!("{p}.to_q"), x)?;
        let k = w.linear(&format!("{p}.to_k"), ctx.clone())?;
        let v = w.linear(&format!("{p}.to_v"), ctx)?;
        w.linear(&format!("{p}.to_out.0"), attention(q, k, v, heads, None))
    }
}

/// diffusers' `ResnetBlock2D` with a time embedding (`temb` already through SiLU).
fn resnet<B: Backend>(
    w: &Weights<'_, B>,
    p: &str,
    x: Tensor<B, 4>,
    temb: &Tensor<B, 2>,
    groups: usize,
    eps: f64,
) -> Result<Tensor<B, 4>, Error> {
    let h = silu(w.group_norm(&format!("{p}.norm1"), x.clone(), groups, eps)?);
    let h = w.conv2d(&format!("{p}.conv1"), h, 1, 1)?;
    let t = w.linear(&format!("{p}.time_emb_proj"), temb.clone())?;
    let h = h + t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
    let h = silu(w.group_norm(&format!("{p}.norm2"), h, groups, eps)?);
    let h = w.conv2d(&format!("{p}.conv2"), h, 1, 1)?;
    let skip = if w.has(&format!("{p}.conv_shortcut")) {
        w.conv2d(&format!("{p}.conv_shortcut"), x, 1, 0)?
    } else {
        x
    };
    Ok(skip + h)
}

/// Collects expected tensors while walking the architecture as the forward pass does, so
/// their order is the execution order.
struct Spec(Vec<ExpectedTensor>);

impl Spec {
    fn push(&mut self, name: String, shape: Vec<usize>) {
        self.0.push(ExpectedTensor { name, shape });
    }

    fn conv(&mut self, p: &str, o: usize, i: usize, k: usize) {
        self.push(format!("{p}.weight"), vec![o, i, k, k]);
        self.push(format!("{p}.bias"), vec![o]);
    }

    fn linear(&mut self, p: &str, o: usize, i: usize, bias: bool) {
        self.push(format!("{p}.weight"), vec![o, i]);
        if bias {
            self.push(format!("{p}.bias"), vec![o]);
        }
    }

    fn norm(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.weight"), vec![c]);
        self.push(format!("{p}.bias"), vec![c]);
    }

    fn resnet(&mut self, p: &str, cin: usize, cout: usize, temb: usize) {
        self.norm(&format!("{p}.norm1"), cin);
        self.conv(&format!("{p}.conv1"), cout, cin, 3);
        self.linear(&format!("{p}.time_emb_proj"), cout, temb, true);
        self.norm(&format!("{p}.norm2"), cout);
        self.conv(&format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{p}.conv_shortcut"), cout, cin, 1);
        }
    }

    fn transformer(&mut self, p: &str, c: usize, depth: usize, ctx: usize, linear: bool) {
        self.norm(&format!("{p}.norm"), c);
        self.projection(&format!("{p}.proj_in"), c, linear);
        for b in 0..depth {
            let q = format!("{p}.transformer_blocks.{b}");
            for norm in ["norm1", "norm2", "norm3"] {
                self.norm(&format!("{q}.{norm}"), c);
            }
            for (attn, kv) in [("attn1", c), ("attn2", ctx)] {
                self.linear(&format!("{q}.{attn}.to_q"), c, c, false);
                self.linear(&format!("{q}.{attn}.to_k"), c, kv, false);
                self.linear(&format!("{q}.{attn}.to_v"), c, kv, false);
                self.linear(&format!("{q}.{attn}.to_out.0"), c, c, true);
            }
            self.linear(&format!("{q}.ff.net.0.proj"), 8 * c, c, true);
            self.linear(&format!("{q}.ff.net.2"), c, 4 * c, true);
        }
        self.projection(&format!("{p}.proj_out"), c, linear);
    }

    fn projection(&mut self, p: &str, c: usize, linear: bool) {
        if linear {
            self.linear(p, c, c, true);
        } else {
            self.conv(p, c, c, 1);
        }
    }
}

fn expected_tensors(c: &UnetConfig, bl: &Blocks) -> Vec<ExpectedTensor> {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let temb = 4 * ch[0];
    let lin = c.use_linear_projection;
    let mut s = Spec(Vec::new());
    s.linear("time_embedding.linear_1", temb, ch[0], true);
    s.linear("time_embedding.linear_2", temb, temb, true);
    if c.has_text_time() {
        let d = c.projection_class_embeddings_input_dim.unwrap_or_default();
        s.linear("add_embedding.linear_1", temb, d, true);
        s.linear("add_embedding.linear_2", temb, temb, true);
    }
    s.conv("conv_in", ch[0], c.in_channels, 3);
    let mut skips = vec![ch[0]];
    let mut out = ch[0];
    for (i, &level_out) in ch.iter().enumerate() {
        let inp = out;
        out = level_out;
        for j in 0..bl.layers[i] {
            let cin = if j == 0 { inp } else { out };
            s.resnet(&format!("down_blocks.{i}.resnets.{j}"), cin, out, temb);
            if bl.down_attn[i] {
                let p = format!("down_blocks.{i}.attentions.{j}");
                s.transformer(&p, out, bl.depth[i], bl.context, lin);
            }
            skips.push(out);
        }
        if i + 1 < n {
            s.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), out, out, 3);
            skips.push(out);
        }
    }
    let top = ch[n - 1];
    s.resnet("mid_block.resnets.0", top, top, temb);
    s.transformer(
        "mid_block.attentions.0",
        top,
        bl.depth[n - 1],
        bl.context,
        lin,
    );
    s.resnet("mid_block.resnets.1", top, top, temb);
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
