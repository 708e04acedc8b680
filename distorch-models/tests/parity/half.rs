//! Every model at reduced precision against PyTorch at the same precision
//! (`tools/fixtures/half.py`: the fixture models loaded with `torch_dtype=float16` /
//! `bfloat16`, run on the fixtures' inputs). The criterion: distorch's relative L2 error
//! against the f32 reference output is at most twice PyTorch's own at that dtype; within one
//! dtype, the fully offloaded output is bit-identical to the resident one.
//!
//! Each dtype runs where the backend computes in it (f16 on wgpu adapters with shader-f16,
//! lavapipe among them; f16 and bf16 on CUDA). Where it does not (ndarray: both; wgpu:
//! bf16), the test checks instead that loading refuses it with a typed error before reading
//! a weight, and says on stderr that the parity half did not run.

#![allow(clippy::print_stderr)]

use burn::tensor::Tensor;
use distorch_core::ComputeDtype;
use distorch_core::runtime::supports_compute;
use distorch_models::flux::dit::{FluxInput, FluxTransformer};
use distorch_models::text::umt5::Umt5Encoder;
use distorch_models::vision::clip_vision::ClipVisionModel;
use distorch_models::wan::dit::{WanDitInput, WanTransformer};
use distorch_models::{
    AutoencoderKl, ClipTextModel, ControlNetInput, ControlNetModel, Error, Loaded, Model,
    Unet2dCondition, UnetInput, load_model,
};

use crate::common::*;

/// One output: its reference key, shape and values.
struct Output(String, Vec<usize>, Vec<f32>);

fn out<const D: usize>(key: &str, t: Tensor<B, D>) -> Output {
    let shape = t.dims().to_vec();
    Output(
        key.to_owned(),
        shape,
        t.into_data().to_vec::<f32>().unwrap(),
    )
}

fn load_at<M: Model<B>>(name: &str, dtype: ComputeDtype, offload: bool) -> Result<M, Error> {
    let mut options = component_options(offload);
    options.dtype = Some(dtype);
    let loaded: Loaded<M> = load_model(fixture(name), None, &options)?;
    assert!(
        loaded.report.missing.is_empty() && loaded.report.unused.is_empty(),
        "{name}: {:?}",
        loaded.report
    );
    Ok(loaded.model)
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut diff, mut norm) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        diff += (f64::from(*g) - w).powi(2);
        norm += w * w;
    }
    (diff / norm).sqrt()
}

/// Fixture `name` as `M` at f16 and at bf16, resident and fully offloaded, through `run`.
fn parity<M: Model<B>>(name: &str, run: impl Fn(&M) -> Vec<Output>) {
    let device = Default::default();
    for dtype in [ComputeDtype::F16, ComputeDtype::BF16] {
        if !supports_compute::<B>(&device, dtype) {
            let e = load_at::<M>(name, dtype, false).err().expect("refused");
            assert!(
                matches!(
                    &e,
                    Error::Core(distorch_core::Error::UnsupportedComputeDtype { .. })
                ),
                "{name} at {dtype}: {e}"
            );
            eprintln!("{name}: {dtype} parity not run: this backend refuses {dtype} ({e})");
            continue;
        }
        let resident = run(&load_at::<M>(name, dtype, false).unwrap());
        let offloaded = run(&load_at::<M>(name, dtype, true).unwrap());
        for (r, o) in resident.iter().zip(&offloaded) {
            assert!(r.2 == o.2, "{name} {} at {dtype}: offloaded differs", r.0);
        }
        check(name, dtype, &resident);
    }
}

fn check(name: &str, dtype: ComputeDtype, outputs: &[Output]) {
    let dir = fixture(name);
    for Output(key, shape, values) in outputs {
        let (want_shape, want) = read(&dir.join("reference.safetensors"), key);
        assert_eq!(shape, &want_shape, "{name} {key}: shape");
        let (_, torch) = read(
            &dir.join("half_reference.safetensors"),
            &format!("{}.{key}", dtype.name()),
        );
        let torch: Vec<f32> = torch.iter().map(|&x| x as f32).collect();
        let theirs = rel_l2(&torch, &want);
        let ours = rel_l2(values, &want);
        eprintln!("{name} {key} at {dtype}: rel L2 {ours:.2e} (PyTorch {theirs:.2e})");
        assert!(
            theirs > 0.0,
            "{name} {key}: the {dtype} reference equals the f32 one"
        );
        assert!(
            ours <= 2.0 * theirs,
            "{name} {key} at {dtype}: relative L2 error {ours:.3e}, PyTorch's {theirs:.3e}"
        );
    }
}

fn timesteps(name: &str) -> Vec<f32> {
    let t: Tensor<B, 1> = tensor(name, "timestep");
    t.into_data().to_vec::<f32>().unwrap()
}

fn ids(name: &str, key: &str) -> Vec<u32> {
    let (_, v) = read(&fixture(name).join("reference.safetensors"), key);
    v.iter().map(|&x| x as u32).collect()
}

#[test]
fn unet_at_half_precision() {
    for (name, sdxl) in [("unet_sd", false), ("unet_sdxl", true)] {
        parity::<Unet2dCondition<B>>(name, |m| {
            let mut input = UnetInput::new(
                tensor(name, "sample"),
                timesteps(name),
                tensor(name, "encoder_hidden_states"),
            );
            if sdxl {
                input = input.with_text_time(tensor(name, "text_embeds"), tensor(name, "time_ids"));
            }
            vec![out("out", m.forward(input).unwrap())]
        });
    }
}

#[test]
fn controlnet_at_half_precision() {
    for (name, sdxl) in [("controlnet_sd", false), ("controlnet_sdxl", true)] {
        parity::<ControlNetModel<B>>(name, |m| {
            let mut input = ControlNetInput::new(
                tensor(name, "sample"),
                timesteps(name),
                tensor(name, "encoder_hidden_states"),
                tensor(name, "controlnet_cond"),
            );
            if sdxl {
                input = input.with_text_time(tensor(name, "text_embeds"), tensor(name, "time_ids"));
            }
            let r = m.forward(input).unwrap();
            let mut outs: Vec<Output> = r
                .down_block_res_samples
                .into_iter()
                .enumerate()
                .map(|(i, t)| out(&format!("down_block_res_samples.{i}"), t))
                .collect();
            outs.push(out("mid_block_res_sample", r.mid_block_res_sample));
            outs
        });
    }
}

#[test]
fn vae_at_half_precision() {
    parity::<AutoencoderKl<B>>("vae", |m| {
        let (mean, logvar) = m.encode(tensor("vae", "image")).unwrap();
        let decoded = m.decode(tensor("vae", "z")).unwrap();
        vec![
            out("latent_mean", mean),
            out("latent_logvar", logvar),
            out("decoded", decoded),
        ]
    });
}

#[test]
fn clip_text_at_half_precision() {
    for name in ["clip_text_gelu", "clip_text_quick_gelu"] {
        parity::<ClipTextModel<B>>(name, |m| {
            let o = m.forward(&ids(name, "input_ids"), 2).unwrap();
            vec![
                out("last_hidden_state", o.last_hidden_state),
                out("text_embeds", o.text_embeds.unwrap()),
            ]
        });
    }
}

#[test]
fn clip_vision_at_half_precision() {
    parity::<ClipVisionModel<B>>("clip_vision", |m| {
        let o = m.forward(tensor("clip_vision", "pixel_values")).unwrap();
        vec![
            out("last_hidden_state", o.last_hidden_state),
            out("image_embeds", o.image_embeds),
        ]
    });
}

#[test]
fn umt5_at_half_precision() {
    parity::<Umt5Encoder<B>>("umt5", |m| {
        let (input_ids, mask) = (ids("umt5", "input_ids"), ids("umt5", "attention_mask"));
        vec![out(
            "last_hidden_state",
            m.forward(&input_ids, &mask, 2).unwrap(),
        )]
    });
}

#[test]
fn wan_transformer_at_half_precision() {
    parity::<WanTransformer<B>>("wan_dit", |m| {
        let input = WanDitInput {
            hidden_states: tensor("wan_dit", "hidden_states"),
            timestep: timesteps("wan_dit"),
            encoder_hidden_states: tensor("wan_dit", "encoder_hidden_states"),
        };
        vec![out("sample", m.forward(input).unwrap())]
    });
}

#[test]
fn t5_at_half_precision() {
    parity::<Umt5Encoder<B>>("t5", |m| {
        let (input_ids, mask) = (ids("t5", "input_ids"), ids("t5", "attention_mask"));
        vec![out(
            "last_hidden_state",
            m.forward(&input_ids, &mask, 2).unwrap(),
        )]
    });
}

#[test]
fn flux_transformer_at_half_precision() {
    parity::<FluxTransformer<B>>("flux_dit", |m| {
        let reference = fixture("flux_dit").join("reference.safetensors");
        let values =
            |key: &str| -> Vec<f32> { read(&reference, key).1.iter().map(|&x| x as f32).collect() };
        let positions = |key: &str| -> Vec<[f32; 3]> {
            values(key).chunks(3).map(|p| [p[0], p[1], p[2]]).collect()
        };
        let input = FluxInput {
            hidden_states: tensor("flux_dit", "hidden_states"),
            encoder_hidden_states: tensor("flux_dit", "encoder_hidden_states"),
            pooled_projections: tensor("flux_dit", "pooled_projections"),
            timestep: values("timestep"),
            img_ids: positions("img_ids"),
            txt_ids: positions("txt_ids"),
            guidance: Some(values("guidance")),
        };
        vec![out("sample", m.forward(input).unwrap())]
    });
}

#[test]
fn flux_vae_at_half_precision() {
    parity::<AutoencoderKl<B>>("flux_vae", |m| {
        let (mean, logvar) = m.encode(tensor("flux_vae", "image")).unwrap();
        let decoded = m.decode(tensor("flux_vae", "z")).unwrap();
        vec![
            out("latent_mean", mean),
            out("latent_logvar", logvar),
            out("decoded", decoded),
        ]
    });
}

/// The fixture's weights file `file` with every f32 tensor stored as `dtype`, in `dir`.
fn as_dtype(
    name: &str,
    file: &str,
    dtype: distorch_core::DType,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    use distorch_core::runtime::{decode_f32, encode_f32};
    let src = fixture(name).join(file);
    let index = distorch_core::SafetensorsIndex::open(&src).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let (mut specs, mut data) = (Vec::new(), Vec::new());
    for t in index.tensors() {
        let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
        let values = decode_f32(t.dtype, raw).unwrap();
        specs.push((t.name.clone(), dtype, t.shape.clone()));
        data.push(encode_f32(&values, dtype));
    }
    let dst = dir.join(format!("{name}-{dtype}.safetensors"));
    let data: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    distorch_core::safetensors::write(&dst, &specs, &data, &Default::default()).unwrap();
    dst
}

/// `dtype: None` picks the component's own half type where the device computes in it (the
/// VAE of an f16 file at f32, as diffusers' `force_upcast`), else f32.
#[test]
fn auto_dtype_is_the_files_half_type_where_the_device_computes_in_it() {
    use distorch_core::{DType, SafetensorsIndex};
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let or_f32 = |d: ComputeDtype| {
        if supports_compute::<B>(&device, d) {
            d
        } else {
            ComputeDtype::F32
        }
    };
    let cases = [
        (
            "unet_sd",
            "diffusion_pytorch_model.safetensors",
            DType::F32,
            ComputeDtype::F32,
        ),
        (
            "unet_sd",
            "diffusion_pytorch_model.safetensors",
            DType::F16,
            or_f32(ComputeDtype::F16),
        ),
        (
            "unet_sd",
            "diffusion_pytorch_model.safetensors",
            DType::BF16,
            or_f32(ComputeDtype::BF16),
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            DType::F16,
            ComputeDtype::F32,
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            DType::BF16,
            or_f32(ComputeDtype::BF16),
        ),
    ];
    for (name, file, stored, want) in cases {
        let path = as_dtype(name, file, stored, tmp.path());
        let index = SafetensorsIndex::open(&path).unwrap();
        let split = distorch_models::load::split(&index);
        let mut options = component_options(false);
        options.dtype = None;
        let got = distorch_models::compute_dtype(&split.components[0], &options);
        assert_eq!(got, want, "{name} stored as {stored}");
    }
}

/// A T5 whose feed-forward outputs exceed f16's range (the fixture's `wo` scaled by 30,000):
/// at f16 its output stays finite and close to the f32 one, since `wo` and the residual
/// stream stay at f32 as in transformers (`_keep_in_fp32_modules`); an all-f16 feed-forward
/// would overflow to infinity.
#[test]
fn t5_at_f16_keeps_its_overflowing_feed_forward_in_f32() {
    use distorch_core::runtime::{decode_f32, encode_f32};
    let device = Default::default();
    if !supports_compute::<B>(&device, ComputeDtype::F16) {
        eprintln!("t5 overflow check not run: this backend refuses f16");
        return;
    }
    let src = fixture("t5").join("model.safetensors");
    let index = distorch_core::SafetensorsIndex::open(&src).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let (mut specs, mut data) = (Vec::new(), Vec::new());
    for t in index.tensors() {
        let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
        let mut values = decode_f32(t.dtype, raw).unwrap();
        if t.name.ends_with("DenseReluDense.wo.weight") {
            values.iter_mut().for_each(|v| *v *= 30_000.0);
        }
        specs.push((t.name.clone(), t.dtype, t.shape.clone()));
        data.push(encode_f32(&values, t.dtype));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t5-loud.safetensors");
    let data: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    distorch_core::safetensors::write(&path, &specs, &data, &Default::default()).unwrap();
    let config =
        distorch_models::text::umt5::Umt5Config::from_file(fixture("t5").join("config.json"))
            .unwrap();
    let (input_ids, mask) = (ids("t5", "input_ids"), ids("t5", "attention_mask"));
    let run = |dtype: ComputeDtype| -> Vec<f32> {
        let mut options = component_options(false);
        options.dtype = Some(dtype);
        let m: Loaded<Umt5Encoder<B>> = load_model(&path, Some(config.clone()), &options).unwrap();
        m.model
            .forward(&input_ids, &mask, 2)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    let full = run(ComputeDtype::F32);
    let half = run(ComputeDtype::F16);
    assert!(half.iter().all(|v| v.is_finite()), "f16 overflowed");
    let full64: Vec<f64> = full.iter().map(|&v| f64::from(v)).collect();
    let err = rel_l2(&half, &full64);
    eprintln!("t5 with a loud feed-forward at f16: rel L2 {err:.2e} against f32");
    assert!(err < 2e-2, "{err}");
}
