//! FLUX.1 transformer, as diffusers' `FluxTransformer2DModel`: packed latent tokens and text
//! tokens embedded, a conditioning vector from the timestep, the guidance value (FLUX.1-dev)
//! and the pooled CLIP embedding, double-stream blocks (text and image tokens with their own
//! weights, attending jointly, q/k RMS norms), single-stream blocks (attention and MLP side by
//! side over the joint tokens), 3-axis rotary positions from `txt_ids` / `img_ids`, and a final
//! adaptive norm. Weights in diffusers' or the original BFL layout ([`FluxLayout`]), with or
//! without ComfyUI's `model.diffusion_model.` prefix.
//!
//! Not implemented: ControlNet residuals and IP-Adapter inputs of the reference's forward.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use distorch_core::{Component, ComponentKind};
use distorch_lora::ModelTensor;

pub use crate::flux::keys::FluxLayout;

use crate::error::Error;
use crate::load::{LoadContext, Model, units_in_order};
use crate::nn::spec::Linear;
use crate::nn::{Weights, layer_norm_plain, silu, timestep_embedding};

mod config;
pub use config::{DetectedFlux, FluxConfig, FluxVariant};
mod layers;
mod lora;

use layers::{BlockContext, FluxLayers};

/// The inputs of one forward pass, named as `FluxTransformer2DModel.forward`'s arguments.
#[derive(Debug, Clone)]
pub struct FluxInput<B: Backend> {
    /// Packed latent tokens, [batch, image tokens, in_channels].
    pub hidden_states: Tensor<B, 3>,
    /// Text encoder (T5) states, [batch, text tokens, joint_attention_dim].
    pub encoder_hidden_states: Tensor<B, 3>,
    /// Pooled text embedding (CLIP), [batch, pooled_projection_dim].
    pub pooled_projections: Tensor<B, 2>,
    /// One timestep per batch row, in [0, 1] (the sigma; the model scales it by 1,000).
    pub timestep: Vec<f32>,
    /// The position of each image token (3 axes), as diffusers' `img_ids`.
    pub img_ids: Vec<[f32; 3]>,
    /// The position of each text token (3 axes), as diffusers' `txt_ids` (zeros in FLUX.1).
    pub txt_ids: Vec<[f32; 3]>,
    /// The guidance value per batch row: required by FLUX.1-dev, refused by schnell.
    pub guidance: Option<Vec<f32>>,
}

/// The positions of an `h` × `w` grid of packed latent tokens, row by row: `[0, row,
/// column]` (diffusers' `FluxPipeline._prepare_latent_image_ids`).
pub fn image_ids(h: usize, w: usize) -> Vec<[f32; 3]> {
    (0..h)
        .flat_map(|y| (0..w).map(move |x| [0.0, y as f32, x as f32]))
        .collect()
}

/// A FLUX transformer whose weights live where its plan put them.
pub struct FluxTransformer<B: Backend> {
    config: FluxConfig,
    layout: FluxLayout,
    streamer: Arc<Streamer<B>>,
    layers: FluxLayers,
    /// The rotary tables of the last token positions (computed once, reused across steps).
    rope: Mutex<Option<RopeTables<B>>>,
}

/// Token positions with their rotary cos and sin tables on the compute device.
type RopeTables<B> = (Vec<[f32; 3]>, Tensor<B, 2>, Tensor<B, 2>);

impl<B: Backend> FluxTransformer<B> {
    /// The tensors the model reads (diffusers naming), in forward order.
    pub fn expected_tensors(c: &FluxConfig) -> Vec<ExpectedTensor> {
        Self::expected_in(c, FluxLayout::Diffusers)
    }

    /// [`FluxTransformer::expected_tensors`] in `layout`.
    pub fn expected_in(c: &FluxConfig, layout: FluxLayout) -> Vec<ExpectedTensor> {
        FluxLayers::new(c, layout).expected
    }

    /// The configuration.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// The key layout of its weights.
    pub fn layout(&self) -> FluxLayout {
        self.layout
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// The predicted velocity for `input`, [batch, image tokens, out_channels], in f32.
    ///
    /// # Shapes
    /// - `hidden_states`: [batch, image tokens, in_channels]
    /// - `encoder_hidden_states`: [batch, text tokens, joint_attention_dim]
    /// - `pooled_projections`: [batch, pooled_projection_dim]
    /// - output: [batch, image tokens, out_channels]
    pub fn forward(&self, input: FluxInput<B>) -> Result<Tensor<B, 3>, Error> {
        self.check_input(&input)?;
        let c = &self.config;
        let l = &self.layers;
        let w = Weights::new(&self.streamer);
        let device = self.streamer.store().compute().clone();
        let b = input.timestep.len();

        // 1. Image tokens.
        let mut x = l.x_embedder.forward(&w, w.input(input.hidden_states))?;
        // 2. Conditioning: timestep, guidance and pooled text embeddings, summed.
        let embed = |values: &[f32], (l1, l2): &(Linear, Linear)| -> Result<Tensor<B, 2>, Error> {
            let t = Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [b]), &device);
            let t = w.input(t) * 1000.0;
            let t = w.input(timestep_embedding(t, 256, true, 0.0));
            l2.forward(&w, silu(l1.forward(&w, t)?))
        };
        let mut temb = embed(&input.timestep, &l.time)?;
        if let (Some(g), Some(layers)) = (&input.guidance, &l.guidance) {
            temb = temb + embed(g, layers)?;
        }
        let pooled = l.pooled.0.forward(&w, w.input(input.pooled_projections))?;
        temb = temb + l.pooled.1.forward(&w, silu(pooled))?;
        // 3. Text tokens.
        let mut ctx = l
            .context
            .forward(&w, w.input(input.encoder_hidden_states))?;
        // 4. Rotary tables of the text and image positions.
        let mut ids = input.txt_ids;
        ids.extend(input.img_ids);
        let (cos, sin) = self.rope_tables(ids, &device);
        let cx = BlockContext {
            config: c,
            temb: silu(temb),
            cos,
            sin,
        };
        // 5. Double-stream blocks, then single-stream blocks over the joint tokens.
        for block in &l.double {
            (x, ctx) = block.forward(&w, x, ctx, &cx)?;
        }
        let txt = ctx.dims()[1];
        let mut joint = Tensor::cat(vec![ctx, x], 1);
        for block in &l.single {
            joint = block.forward(&w, joint, &cx)?;
        }
        let n = joint.dims()[1];
        let x = joint.narrow(1, txt, n - txt);
        // 6. Final adaptive norm and projection.
        let m = cx.modulation(&w, &l.norm_out, 2)?;
        let (scale, shift) = match self.layout {
            FluxLayout::Diffusers => (&m[0], &m[1]),
            FluxLayout::Bfl => (&m[1], &m[0]),
        };
        let x = layer_norm_plain(x, 1e-6) * (scale.clone() + 1.0) + shift.clone();
        Ok(w.output(l.proj_out.forward(&w, x)?))
    }

    /// The rotary tables of `ids`, from the cache when the last forward had the same ones.
    fn rope_tables(&self, ids: Vec<[f32; 3]>, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let mut cached = self.rope.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((i, cos, sin)) = &*cached
            && *i == ids
        {
            return (cos.clone(), sin.clone());
        }
        let (cos, sin) = rope_tables::<B>(&self.config.axes_dims_rope, &ids, device);
        *cached = Some((ids, cos.clone(), sin.clone()));
        (cos, sin)
    }

    fn check_input(&self, input: &FluxInput<B>) -> Result<(), Error> {
        let c = &self.config;
        let bad = |input, reason: String| Err(Error::Input { input, reason });
        let [b, n, ch] = input.hidden_states.dims();
        if ch != c.in_channels {
            return bad(
                "hidden_states",
                format!("{ch} channels, the model takes {}", c.in_channels),
            );
        }
        if input.timestep.len() != b {
            return bad(
                "timestep",
                format!("{} values for a batch of {b}", input.timestep.len()),
            );
        }
        let [tb, txt, td] = input.encoder_hidden_states.dims();
        if tb != b || td != c.joint_attention_dim {
            return bad(
                "encoder_hidden_states",
                format!(
                    "shape [{tb}, _, {td}], the model takes [{b}, _, {}]",
                    c.joint_attention_dim
                ),
            );
        }
        let [pb, pd] = input.pooled_projections.dims();
        if pb != b || pd != c.pooled_projection_dim {
            return bad(
                "pooled_projections",
                format!(
                    "shape [{pb}, {pd}], the model takes [{b}, {}]",
                    c.pooled_projection_dim
                ),
            );
        }
        if input.img_ids.len() != n || input.txt_ids.len() != txt {
            return bad(
                "img_ids",
                format!(
                    "{} image and {} text positions for {n} image and {txt} text tokens",
                    input.img_ids.len(),
                    input.txt_ids.len()
                ),
            );
        }
        match (&input.guidance, c.guidance_embeds) {
            (Some(g), true) if g.len() != b => {
                bad("guidance", format!("{} values for a batch of {b}", g.len()))
            }
            (None, true) => bad(
                "guidance",
                "this model (FLUX.1-dev style) embeds a guidance value: give one per batch row"
                    .into(),
            ),
            (Some(_), false) => bad(
                "guidance",
                "this model (FLUX.1-schnell style) has no guidance embedder".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// The rotary tables of token positions `ids`: for each axis a section of `axes[i] / 2`
/// rotated pairs, angle = position · θ^(−2j / axes[i]) with θ = 10,000, computed in f64 and
/// stored in f32 (diffusers' `FluxPosEmbed`). Each is [tokens, head_dim / 2].
fn rope_tables<B: Backend>(
    axes: &[usize; 3],
    ids: &[[f32; 3]],
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let freqs: Vec<(usize, f64)> = axes
        .iter()
        .enumerate()
        .flat_map(|(axis, &dim)| {
            (0..dim / 2).map(move |j| (axis, 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64)))
        })
        .collect();
    let half = freqs.len();
    let (mut cos, mut sin) = (
        Vec::with_capacity(ids.len() * half),
        Vec::with_capacity(ids.len() * half),
    );
    for pos in ids {
        for &(axis, f) in &freqs {
            let angle = f64::from(pos[axis]) * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [ids.len(), half]), device),
        Tensor::from_data(TensorData::new(sin, [ids.len(), half]), device),
    )
}

impl<B: Backend> Model<B> for FluxTransformer<B> {
    type Config = FluxConfig;
    const KIND: ComponentKind = ComponentKind::Unet;
    fn config_from_file(path: &Path) -> Result<FluxConfig, Error> {
        FluxConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<FluxConfig, Error> {
        let found = FluxConfig::detect(c)?;
        tracing::info!(variant = %found.variant, "detected the FLUX transformer's size");
        Ok(found.config)
    }
    fn execution_order(config: &FluxConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Ok(units_in_order(&Self::expected_in(
            config,
            FluxLayout::of(c),
        )))
    }
    /// Each tensor under its diffusers and its BFL module names, rows of fused tensors
    /// included, whichever layout the file has (see `flux::dit::lora`).
    fn lora_tensors(config: &FluxConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        Ok(lora::lora_tensors(config, FluxLayout::of(c)))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the model from `component` of `index` at the homes `plan` gives (either key
    /// layout; see [`WeightStore::load`](distorch_core::runtime::WeightStore::load)).
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let layout = FluxLayout::of(ctx.component);
        let layers = FluxLayers::new(&config, layout);
        let (streamer, report) = ctx.stream_declared(&layers.expected)?;
        Ok((
            FluxTransformer {
                config,
                layout,
                streamer,
                layers,
                rope: Mutex::new(None),
            },
            report,
        ))
    }
}
