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

pub use crate::wan::keys::WanLayout;

use crate::error::Error;
use crate::load::{LoadContext, Model, units_in_order};
use crate::nn::{Weights, f32, gelu_tanh, layer_norm_plain, silu, timestep_embedding, to_dtype};
use crate::wan::rope::rope_tables;

mod config;
pub use config::{DetectedWan, WanDitConfig, WanSize};
mod layers;

use layers::{BlockContext, DitLayers};

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
                let (cos, sin) = rope_tables::<B>(self.config.attention_head_dim, grid, device);
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
    /// layout; see [`WeightStore::load`](distorch_core::runtime::WeightStore::load)).
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
