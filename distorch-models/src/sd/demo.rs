//! A demo checkpoint at Stable Diffusion 1.5's shapes, for planning and inspecting without
//! downloading a model.
//!
//! The keys and shapes are those of an SD1.5 single-file checkpoint in the original layout
//! (`model.diffusion_model.*`, `cond_stage_model.transformer.*`, `first_stage_model.*`), in
//! fp16; the data is all zeros and written sparse, so the ~2 GB file costs only its header
//! on disk. It plans and inspects like the real file; it cannot generate images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distorch_core::safetensors::{TensorSpec, write_random, write_zeroed};
use distorch_core::{DType, SafetensorsIndex};

use crate::error::Error;

/// Which demo checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DemoModel {
    /// Stable Diffusion 1.5: UNet, CLIP-L text encoder, VAE.
    Sd15,
}

impl DemoModel {
    /// The file name it is cached under.
    pub fn file_name(self) -> &'static str {
        match self {
            DemoModel::Sd15 => "demo-sd15-zeros-fp16.safetensors",
        }
    }

    /// Its tensors (name, dtype, shape), in execution-like order.
    pub fn tensors(self) -> Vec<TensorSpec> {
        match self {
            DemoModel::Sd15 => {
                let mut b = Builder::default();
                sd15_unet(&mut b, "model.diffusion_model.");
                clip_l(&mut b, "cond_stage_model.transformer.text_model.");
                vae(&mut b, "first_stage_model.");
                b.out
            }
        }
    }

    /// Writes the checkpoint into `dir` unless a valid copy is already there; returns its path.
    pub fn ensure_in(self, dir: &Path) -> Result<PathBuf, Error> {
        let note = "SD1.5 shapes, zero weights: for planning and inspection only";
        self.ensure(dir, self.file_name(), note, |path, tensors, meta| {
            write_zeroed(path, tensors, meta)
        })
    }

    /// The file at `dir/name` unless a copy with every tensor is there, written by `write`
    /// with `note` in its metadata.
    fn ensure(
        self,
        dir: &Path,
        name: &str,
        note: &str,
        write: impl FnOnce(
            &Path,
            &[TensorSpec],
            &BTreeMap<String, String>,
        ) -> Result<(), distorch_core::Error>,
    ) -> Result<PathBuf, Error> {
        let path = dir.join(name);
        let tensors = self.tensors();
        if let Ok(index) = SafetensorsIndex::open(&path)
            && index.tensors().len() == tensors.len()
        {
            return Ok(path);
        }
        std::fs::create_dir_all(dir).map_err(|source| distorch_core::Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let meta = BTreeMap::from([("distorch.demo".to_owned(), note.to_owned())]);
        tracing::info!(path = %path.display(), "writing demo checkpoint");
        write(&path, &tensors, &meta)?;
        Ok(path)
    }
}

impl DemoModel {
    /// The file name of the random-weights variant.
    pub fn random_file_name(self) -> &'static str {
        match self {
            DemoModel::Sd15 => "demo-sd15-random-fp16.safetensors",
        }
    }

    /// Writes the checkpoint with deterministic random weights into `dir` unless a complete
    /// copy is already there; returns its path. Linear and convolution weights are uniform
    /// with standard deviation 1/√fan-in, 1-D weights (norm scales) are 1 and biases 0, so
    /// activations stay bounded and the model draws an abstract image; the same bytes on
    /// every machine. Written tensor by tensor (about 2 GB for SD 1.5, little memory), under
    /// a temporary name renamed at the end, so an interrupted write is never taken for a
    /// complete one.
    pub fn ensure_random_in(self, dir: &Path) -> Result<PathBuf, Error> {
        let note = "SD1.5 shapes, deterministic random weights: abstract images only";
        self.ensure(dir, self.random_file_name(), note, |path, tensors, meta| {
            write_random(path, tensors, 0x5EED, meta)
        })
    }
}

#[derive(Default)]
struct Builder {
    out: Vec<TensorSpec>,
}

impl Builder {
    fn t(&mut self, name: String, shape: &[u64]) {
        self.out.push((name, DType::F16, shape.to_vec()));
    }
    /// weight + bias of a linear (`[out, in]`) or conv (`[out, in, k, k]`).
    fn layer(&mut self, p: &str, out: u64, rest: &[u64]) {
        let mut shape = vec![out];
        shape.extend_from_slice(rest);
        self.t(format!("{p}.weight"), &shape);
        self.t(format!("{p}.bias"), &[out]);
    }
    fn norm(&mut self, p: &str, c: u64) {
        self.t(format!("{p}.weight"), &[c]);
        self.t(format!("{p}.bias"), &[c]);
    }
}

const TIME_DIM: u64 = 1280;
const CONTEXT: u64 = 768;

fn res_block(b: &mut Builder, p: &str, cin: u64, cout: u64) {
    b.norm(&format!("{p}.in_layers.0"), cin);
    b.layer(&format!("{p}.in_layers.2"), cout, &[cin, 3, 3]);
    b.layer(&format!("{p}.emb_layers.1"), cout, &[TIME_DIM]);
    b.norm(&format!("{p}.out_layers.0"), cout);
    b.layer(&format!("{p}.out_layers.3"), cout, &[cout, 3, 3]);
    if cin != cout {
        b.layer(&format!("{p}.skip_connection"), cout, &[cin, 1, 1]);
    }
}

fn spatial_transformer(b: &mut Builder, p: &str, c: u64) {
    b.norm(&format!("{p}.norm"), c);
    b.layer(&format!("{p}.proj_in"), c, &[c, 1, 1]);
    let t = format!("{p}.transformer_blocks.0");
    for (attn, kv) in [("attn1", c), ("attn2", CONTEXT)] {
        b.t(format!("{t}.{attn}.to_q.weight"), &[c, c]);
        b.t(format!("{t}.{attn}.to_k.weight"), &[c, kv]);
        b.t(format!("{t}.{attn}.to_v.weight"), &[c, kv]);
        b.layer(&format!("{t}.{attn}.to_out.0"), c, &[c]);
    }
    b.layer(&format!("{t}.ff.net.0.proj"), 8 * c, &[c]);
    b.layer(&format!("{t}.ff.net.2"), c, &[4 * c]);
    for n in ["norm1", "norm2", "norm3"] {
        b.norm(&format!("{t}.{n}"), c);
    }
    b.layer(&format!("{p}.proj_out"), c, &[c, 1, 1]);
}

fn sd15_unet(b: &mut Builder, p: &str) {
    b.layer(&format!("{p}time_embed.0"), TIME_DIM, &[320]);
    b.layer(&format!("{p}time_embed.2"), TIME_DIM, &[TIME_DIM]);
    b.layer(&format!("{p}input_blocks.0.0"), 320, &[4, 3, 3]);
    let mults = [320u64, 640, 1280, 1280];
    let mut ch = 320;
    let mut skips = vec![320u64];
    let mut i = 1;
    for (level, &c) in mults.iter().enumerate() {
        for _ in 0..2 {
            res_block(b, &format!("{p}input_blocks.{i}.0"), ch, c);
            ch = c;
            if level < 3 {
                spatial_transformer(b, &format!("{p}input_blocks.{i}.1"), c);
            }
            skips.push(c);
            i += 1;
        }
        if level < 3 {
            b.layer(&format!("{p}input_blocks.{i}.0.op"), c, &[c, 3, 3]);
            skips.push(c);
            i += 1;
        }
    }
    res_block(b, &format!("{p}middle_block.0"), 1280, 1280);
    spatial_transformer(b, &format!("{p}middle_block.1"), 1280);
    res_block(b, &format!("{p}middle_block.2"), 1280, 1280);
    let mut o = 0;
    for (level, &c) in mults.iter().enumerate().rev() {
        for j in 0..3 {
            let skip = skips.pop().unwrap_or(320);
            res_block(b, &format!("{p}output_blocks.{o}.0"), ch + skip, c);
            ch = c;
            let mut k = 1;
            if level < 3 {
                spatial_transformer(b, &format!("{p}output_blocks.{o}.1"), c);
                k = 2;
            }
            if j == 2 && level > 0 {
                b.layer(&format!("{p}output_blocks.{o}.{k}.conv"), c, &[c, 3, 3]);
            }
            o += 1;
        }
    }
    b.norm(&format!("{p}out.0"), 320);
    b.layer(&format!("{p}out.2"), 4, &[320, 3, 3]);
}

fn clip_l(b: &mut Builder, p: &str) {
    b.t(
        format!("{p}embeddings.token_embedding.weight"),
        &[49408, 768],
    );
    b.t(
        format!("{p}embeddings.position_embedding.weight"),
        &[77, 768],
    );
    for l in 0..12 {
        let q = format!("{p}encoder.layers.{l}");
        b.norm(&format!("{q}.layer_norm1"), 768);
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            b.layer(&format!("{q}.self_attn.{proj}"), 768, &[768]);
        }
        b.norm(&format!("{q}.layer_norm2"), 768);
        b.layer(&format!("{q}.mlp.fc1"), 3072, &[768]);
        b.layer(&format!("{q}.mlp.fc2"), 768, &[3072]);
    }
    b.norm(&format!("{p}final_layer_norm"), 768);
}

fn vae_res(b: &mut Builder, p: &str, cin: u64, cout: u64) {
    b.norm(&format!("{p}.norm1"), cin);
    b.layer(&format!("{p}.conv1"), cout, &[cin, 3, 3]);
    b.norm(&format!("{p}.norm2"), cout);
    b.layer(&format!("{p}.conv2"), cout, &[cout, 3, 3]);
    if cin != cout {
        b.layer(&format!("{p}.nin_shortcut"), cout, &[cin, 1, 1]);
    }
}

fn vae_mid(b: &mut Builder, p: &str) {
    vae_res(b, &format!("{p}.block_1"), 512, 512);
    b.norm(&format!("{p}.attn_1.norm"), 512);
    for n in ["q", "k", "v", "proj_out"] {
        b.layer(&format!("{p}.attn_1.{n}"), 512, &[512, 1, 1]);
    }
    vae_res(b, &format!("{p}.block_2"), 512, 512);
}

fn vae(b: &mut Builder, p: &str) {
    let chans = [128u64, 256, 512, 512];
    b.layer(&format!("{p}encoder.conv_in"), 128, &[3, 3, 3]);
    let mut ch = 128;
    for (i, &c) in chans.iter().enumerate() {
        for j in 0..2 {
            vae_res(b, &format!("{p}encoder.down.{i}.block.{j}"), ch, c);
            ch = c;
        }
        if i < 3 {
            b.layer(
                &format!("{p}encoder.down.{i}.downsample.conv"),
                c,
                &[c, 3, 3],
            );
        }
    }
    vae_mid(b, &format!("{p}encoder.mid"));
    b.norm(&format!("{p}encoder.norm_out"), 512);
    b.layer(&format!("{p}encoder.conv_out"), 8, &[512, 3, 3]);
    b.layer(&format!("{p}quant_conv"), 8, &[8, 1, 1]);
    b.layer(&format!("{p}post_quant_conv"), 4, &[4, 1, 1]);
    b.layer(&format!("{p}decoder.conv_in"), 512, &[4, 3, 3]);
    vae_mid(b, &format!("{p}decoder.mid"));
    let mut ch = 512;
    for i in (0..4).rev() {
        let c = chans[i];
        for j in 0..3 {
            vae_res(b, &format!("{p}decoder.up.{i}.block.{j}"), ch, c);
            ch = c;
        }
        if i > 0 {
            b.layer(&format!("{p}decoder.up.{i}.upsample.conv"), c, &[c, 3, 3]);
        }
    }
    b.norm(&format!("{p}decoder.norm_out"), 128);
    b.layer(&format!("{p}decoder.conv_out"), 3, &[128, 3, 3]);
}
