//! The parts of diffusers' `UNet2DConditionModel` a ControlNet shares: input checks, time
//! (and SDXL text-time) embedding, the down blocks and the mid block, and the
//! expected-tensor walk of each.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use crate::attention::attention;
use crate::error::Error;
use crate::nn::{Weights, geglu, silu, timestep_embedding};
use crate::unet_config::{Blocks, UnetConfig};

/// Group-norm epsilon of the spatial transformers.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// A UNet-shaped model's configuration and expanded per-block values.
#[derive(Clone, Copy)]
pub(crate) struct Trunk<'a> {
    pub(crate) c: &'a UnetConfig,
    pub(crate) bl: &'a Blocks,
}

impl Trunk<'_> {
    /// Checks the inputs the UNet and a ControlNet share.
    pub(crate) fn check<B: Backend>(
        &self,
        sample: &Tensor<B, 4>,
        timesteps: &[f32],
        ctx: &Tensor<B, 3>,
        text_time: Option<&(Tensor<B, 2>, Tensor<B, 2>)>,
    ) -> Result<(), Error> {
        let c = self.c;
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
        if cb != batch || cd != self.bl.context {
            return bad(
                "encoder_hidden_states",
                format!(
                    "shape {:?}: expected [{batch}, _, {}]",
                    ctx.dims(),
                    self.bl.context
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
                let d = c.addition_time_embed_dim.unwrap_or_default();
                let total = c.projection_class_embeddings_input_dim.unwrap_or_default();
                let [tb, ids] = ti.dims();
                // SDXL base: 6 ids (sizes, crop, target); the refiner: 5 (an aesthetic score).
                let want = total.checked_sub(ids * d).filter(|w| *w > 0);
                if tb != batch || want.is_none_or(|w| te.dims() != [batch, w]) {
                    return bad(
                        "text_embeds",
                        format!(
                            "text_embeds {:?} and time_ids {:?}: expected [{batch}, n] and \
                             [{batch}, k] with n + k * {d} = {total}",
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

    /// The time embedding, plus SDXL's text-time embedding, through SiLU (what every
    /// ResNet block takes).
    pub(crate) fn embed<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        batch: usize,
        timesteps: Vec<f32>,
        text_time: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>, Error> {
        let c = self.c;
        let t: Vec<f32> = if timesteps.len() == 1 {
            vec![timesteps[0]; batch]
        } else {
            timesteps
        };
        let t = Tensor::<B, 1>::from_floats(t.as_slice(), device);
        let t = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
        let t = w.input(t);
        let mut emb = w.linear("time_embedding.linear_1", t)?;
        emb = w.linear("time_embedding.linear_2", silu(emb))?;
        if let Some((text_embeds, time_ids)) = text_time {
            let d = c.addition_time_embed_dim.unwrap_or_default();
            let [_, k] = time_ids.dims();
            let ids = time_ids.reshape([batch * k]);
            let ids =
                timestep_embedding(ids, d, c.flip_sin_to_cos, c.freq_shift).reshape([batch, k * d]);
            let add = Tensor::cat(vec![w.input(text_embeds), w.input(ids)], 1);
            let add = w.linear("add_embedding.linear_1", add)?;
            emb = emb + w.linear("add_embedding.linear_2", silu(add))?;
        }
        Ok(silu(emb))
    }

    /// The down blocks from `x` (after `conv_in`): the last output and every skip
    /// connection (`x` itself first).
    pub(crate) fn down<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        ctx: &Tensor<B, 3>,
    ) -> Result<(Tensor<B, 4>, Vec<Tensor<B, 4>>), Error> {
        let (c, bl) = (self.c, self.bl);
        let n = c.block_out_channels.len();
        let (g, eps) = (c.norm_num_groups, c.norm_eps);
        let mut skips = vec![x.clone()];
        for i in 0..n {
            for j in 0..bl.layers[i] {
                x = resnet(w, &format!("down_blocks.{i}.resnets.{j}"), x, temb, g, eps)?;
                if bl.down_attn[i] {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    x = self.transformer(w, &p, x, ctx, bl.heads[i], bl.depth[i])?;
                }
                skips.push(x.clone());
            }
            if i + 1 < n {
                let p = format!("down_blocks.{i}.downsamplers.0.conv");
                x = w.conv2d(&p, x, 2, c.downsample_padding)?;
                skips.push(x.clone());
            }
        }
        Ok((x, skips))
    }

    /// The mid block.
    pub(crate) fn mid<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        ctx: &Tensor<B, 3>,
    ) -> Result<Tensor<B, 4>, Error> {
        let (c, bl) = (self.c, self.bl);
        let top = c.block_out_channels.len() - 1;
        let (g, eps) = (c.norm_num_groups, c.norm_eps);
        let x = resnet(w, "mid_block.resnets.0", x, temb, g, eps)?;
        let p = "mid_block.attentions.0";
        let x = self.transformer(w, p, x, ctx, bl.heads[top], bl.depth[top])?;
        resnet(w, "mid_block.resnets.1", x, temb, g, eps)
    }

    /// diffusers' `Transformer2DModel` (continuous input) with `depth` transformer blocks.
    pub(crate) fn transformer<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        p: &str,
        x: Tensor<B, 4>,
        ctx: &Tensor<B, 3>,
        heads: usize,
        depth: usize,
    ) -> Result<Tensor<B, 4>, Error> {
        let [n, c, h, wd] = x.dims();
        let g = self.c.norm_num_groups;
        let linear = self.c.use_linear_projection;
        let y = w.group_norm(&format!("{p}.norm"), x.clone(), g, TRANSFORMER_NORM_EPS)?;
        let tokens = |t: Tensor<B, 4>| t.reshape([n, c, h * wd]).swap_dims(1, 2);
        let mut y = if linear {
            w.linear(&format!("{p}.proj_in"), tokens(y))?
        } else {
            tokens(w.conv2d(&format!("{p}.proj_in"), y, 1, 0)?)
        };
        let eps = self.c.norm_eps;
        for b in 0..depth {
            let q = format!("{p}.transformer_blocks.{b}");
            let m = w.layer_norm(&format!("{q}.norm1"), y.clone(), eps)?;
            y = y + self.attend(w, &format!("{q}.attn1"), m.clone(), m, heads)?;
            let m = w.layer_norm(&format!("{q}.norm2"), y.clone(), eps)?;
            y = y + self.attend(w, &format!("{q}.attn2"), m, ctx.clone(), heads)?;
            let m = w.layer_norm(&format!("{q}.norm3"), y.clone(), eps)?;
            let proj = w.linear(&format!("{q}.ff.net.0.proj"), m)?;
            y = y + w.linear(&format!("{q}.ff.net.2"), geglu(proj))?;
        }
        let spatial = |t: Tensor<B, 3>| t.swap_dims(1, 2).reshape([n, c, h, wd]);
        let out = if linear {
            spatial(w.linear(&format!("{p}.proj_out"), y)?)
        } else {
            w.conv2d(&format!("{p}.proj_out"), spatial(y), 1, 0)?
        };
        Ok(out + x)
    }

    fn attend<B: Backend>(
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
pub(crate) fn resnet<B: Backend>(
    w: &Weights<'_, B>,
    p: &str,
    x: Tensor<B, 4>,
    temb: &Tensor<B, 2>,
    groups: usize,
    eps: f64,
) -> Result<Tensor<B, 4>, Error> {
    let h = w.group_norm_silu(&format!("{p}.norm1"), x.clone(), groups, eps)?;
    let h = w.conv2d(&format!("{p}.conv1"), h, 1, 1)?;
    let t = w.linear(&format!("{p}.time_emb_proj"), temb.clone())?;
    let h = h + t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
    let h = w.group_norm_silu(&format!("{p}.norm2"), h, groups, eps)?;
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
pub(crate) struct Spec(pub(crate) Vec<ExpectedTensor>);

impl Spec {
    pub(crate) fn push(&mut self, name: String, shape: Vec<usize>) {
        self.0.push(ExpectedTensor { name, shape });
    }

    pub(crate) fn conv(&mut self, p: &str, o: usize, i: usize, k: usize) {
        self.push(format!("{p}.weight"), vec![o, i, k, k]);
        self.push(format!("{p}.bias"), vec![o]);
    }

    pub(crate) fn linear(&mut self, p: &str, o: usize, i: usize, bias: bool) {
        self.push(format!("{p}.weight"), vec![o, i]);
        if bias {
            self.push(format!("{p}.bias"), vec![o]);
        }
    }

    pub(crate) fn norm(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.weight"), vec![c]);
        self.push(format!("{p}.bias"), vec![c]);
    }

    pub(crate) fn resnet(&mut self, p: &str, cin: usize, cout: usize, temb: usize) {
        self.norm(&format!("{p}.norm1"), cin);
        self.conv(&format!("{p}.conv1"), cout, cin, 3);
        self.linear(&format!("{p}.time_emb_proj"), cout, temb, true);
        self.norm(&format!("{p}.norm2"), cout);
        self.conv(&format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{p}.conv_shortcut"), cout, cin, 1);
        }
    }

    pub(crate) fn transformer(
        &mut self,
        p: &str,
        c: usize,
        depth: usize,
        ctx: usize,
        linear: bool,
    ) {
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

    pub(crate) fn projection(&mut self, p: &str, c: usize, linear: bool) {
        if linear {
            self.linear(p, c, c, true);
        } else {
            self.conv(p, c, c, 1);
        }
    }
}

impl Trunk<'_> {
    /// The time (and text-time) embedding's tensors, then `conv_in`'s.
    pub(crate) fn spec_embed(&self, s: &mut Spec) {
        let c = self.c;
        let ch = &c.block_out_channels;
        let temb = 4 * ch[0];
        s.linear("time_embedding.linear_1", temb, ch[0], true);
        s.linear("time_embedding.linear_2", temb, temb, true);
        if c.has_text_time() {
            let d = c.projection_class_embeddings_input_dim.unwrap_or_default();
            s.linear("add_embedding.linear_1", temb, d, true);
            s.linear("add_embedding.linear_2", temb, temb, true);
        }
        s.conv("conv_in", ch[0], c.in_channels, 3);
    }

    /// The down and mid blocks' tensors; returns the channels of each skip connection.
    pub(crate) fn spec_down_mid(&self, s: &mut Spec) -> Vec<usize> {
        let (c, bl) = (self.c, self.bl);
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let lin = c.use_linear_projection;
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
        skips
    }
}
