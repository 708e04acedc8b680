//! Wan 2.1/2.2 video transformer, as diffusers' `WanTransformer3DModel` (text-to-video): a
//! 3-D patch embedding, time and text condition embedders, blocks of self-attention (3-D
//! rotary positions, RMS norm on q and k across heads), cross-attention to the text and a
//! feed-forward, each modulated by the time embedding (`scale_shift_table`), and an output
//! head. Weights in diffusers' or the original Wan layout ([`WanLayout`]).
//!
//! Not implemented: image conditioning (Wan 2.1 I2V's image embedder and added k/v
//! projections) and per-token timesteps (Wan 2.2 TI2V's `expand_timesteps`); such models
//! are refused with a clear error.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer,
};
use distorch_core::{Component, ComponentKind, SafetensorsIndex, units};
use distorch_lora::ModelTensor;
use serde::Deserialize;

pub use crate::wan_keys::WanLayout;

use crate::attention::attention;
use crate::error::Error;
use crate::loader::{Model, rename_units, shape_map, stream_expected, to_usize, units_in_order};
use crate::nn::{
    Weights, f32, gelu_tanh, in_f32, layer_norm_plain, rms_norm, silu, timestep_embedding, to_dtype,
};
use crate::wan_rope::{rope, rope_tables};

/// The fields of a diffusers `WanTransformer3DModel` config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct WanDitConfig {
    /// Patch size over (frames, height, width).
    pub patch_size: [usize; 3],
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of one head.
    pub attention_head_dim: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Width of the text encoder's states.
    pub text_dim: usize,
    /// Width of the sinusoidal time embedding.
    pub freq_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn_dim: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Whether the cross-attention input is layer-normed (with weight and bias).
    pub cross_attn_norm: bool,
    /// Only `rms_norm_across_heads` is supported.
    pub qk_norm: Option<String>,
    /// Norm epsilon.
    pub eps: f64,
    /// Image conditioning (I2V): not supported, must be absent.
    pub image_dim: Option<usize>,
    /// Added k/v projections (I2V): not supported, must be absent.
    pub added_kv_proj_dim: Option<usize>,
    /// Positions the rotary embedding covers per axis.
    pub rope_max_seq_len: usize,
}

impl Default for WanDitConfig {
    /// Wan 2.1 T2V 14B.
    fn default() -> Self {
        WanDitConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
        }
    }
}

/// A configuration read from shapes, with the model's size class.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedWan {
    /// The configuration.
    pub config: WanDitConfig,
    /// `Wan 1.3B`, `Wan 14B`, `Wan 2.2 5B` or `Wan (other size)`.
    pub family: &'static str,
}

impl WanDitConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<WanDitConfig, Error> {
        let c: WanDitConfig = crate::config::read(path.as_ref())?;
        c.check()?;
        Ok(c)
    }

    /// Width of the hidden states.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Checks what the maths depends on and refuses what is not implemented.
    pub fn check(&self) -> Result<(), Error> {
        let unsupported = |field, value: String, reason| {
            Err(Error::Unsupported {
                field,
                value,
                reason,
            })
        };
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return unsupported(
                "image_dim",
                format!("{:?}", self.image_dim),
                "image conditioning (I2V) is not implemented; text-to-video models only",
            );
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return unsupported(
                "qk_norm",
                format!("{:?}", self.qk_norm),
                "supported: rms_norm_across_heads",
            );
        }
        if self.attention_head_dim < 6 || self.attention_head_dim % 2 == 1 {
            return unsupported(
                "attention_head_dim",
                self.attention_head_dim.to_string(),
                "must be even and at least 6 (three rotary sections)",
            );
        }
        if self.patch_size.contains(&0) || self.num_attention_heads == 0 {
            return unsupported(
                "patch_size",
                format!("{:?}", self.patch_size),
                "patch sizes and heads must be positive",
            );
        }
        Ok(())
    }

    /// The configuration from a component's shapes (either layout). Heads are 128 wide, as
    /// in every released Wan model; tiny or unusual models need their `config.json`.
    pub fn detect(c: &Component<'_>) -> Result<DetectedWan, Error> {
        let layout = WanLayout::of(c);
        let shapes = shape_map(c);
        let get = |unit: &str, param: &str| {
            shapes
                .get(&format!("{}.{param}", layout.unit(unit)))
                .map(|s| to_usize(s))
        };
        let not = |what: &str| Error::Input {
            input: "model",
            reason: format!("not a Wan transformer: {what}"),
        };
        if shapes
            .keys()
            .any(|k| k.starts_with("img_emb.") || k.contains("image_embedder"))
        {
            return Err(Error::Unsupported {
                field: "image_dim",
                value: "an image embedder".into(),
                reason: "image conditioning (I2V) is not implemented; text-to-video models only",
            });
        }
        let patch = get("patch_embedding", "weight").ok_or_else(|| not("no patch_embedding"))?;
        let text = get("condition_embedder.text_embedder.linear_1", "weight")
            .ok_or_else(|| not("no text embedder"))?;
        let time = get("condition_embedder.time_embedder.linear_1", "weight")
            .ok_or_else(|| not("no time embedder"))?;
        let ffn = get("blocks.0.ffn.net.0.proj", "weight").ok_or_else(|| not("no blocks"))?;
        let head = get("proj_out", "weight").ok_or_else(|| not("no output head"))?;
        let (&[inner, in_channels, pt, ph, pw], &[_, text_dim], &[_, freq_dim], &[ffn_dim, _]) =
            (&patch[..], &text[..], &time[..], &ffn[..])
        else {
            return Err(not("unexpected ranks"));
        };
        if inner % 128 != 0 {
            return Err(not(&format!(
                "width {inner} is not a multiple of 128-wide heads; give its config.json"
            )));
        }
        let num_layers = (0..)
            .take_while(|l| get(&format!("blocks.{l}.attn1.to_q"), "weight").is_some())
            .count();
        let config = WanDitConfig {
            patch_size: [pt, ph, pw],
            num_attention_heads: inner / 128,
            attention_head_dim: 128,
            in_channels,
            out_channels: head[0] / (pt * ph * pw).max(1),
            text_dim,
            freq_dim,
            ffn_dim,
            num_layers,
            cross_attn_norm: get("blocks.0.norm2", "weight").is_some(),
            ..WanDitConfig::default()
        };
        config.check()?;
        let family = match (inner, num_layers) {
            (1536, 30) => "Wan 1.3B",
            (5120, 40) => "Wan 14B",
            (3072, 30) => "Wan 2.2 5B",
            _ => "Wan (other size)",
        };
        Ok(DetectedWan { config, family })
    }

    /// Units per transformer block (for a look-ahead of whole blocks).
    pub fn units_per_block(&self) -> usize {
        // modulation, 2 × (q, k, v, norm_q, norm_k, out), ffn × 2, and the cross norm.
        1 + 12 + 2 + usize::from(self.cross_attn_norm)
    }
}

/// The inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct WanDitInput<B: Backend> {
    /// Latents, [batch, channels, frames, height, width].
    pub hidden_states: Tensor<B, 5>,
    /// One timestep per batch row.
    pub timestep: Vec<f32>,
    /// Text encoder states, [batch, tokens, text_dim].
    pub encoder_hidden_states: Tensor<B, 3>,
}

/// A Wan transformer whose weights live where its plan put them.
pub struct WanTransformer<B: Backend> {
    config: WanDitConfig,
    layout: WanLayout,
    streamer: Arc<Streamer<B>>,
    /// The rotary tables of the last patch grid (computed once per shape, reused across
    /// steps).
    rope: std::sync::Mutex<Option<RopeTables<B>>>,
}

/// A patch grid's rotary cos and sin tables on the compute device.
type RopeTables<B> = ([usize; 3], Tensor<B, 2>, Tensor<B, 2>);

impl<B: Backend> WanTransformer<B> {
    /// The tensors the model reads (diffusers naming), in forward order.
    pub fn expected_tensors(c: &WanDitConfig) -> Vec<ExpectedTensor> {
        let d = c.inner_dim();
        let [pt, ph, pw] = c.patch_size;
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| out.push(ExpectedTensor { name, shape });
        let linear = |push: &mut dyn FnMut(String, Vec<usize>), n: &str, o: usize, i: usize| {
            push(format!("{n}.weight"), vec![o, i]);
            push(format!("{n}.bias"), vec![o]);
        };
        push(
            "patch_embedding.weight".into(),
            vec![d, c.in_channels, pt, ph, pw],
        );
        push("patch_embedding.bias".into(), vec![d]);
        let ce = "condition_embedder";
        linear(
            &mut push,
            &format!("{ce}.time_embedder.linear_1"),
            d,
            c.freq_dim,
        );
        linear(&mut push, &format!("{ce}.time_embedder.linear_2"), d, d);
        linear(&mut push, &format!("{ce}.time_proj"), 6 * d, d);
        linear(
            &mut push,
            &format!("{ce}.text_embedder.linear_1"),
            d,
            c.text_dim,
        );
        linear(&mut push, &format!("{ce}.text_embedder.linear_2"), d, d);
        for b in 0..c.num_layers {
            let p = format!("blocks.{b}");
            push(format!("{p}.scale_shift_table"), vec![1, 6, d]);
            for attn in ["attn1", "attn2"] {
                if attn == "attn2" && c.cross_attn_norm {
                    push(format!("{p}.norm2.weight"), vec![d]);
                    push(format!("{p}.norm2.bias"), vec![d]);
                }
                for x in ["to_q", "to_k", "to_v"] {
                    linear(&mut push, &format!("{p}.{attn}.{x}"), d, d);
                }
                push(format!("{p}.{attn}.norm_q.weight"), vec![d]);
                push(format!("{p}.{attn}.norm_k.weight"), vec![d]);
                linear(&mut push, &format!("{p}.{attn}.to_out.0"), d, d);
            }
            linear(&mut push, &format!("{p}.ffn.net.0.proj"), c.ffn_dim, d);
            linear(&mut push, &format!("{p}.ffn.net.2"), d, c.ffn_dim);
        }
        push("scale_shift_table".into(), vec![1, 2, d]);
        linear(&mut push, "proj_out", c.out_channels * pt * ph * pw, d);
        out
    }

    /// [`WanTransformer::expected_tensors`] in `layout`.
    pub fn expected_in(c: &WanDitConfig, layout: WanLayout) -> Vec<ExpectedTensor> {
        rename_units(Self::expected_tensors(c), |unit| layout.unit(unit))
    }

    /// Loads the model from `component` of `index` at the homes `plan` gives (either key
    /// layout; see [`WeightStore::load`]).
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: WanDitConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(WanTransformer<B>, LoadReport), Error> {
        config.check()?;
        let layout = WanLayout::of(component);
        let expected = Self::expected_in(&config, layout);
        let (streamer, report) = stream_expected(
            index, component, plan, devices, expected, options, lookahead,
        )?;
        Ok((
            WanTransformer {
                config,
                layout,
                streamer,
                rope: std::sync::Mutex::new(None),
            },
            report,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &WanDitConfig {
        &self.config
    }

    /// The key layout of its weights.
    pub fn layout(&self) -> WanLayout {
        self.layout
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// The denoiser's prediction for `input`, [batch, out_channels, frames, height, width].
    pub fn forward(&self, input: WanDitInput<B>) -> Result<Tensor<B, 5>, Error> {
        let c = &self.config;
        let [b, ch, f, h, w] = input.hidden_states.dims();
        let [pt, ph, pw] = c.patch_size;
        self.check_input(&input)?;
        let (fp, hp, wp) = (f / pt, h / ph, w / pw);
        let n = fp * hp * wp;
        let d = c.inner_dim();
        let device = self.streamer.store().compute().clone();
        let wt = Weights::new(&self.streamer, "");
        let dt = wt.dtype();
        let lay = |name: &str| self.layout.unit(name);
        let linear = |name: &str, x: Tensor<B, 3>| wt.linear(&lay(name), x);

        // Patch embedding: a convolution whose kernel is its stride, as one matrix product.
        // (At most six dimensions at a time: ndarray's limit.)
        let k = pt * ph * pw;
        let patches = wt
            .input(input.hidden_states)
            .reshape([b * ch * fp, pt, hp, ph, wp, pw])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, ch, n, k])
            .swap_dims(1, 2)
            .reshape([b, n, ch * k]);
        let pe = wt.unit(&lay("patch_embedding"))?;
        let kernel: Tensor<B, 5> = pe.get("weight")?;
        let kernel = kernel.reshape([d, ch * k]);
        let mut x = crate::nn::linear(patches, kernel, pe.maybe::<1>("bias"));

        // Conditions.
        let t = Tensor::<B, 1>::from_data(TensorData::new(input.timestep.clone(), [b]), &device);
        let t = wt.input(timestep_embedding(t, c.freq_dim, true, 0.0).unsqueeze_dim::<3>(1));
        let temb = linear("condition_embedder.time_embedder.linear_1", t)?;
        let temb = linear("condition_embedder.time_embedder.linear_2", silu(temb))?;
        let modulation =
            linear("condition_embedder.time_proj", silu(temb.clone()))?.reshape([b, 6, d]);
        let text = linear(
            "condition_embedder.text_embedder.linear_1",
            wt.input(input.encoder_hidden_states),
        )?;
        let text = linear("condition_embedder.text_embedder.linear_2", gelu_tanh(text))?;

        let (cos, sin) = self.rope_tables([fp, hp, wp], &device);
        let heads = c.num_attention_heads;
        let hd = c.attention_head_dim;
        let eps = c.eps;
        // As diffusers' Wan blocks: modulation, the modulated norms and the gated residual
        // updates in f32, the result in the compute dtype.
        let modulated = |x: Tensor<B, 3>, scale: Tensor<B, 3>, shift: Tensor<B, 3>| {
            to_dtype(layer_norm_plain(f32(x), eps) * (scale + 1.0) + shift, dt)
        };
        let gated = |x: Tensor<B, 3>, a: Tensor<B, 3>, gate: Tensor<B, 3>| {
            to_dtype(f32(x) + f32(a) * gate, dt)
        };
        for i in 0..c.num_layers {
            let p = format!("blocks.{i}");
            let table: Tensor<B, 3> = wt.unit(&lay(&format!("{p}.scale_shift_table")))?.sole()?;
            let m = f32(table) + f32(modulation.clone());
            let chunk = |k: usize| m.clone().narrow(1, k, 1);
            let (shift, scale, gate) = (chunk(0), chunk(1), chunk(2));
            let (c_shift, c_scale, c_gate) = (chunk(3), chunk(4), chunk(5));

            let y = modulated(x.clone(), scale, shift);
            let attn = |name: &str| format!("{p}.attn1.{name}");
            let qk = |name: &str, norm: &str, y: Tensor<B, 3>| -> Result<Tensor<B, 3>, Error> {
                let z = linear(&attn(name), y)?;
                let nw: Tensor<B, 1> = wt.unit(&lay(&attn(norm)))?.get("weight")?;
                let z = rms_norm(z, nw, eps);
                Ok(in_f32(z, |z| rope(z, &cos, &sin, heads, hd)))
            };
            let q = qk("to_q", "norm_q", y.clone())?;
            let k = qk("to_k", "norm_k", y.clone())?;
            let v = linear(&attn("to_v"), y)?;
            let a = linear(&attn("to_out.0"), attention(q, k, v, heads, None))?;
            x = gated(x, a, gate);

            let y = if c.cross_attn_norm {
                wt.layer_norm(&lay(&format!("{p}.norm2")), x.clone(), eps)?
            } else {
                x.clone()
            };
            let cross = |name: &str| format!("{p}.attn2.{name}");
            let norm = |name: &str, z: Tensor<B, 3>| -> Result<Tensor<B, 3>, Error> {
                let nw: Tensor<B, 1> = wt.unit(&lay(&cross(name)))?.get("weight")?;
                Ok(rms_norm(z, nw, eps))
            };
            let q = norm("norm_q", linear(&cross("to_q"), y)?)?;
            let k = norm("norm_k", linear(&cross("to_k"), text.clone())?)?;
            let v = linear(&cross("to_v"), text.clone())?;
            x = x + linear(&cross("to_out.0"), attention(q, k, v, heads, None))?;

            let y = modulated(x.clone(), c_scale, c_shift);
            let y = gelu_tanh(linear(&format!("{p}.ffn.net.0.proj"), y)?);
            x = gated(x, linear(&format!("{p}.ffn.net.2"), y)?, c_gate);
        }

        let table: Tensor<B, 3> = wt.unit(&lay("scale_shift_table"))?.sole()?;
        let m = f32(table) + f32(temb);
        let (shift, scale) = (m.clone().narrow(1, 0, 1), m.narrow(1, 1, 1));
        let x = modulated(x, scale, shift);
        let x = wt.output(linear("proj_out", x)?);
        let co = c.out_channels;
        Ok(x.reshape([b, n, k, co])
            .permute([0, 3, 1, 2])
            .reshape([b * co * fp, hp, wp, pt, ph, pw])
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([b, co, f, h, w]))
    }

    /// The rotary tables of `grid`, from the cache when the last forward had the same grid.
    fn rope_tables(&self, grid: [usize; 3], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let mut cached = self.rope.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((g, cos, sin)) if *g == grid => (cos.clone(), sin.clone()),
            _ => {
                let (cos, sin) = rope_tables::<B>(&self.config, grid, device);
                *cached = Some((grid, cos.clone(), sin.clone()));
                (cos, sin)
            }
        }
    }

    fn check_input(&self, input: &WanDitInput<B>) -> Result<(), Error> {
        let c = &self.config;
        let [b, ch, f, h, w] = input.hidden_states.dims();
        let bad = |input, reason: String| Err(Error::Input { input, reason });
        if ch != c.in_channels {
            return bad(
                "hidden_states",
                format!("{ch} channels, the model takes {}", c.in_channels),
            );
        }
        for ((name, size), p) in [("frames", f), ("height", h), ("width", w)]
            .into_iter()
            .zip(c.patch_size)
        {
            if size == 0 || size % p != 0 {
                return bad(
                    "hidden_states",
                    format!("{name} {size} is not a positive multiple of the patch size {p}"),
                );
            }
            if size / p > c.rope_max_seq_len {
                return bad(
                    "hidden_states",
                    format!(
                        "{} patches along the {name}, the rotary embedding covers {}",
                        size / p,
                        c.rope_max_seq_len
                    ),
                );
            }
        }
        if input.timestep.len() != b {
            return bad(
                "timestep",
                format!("{} values for a batch of {b}", input.timestep.len()),
            );
        }
        let [tb, _, td] = input.encoder_hidden_states.dims();
        if tb != b || td != c.text_dim {
            return bad(
                "encoder_hidden_states",
                format!(
                    "shape [{tb}, _, {td}], the model takes [{b}, _, {}]",
                    c.text_dim
                ),
            );
        }
        Ok(())
    }
}

impl<B: Backend> Model<B> for WanTransformer<B> {
    type Config = WanDitConfig;
    const KIND: ComponentKind = ComponentKind::Unet;
    fn config_from_file(path: &Path) -> Result<WanDitConfig, Error> {
        WanDitConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<WanDitConfig, Error> {
        let found = WanDitConfig::detect(c)?;
        tracing::info!(family = found.family, "detected the Wan transformer's size");
        Ok(found.config)
    }
    fn execution_order(config: &WanDitConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Ok(units_in_order(Self::expected_in(config, WanLayout::of(c))))
    }
    /// Each tensor under its diffusers and its original module name, whichever layout the
    /// file has (diffusers/PEFT LoRAs use the former, ComfyUI and musubi-tuner the latter).
    fn lora_tensors(config: &WanDitConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        let ours = Self::expected_tensors(config);
        let original = Self::expected_in(config, WanLayout::Original);
        let file = Self::expected_in(config, WanLayout::of(c));
        let mut tensors = crate::checkpoint::both_names(ours, file);
        for (t, o) in tensors.iter_mut().zip(original) {
            let m = units::unit_name(&o.name).to_owned();
            if !t.modules.contains(&m) {
                t.modules.push(m);
            }
        }
        Ok(tensors)
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    fn load(
        index: &SafetensorsIndex,
        c: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: WanDitConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Self, LoadReport), Error> {
        WanTransformer::load(index, c, plan, devices, config, options, lookahead)
    }
}
