//! The Wan transformer's layers, declared once from its configuration through a [`Spec`] in
//! either key layout, and the transformer block's forward pass.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use crate::error::Error;
use crate::nn::attention::attention;
use crate::nn::rope::rope;
use crate::nn::spec::{LayerNorm, Linear, Param, Spec, UnitKey};
use crate::nn::{Weights, f32, gelu_tanh, in_f32, layer_norm_plain, rms_norm, to_dtype};
use crate::wan::dit::{WanDitConfig, WanLayout};

/// The transformer's layers in its file's layout.
pub(crate) struct DitLayers {
    /// The patch embedding: a 3-D convolution whose kernel is its stride.
    pub(crate) patch: UnitKey,
    pub(crate) time_1: Linear,
    pub(crate) time_2: Linear,
    pub(crate) time_proj: Linear,
    pub(crate) text_1: Linear,
    pub(crate) text_2: Linear,
    pub(crate) blocks: Vec<DitBlock>,
    /// The output norm's modulation table, [1, 2, dim].
    pub(crate) table: Param,
    pub(crate) proj_out: Linear,
    /// Every tensor, in the order the forward pass uses them.
    pub(crate) expected: Vec<ExpectedTensor>,
}

impl DitLayers {
    /// The layers of a transformer of `c`, keys in `layout`.
    pub(crate) fn new(c: &WanDitConfig, layout: WanLayout) -> DitLayers {
        let d = c.inner_dim();
        let [pt, ph, pw] = c.patch_size;
        let mut s = Spec::new(|name| layout.unit(name));
        let patch = s.unit(
            "patch_embedding",
            &[
                ("weight", vec![d, c.in_channels, pt, ph, pw]),
                ("bias", vec![d]),
            ],
        );
        let ce = "condition_embedder";
        let time_1 = s.linear(&format!("{ce}.time_embedder.linear_1"), d, c.freq_dim, true);
        let time_2 = s.linear(&format!("{ce}.time_embedder.linear_2"), d, d, true);
        let time_proj = s.linear(&format!("{ce}.time_proj"), 6 * d, d, true);
        let text_1 = s.linear(&format!("{ce}.text_embedder.linear_1"), d, c.text_dim, true);
        let text_2 = s.linear(&format!("{ce}.text_embedder.linear_2"), d, d, true);
        let blocks = (0..c.num_layers)
            .map(|b| DitBlock::new(&mut s, &format!("blocks.{b}"), c))
            .collect();
        let table = s.tensor("scale_shift_table", vec![1, 2, d]);
        let proj_out = s.linear("proj_out", c.out_channels * pt * ph * pw, d, true);
        DitLayers {
            patch,
            time_1,
            time_2,
            time_proj,
            text_1,
            text_2,
            blocks,
            table,
            proj_out,
            expected: s.into_expected(),
        }
    }
}

/// Attention with RMS-normed queries and keys.
pub(crate) struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Param,
    norm_k: Param,
    out: Linear,
}

impl Attention {
    fn new(s: &mut Spec<'_>, p: &str, d: usize) -> Attention {
        let q = s.linear(&format!("{p}.to_q"), d, d, true);
        let k = s.linear(&format!("{p}.to_k"), d, d, true);
        let v = s.linear(&format!("{p}.to_v"), d, d, true);
        Attention {
            q,
            k,
            v,
            norm_q: s.param(&format!("{p}.norm_q"), "weight", vec![d]),
            norm_k: s.param(&format!("{p}.norm_k"), "weight", vec![d]),
            out: s.linear(&format!("{p}.to_out.0"), d, d, true),
        }
    }
}

/// One transformer block: modulated self-attention with RoPE, cross-attention to the text,
/// modulated feed-forward.
pub(crate) struct DitBlock {
    table: Param,
    self_attn: Attention,
    norm2: Option<LayerNorm>,
    cross_attn: Attention,
    ffn_in: Linear,
    ffn_out: Linear,
}

/// What every block of one forward pass shares.
pub(crate) struct BlockContext<'a, B: Backend> {
    pub(crate) config: &'a WanDitConfig,
    /// The time projection, [batch, 6, dim].
    pub(crate) modulation: Tensor<B, 3>,
    /// The embedded text, [batch, tokens, dim].
    pub(crate) text: Tensor<B, 3>,
    pub(crate) cos: Tensor<B, 2>,
    pub(crate) sin: Tensor<B, 2>,
}

impl DitBlock {
    fn new(s: &mut Spec<'_>, p: &str, c: &WanDitConfig) -> DitBlock {
        let d = c.inner_dim();
        let table = s.tensor(&format!("{p}.scale_shift_table"), vec![1, 6, d]);
        let self_attn = Attention::new(s, &format!("{p}.attn1"), d);
        let norm2 = c
            .cross_attn_norm
            .then(|| s.layer_norm(&format!("{p}.norm2"), d, c.eps));
        let cross_attn = Attention::new(s, &format!("{p}.attn2"), d);
        DitBlock {
            table,
            self_attn,
            norm2,
            cross_attn,
            ffn_in: s.linear(&format!("{p}.ffn.net.0.proj"), c.ffn_dim, d, true),
            ffn_out: s.linear(&format!("{p}.ffn.net.2"), d, c.ffn_dim, true),
        }
    }

    /// The block on `x`. As diffusers' Wan blocks: modulation, the modulated norms and the
    /// gated residual updates in f32, the result in the compute dtype.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 3>,
        cx: &BlockContext<'_, B>,
    ) -> Result<Tensor<B, 3>, Error> {
        let c = cx.config;
        let (dt, eps) = (w.dtype(), c.eps);
        let (heads, hd) = (c.num_attention_heads, c.attention_head_dim);
        let table: Tensor<B, 3> = self.table.get(w)?;
        let m = f32(table) + f32(cx.modulation.clone());
        let chunk = |k: usize| m.clone().narrow(1, k, 1);
        let modulated = |x: Tensor<B, 3>, k: usize| {
            to_dtype(
                layer_norm_plain(f32(x), eps) * (chunk(k + 1) + 1.0) + chunk(k),
                dt,
            )
        };
        let gated =
            |x: Tensor<B, 3>, a: Tensor<B, 3>, k: usize| to_dtype(f32(x) + f32(a) * chunk(k), dt);
        let norm = |p: &Param, z: Tensor<B, 3>| -> Result<Tensor<B, 3>, Error> {
            Ok(rms_norm(z, p.get(w)?, eps))
        };

        let y = modulated(x.clone(), 0);
        let sa = &self.self_attn;
        let roped = |z: Tensor<B, 3>| in_f32(z, |z| rope(z, &cx.cos, &cx.sin, heads, hd));
        let q = roped(norm(&sa.norm_q, sa.q.forward(w, y.clone())?)?);
        let k = roped(norm(&sa.norm_k, sa.k.forward(w, y.clone())?)?);
        let v = sa.v.forward(w, y)?;
        let a = sa.out.forward(w, attention(q, k, v, heads, None))?;
        let mut x = gated(x, a, 2);

        let y = match &self.norm2 {
            Some(n) => n.forward(w, x.clone())?,
            None => x.clone(),
        };
        let ca = &self.cross_attn;
        let q = norm(&ca.norm_q, ca.q.forward(w, y)?)?;
        let k = norm(&ca.norm_k, ca.k.forward(w, cx.text.clone())?)?;
        let v = ca.v.forward(w, cx.text.clone())?;
        x = x + ca.out.forward(w, attention(q, k, v, heads, None))?;

        let y = modulated(x.clone(), 3);
        let y = gelu_tanh(self.ffn_in.forward(w, y)?);
        Ok(gated(x, self.ffn_out.forward(w, y)?, 5))
    }
}
