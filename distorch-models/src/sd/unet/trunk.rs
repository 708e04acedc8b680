//! What a UNet and a ControlNet compute alike before their layers: the input checks and the
//! time (and SDXL text-time) embedding.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::Error;
use crate::nn::{Weights, silu, timestep_embedding};
use crate::sd::unet::config::{Blocks, UnetConfig};
use crate::sd::unet::layers::Embedding;

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
        e: &Embedding,
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
        let mut emb = e.time_1.forward(w, t)?;
        emb = e.time_2.forward(w, silu(emb))?;
        if let (Some((text_embeds, time_ids)), Some((add_1, add_2))) = (text_time, &e.add) {
            let d = c.addition_time_embed_dim.unwrap_or_default();
            let [_, k] = time_ids.dims();
            let ids = time_ids.reshape([batch * k]);
            let ids =
                timestep_embedding(ids, d, c.flip_sin_to_cos, c.freq_shift).reshape([batch, k * d]);
            let add = Tensor::cat(vec![w.input(text_embeds), w.input(ids)], 1);
            let add = add_1.forward(w, add)?;
            emb = emb + add_2.forward(w, silu(add))?;
        }
        Ok(silu(emb))
    }
}
