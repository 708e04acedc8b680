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
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use distorch_core::{Component, ComponentKind, units};
use distorch_lora::ModelTensor;
use serde::Deserialize;

pub use crate::wan::keys::WanLayout;

use crate::error::{Error, unsupported};
use crate::load::{LoadContext, Model, shape_map, to_usize, units_in_order};
use crate::nn::{Weights, f32, gelu_tanh, layer_norm_plain, silu, timestep_embedding, to_dtype};
use crate::wan::rope::rope_tables;

mod layers;

use layers::{BlockContext, DitLayers};

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
    /// The released model its size matches.
    pub family: WanSize,
}

/// The released Wan transformer a configuration's size matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WanSize {
    /// Wan 2.1 1.3B: 1,536 wide, 30 blocks.
    Wan1_3B,
    /// Wan 2.1 14B: 5,120 wide, 40 blocks.
    Wan14B,
    /// Wan 2.2 5B: 3,072 wide, 30 blocks.
    Wan22_5B,
    /// Any other size.
    Other,
}

impl std::fmt::Display for WanSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WanSize::Wan1_3B => "Wan 1.3B",
            WanSize::Wan14B => "Wan 14B",
            WanSize::Wan22_5B => "Wan 2.2 5B",
            WanSize::Other => "Wan (other size)",
        })
    }
}

impl WanDitConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<WanDitConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), WanDitConfig::check)
    }

    /// Width of the hidden states.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Checks what the maths depends on and refuses what is not implemented.
    pub fn check(&self) -> Result<(), Error> {
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
        let not = |what: &str| Error::NotTheModel {
            model: "Wan transformer",
            reason: what.to_owned(),
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
            (1536, 30) => WanSize::Wan1_3B,
            (5120, 40) => WanSize::Wan14B,
            (3072, 30) => WanSize::Wan22_5B,
            _ => WanSize::Other,
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
    layers: DitLayers,
    /// The rotary tables of the last patch grid (computed once per shape, reused across
    /// steps).
    rope: std::sync::Mutex<Option<RopeTables<B>>>,
}

/// A patch grid's rotary cos and sin tables on the compute device.
type RopeTables<B> = ([usize; 3], Tensor<B, 2>, Tensor<B, 2>);

impl<B: Backend> WanTransformer<B> {
    /// The tensors the model reads (diffusers naming), in forward order.
    pub fn expected_tensors(c: &WanDitConfig) -> Vec<ExpectedTensor> {
        Self::expected_in(c, WanLayout::Diffusers)
    }

    /// [`WanTransformer::expected_tensors`] in `layout`.
    pub fn expected_in(c: &WanDitConfig, layout: WanLayout) -> Vec<ExpectedTensor> {
        DitLayers::new(c, layout).expected
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
        let wt = Weights::new(&self.streamer);
        let l = &self.layers;

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
        let pe = wt.fetch(&l.patch)?;
        let kernel: Tensor<B, 5> = pe.get("weight")?;
        let kernel = kernel.reshape([d, ch * k]);
        let mut x = crate::nn::linear(patches, kernel, pe.maybe::<1>("bias"));

        // Conditions.
        let t = Tensor::<B, 1>::from_data(TensorData::new(input.timestep.clone(), [b]), &device);
        let t = wt.input(timestep_embedding(t, c.freq_dim, true, 0.0).unsqueeze_dim::<3>(1));
        let temb = l.time_1.forward(&wt, t)?;
        let temb = l.time_2.forward(&wt, silu(temb))?;
        let modulation = l
            .time_proj
            .forward(&wt, silu(temb.clone()))?
            .reshape([b, 6, d]);
        let text = l
            .text_1
            .forward(&wt, wt.input(input.encoder_hidden_states))?;
        let text = l.text_2.forward(&wt, gelu_tanh(text))?;

        let (cos, sin) = self.rope_tables([fp, hp, wp], &device);
        let cx = BlockContext {
            config: c,
            modulation,
            text,
            cos,
            sin,
        };
        for block in &l.blocks {
            x = block.forward(&wt, x, &cx)?;
        }

        let table: Tensor<B, 3> = l.table.get(&wt)?;
        let m = f32(table) + f32(temb);
        let (shift, scale) = (m.clone().narrow(1, 0, 1), m.narrow(1, 1, 1));
        let x = layer_norm_plain(f32(x), c.eps) * (scale + 1.0) + shift;
        let x = to_dtype(x, wt.dtype());
        let x = wt.output(l.proj_out.forward(&wt, x)?);
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
        tracing::info!(family = %found.family, "detected the Wan transformer's size");
        Ok(found.config)
    }
    fn execution_order(config: &WanDitConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Ok(units_in_order(&Self::expected_in(config, WanLayout::of(c))))
    }
    /// Each tensor under its diffusers and its original module name, whichever layout the
    /// file has (diffusers/PEFT LoRAs use the former, ComfyUI and musubi-tuner the latter).
    fn lora_tensors(config: &WanDitConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        let ours = Self::expected_tensors(config);
        let original = Self::expected_in(config, WanLayout::Original);
        let file = Self::expected_in(config, WanLayout::of(c));
        let mut tensors = crate::load::both_names(ours, file);
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
    /// Loads the model from `component` of `index` at the homes `plan` gives (either key
    /// layout; see [`WeightStore::load`]).
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let layout = WanLayout::of(ctx.component);
        let layers = DitLayers::new(&config, layout);
        let (streamer, report) = ctx.stream_declared(&layers.expected)?;
        Ok((
            WanTransformer {
                config,
                layout,
                streamer,
                layers,
                rope: std::sync::Mutex::new(None),
            },
            report,
        ))
    }
}
