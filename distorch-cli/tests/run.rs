//! `distorch run` as the parity harness: inputs and reference outputs from the models'
//! fixtures (`tools/fixtures/gen.py`, diffusers / transformers), both key layouts, resident on
//! the CPU and — in a `--features wgpu` build — computed on wgpu with every weight streamed
//! from host memory (`--expert "wgpu:0,0b;cpu,*"`), bit-identical to the resident run.
//! Tasks: unet (plain and ControlNet-driven), controlnet, vae-encode, vae-decode, clip-text,
//! clip-vision, t5 (UMT5 and T5 v1.1), flux-dit (both layouts, and with block swap), the FLUX
//! VAE's encode and decode, wan-dit
//! (and wan-dit with block swap), wan-vae-encode, wan-vae-decode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use distorch::DType;
use distorch::core::SafetensorsIndex;
use distorch::core::safetensors::write;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../distorch-models/tests/fixtures")
        .join(name)
}

/// Every tensor of a file: name → (dtype, shape, raw bytes).
fn tensors(path: &Path) -> BTreeMap<String, (DType, Vec<u64>, Vec<u8>)> {
    let index = SafetensorsIndex::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    index
        .tensors()
        .iter()
        .map(|t| {
            let raw = bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize].to_vec();
            (t.name.clone(), (t.dtype, t.shape.clone(), raw))
        })
        .collect()
}

fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes the reference's tensors `names` (renamed by `rename`) as an inputs file.
fn inputs(reference: &Path, names: &[(&str, &str)], dst: &Path) {
    let all = tensors(reference);
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for (from, to) in names {
        let (dtype, shape, raw) = &all[*from];
        specs.push((to.to_string(), *dtype, shape.clone()));
        data.push(raw.as_slice());
    }
    write(dst, &specs, &data, &BTreeMap::new()).unwrap();
}

fn run(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_distorch"))
        .arg("run")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Output `name` of `out` against reference `key`, rtol 1e-3 / atol 1e-4.
fn check(out: &Path, name: &str, reference: &Path, key: &str) -> Vec<f32> {
    let got = tensors(out);
    let want = tensors(reference);
    let (_, gs, g) = &got[name];
    let (_, ws, w) = &want[key];
    assert_eq!(gs, ws, "{name}: shape");
    let (g, w) = (f32s(g), f32s(w));
    assert!(!g.is_empty());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 + 1e-3 * b.abs(),
            "{name}[{i}]: got {a}, reference {b}"
        );
    }
    g
}

/// The FLUX transformer's inputs, named as diffusers' `forward` arguments.
const FLUX_INPUTS: [(&str, &str); 7] = [
    ("hidden_states", "hidden_states"),
    ("encoder_hidden_states", "encoder_hidden_states"),
    ("pooled_projections", "pooled_projections"),
    ("timestep", "timestep"),
    ("img_ids", "img_ids"),
    ("txt_ids", "txt_ids"),
    ("guidance", "guidance"),
];

struct Case {
    task: &'static str,
    model: PathBuf,
    config: PathBuf,
    component: Option<&'static str>,
    inputs: Vec<(&'static str, &'static str)>,
    outputs: Vec<(&'static str, &'static str)>,
    reference: PathBuf,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (name, sdxl) in [("unet_sd", false), ("unet_sdxl", true)] {
        let mut ins = vec![
            ("sample", "sample"),
            ("timestep", "timestep"),
            ("encoder_hidden_states", "encoder_hidden_states"),
            ("mid_block_res_sample", "mid_block_additional_residual"),
            (
                "down_block_res_samples.0",
                "down_block_additional_residuals.0",
            ),
            (
                "down_block_res_samples.1",
                "down_block_additional_residuals.1",
            ),
            (
                "down_block_res_samples.2",
                "down_block_additional_residuals.2",
            ),
            (
                "down_block_res_samples.3",
                "down_block_additional_residuals.3",
            ),
        ];
        if sdxl {
            ins.extend([("text_embeds", "text_embeds"), ("time_ids", "time_ids")]);
        }
        for file in ["diffusion_pytorch_model.safetensors", "ldm.safetensors"] {
            out.push(Case {
                task: "unet",
                model: fixture(name).join(file),
                config: fixture(name).join("config.json"),
                component: Some("unet"),
                inputs: ins.clone(),
                outputs: vec![("sample", "controlled_out")],
                reference: fixture(name).join("reference.safetensors"),
            });
        }
    }
    for (name, unet, sdxl) in [
        ("controlnet_sd", "unet_sd", false),
        ("controlnet_sdxl", "unet_sdxl", true),
    ] {
        let mut ins = vec![
            ("sample", "sample"),
            ("timestep", "timestep"),
            ("encoder_hidden_states", "encoder_hidden_states"),
        ];
        if sdxl {
            ins.extend([("text_embeds", "text_embeds"), ("time_ids", "time_ids")]);
        }
        let reference = fixture(name).join("reference.safetensors");
        let mut control_ins = ins.clone();
        control_ins.push(("controlnet_cond", "controlnet_cond"));
        let residuals = [
            "down_block_res_samples.0",
            "down_block_res_samples.1",
            "down_block_res_samples.2",
            "down_block_res_samples.3",
            "mid_block_res_sample",
        ];
        for file in ["diffusion_pytorch_model.safetensors", "ldm.safetensors"] {
            out.push(Case {
                task: "controlnet",
                model: fixture(name).join(file),
                config: fixture(name).join("config.json"),
                component: None,
                inputs: control_ins.clone(),
                outputs: residuals.iter().map(|r| (*r, *r)).collect(),
                reference: reference.clone(),
            });
        }
        // The UNet driven by those residuals: diffusers' controlled output.
        ins.extend([
            ("mid_block_res_sample", "mid_block_additional_residual"),
            (
                "down_block_res_samples.0",
                "down_block_additional_residuals.0",
            ),
            (
                "down_block_res_samples.1",
                "down_block_additional_residuals.1",
            ),
            (
                "down_block_res_samples.2",
                "down_block_additional_residuals.2",
            ),
            (
                "down_block_res_samples.3",
                "down_block_additional_residuals.3",
            ),
        ]);
        out.push(Case {
            task: "unet",
            model: fixture(unet).join("diffusion_pytorch_model.safetensors"),
            config: fixture(unet).join("config.json"),
            component: None,
            inputs: ins,
            outputs: vec![("sample", "controlled_unet_out")],
            reference,
        });
    }
    out.push(Case {
        task: "clip-vision",
        model: fixture("clip_vision").join("model.safetensors"),
        config: fixture("clip_vision").join("config.json"),
        component: None,
        inputs: vec![("pixel_values", "pixel_values")],
        outputs: vec![
            ("image_embeds", "image_embeds"),
            ("last_hidden_state", "last_hidden_state"),
            ("hidden_states", "hidden_states"),
        ],
        reference: fixture("clip_vision").join("reference.safetensors"),
    });
    for file in ["diffusion_pytorch_model.safetensors", "ldm.safetensors"] {
        out.push(Case {
            task: "vae-encode",
            model: fixture("vae").join(file),
            config: fixture("vae").join("config.json"),
            component: Some("vae"),
            inputs: vec![("image", "image")],
            outputs: vec![
                ("latent_mean", "latent_mean"),
                ("latent_logvar", "latent_logvar"),
            ],
            reference: fixture("vae").join("reference.safetensors"),
        });
        out.push(Case {
            task: "vae-decode",
            model: fixture("vae").join(file),
            config: fixture("vae").join("config.json"),
            component: Some("vae"),
            inputs: vec![("z", "z")],
            outputs: vec![("image", "decoded")],
            reference: fixture("vae").join("reference.safetensors"),
        });
    }
    // FLUX.1's 16-channel VAE, as BFL's `ae.safetensors`.
    for (task, inputs, outputs) in [
        (
            "vae-encode",
            vec![("image", "image")],
            vec![
                ("latent_mean", "latent_mean"),
                ("latent_logvar", "latent_logvar"),
            ],
        ),
        ("vae-decode", vec![("z", "z")], vec![("image", "decoded")]),
    ] {
        out.push(Case {
            task,
            model: fixture("flux_vae").join("ae.safetensors"),
            config: fixture("flux_vae").join("config.json"),
            component: None,
            inputs,
            outputs,
            reference: fixture("flux_vae").join("reference.safetensors"),
        });
    }
    for (dir, file, component) in [
        ("clip_text_quick_gelu", "model.safetensors", "clip-l"),
        ("clip_text_gelu", "open_clip.safetensors", "clip-g"),
    ] {
        out.push(Case {
            task: "clip-text",
            model: fixture(dir).join(file),
            config: fixture(dir).join("config.json"),
            component: Some(component),
            inputs: vec![("input_ids", "input_ids")],
            outputs: vec![
                ("last_hidden_state", "last_hidden_state"),
                ("hidden_states", "hidden_states"),
                ("pooler_output", "pooled_output"),
                ("text_embeds", "text_embeds"),
            ],
            reference: fixture(dir).join("reference.safetensors"),
        });
    }
    out.push(Case {
        task: "t5",
        model: fixture("umt5").join("model.safetensors"),
        config: fixture("umt5").join("config.json"),
        component: None,
        inputs: vec![
            ("input_ids", "input_ids"),
            ("attention_mask", "attention_mask"),
        ],
        outputs: vec![("last_hidden_state", "last_hidden_state")],
        reference: fixture("umt5").join("reference.safetensors"),
    });
    out.push(Case {
        task: "t5",
        model: fixture("t5").join("model.safetensors"),
        config: fixture("t5").join("config.json"),
        component: None,
        inputs: vec![
            ("input_ids", "input_ids"),
            ("attention_mask", "attention_mask"),
        ],
        outputs: vec![("last_hidden_state", "last_hidden_state")],
        reference: fixture("t5").join("reference.safetensors"),
    });
    for file in ["diffusion_pytorch_model.safetensors", "bfl.safetensors"] {
        out.push(Case {
            task: "flux-dit",
            model: fixture("flux_dit").join(file),
            config: fixture("flux_dit").join("config.json"),
            component: None,
            inputs: FLUX_INPUTS.to_vec(),
            outputs: vec![("sample", "sample")],
            reference: fixture("flux_dit").join("reference.safetensors"),
        });
    }
    for file in [
        "diffusion_pytorch_model.safetensors",
        "original.safetensors",
    ] {
        out.push(Case {
            task: "wan-dit",
            model: fixture("wan_dit").join(file),
            config: fixture("wan_dit").join("config.json"),
            component: None,
            inputs: vec![
                ("hidden_states", "hidden_states"),
                ("timestep", "timestep"),
                ("encoder_hidden_states", "encoder_hidden_states"),
            ],
            outputs: vec![("sample", "sample")],
            reference: fixture("wan_dit").join("reference.safetensors"),
        });
    }
    out
}

/// Runs every case with `extra` arguments; returns each case's outputs.
fn run_all(tmp: &Path, tag: &str, extra: &[&str]) -> Vec<Vec<f32>> {
    let mut all = Vec::new();
    for (i, c) in cases().iter().enumerate() {
        let ins = tmp.join(format!("in{i}.safetensors"));
        let out = tmp.join(format!("out{i}-{tag}.safetensors"));
        inputs(&c.reference, &c.inputs, &ins);
        let mut args = vec![
            c.task,
            "--model",
            c.model.to_str().unwrap(),
            "--config",
            c.config.to_str().unwrap(),
            "--inputs",
            ins.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(comp) = c.component {
            args.extend(["--component", comp]);
        }
        args.extend(extra);
        run(&args);
        let mut values = Vec::new();
        for (name, key) in &c.outputs {
            values.extend(check(&out, name, &c.reference, key));
        }
        all.push(values);
    }
    all
}

#[test]
fn every_task_matches_the_reference_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    run_all(tmp.path(), "cpu", &[]);
}

#[cfg(feature = "wgpu")]
#[test]
fn every_task_matches_on_wgpu_with_every_weight_streamed_from_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let devices = ["--device", "wgpu:0", "--devices", "wgpu:0=8gib,cpu=16gib"];
    let resident = run_all(
        tmp.path(),
        "resident",
        &[&devices[..], &["--expert", "wgpu:0,*"]].concat(),
    );
    let streamed = run_all(
        tmp.path(),
        "streamed",
        &[
            &devices[..],
            &["--expert", "wgpu:0,0b;cpu,*", "--tiny-threshold", "0b"],
        ]
        .concat(),
    );
    for (i, (a, b)) in resident.iter().zip(&streamed).enumerate() {
        assert_eq!(a, b, "case {i}: streamed output differs from resident");
    }
}

#[test]
fn bad_runs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ins = tmp.path().join("in.safetensors");
    inputs(
        &fixture("vae").join("reference.safetensors"),
        &[("z", "image")],
        &ins,
    );
    let o = Command::new(env!("CARGO_BIN_EXE_distorch"))
        .args(["run", "vae-decode", "--model"])
        .arg(fixture("vae").join("diffusion_pytorch_model.safetensors"))
        .arg("--inputs")
        .arg(&ins)
        .args(["--out", "/dev/null", "--config"])
        .arg(fixture("vae").join("config.json"))
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no input named `z` (found: image)"), "{err}");

    let o = Command::new(env!("CARGO_BIN_EXE_distorch"))
        .args(["run", "unet", "--model"])
        .arg(fixture("unet_sd").join("diffusion_pytorch_model.safetensors"))
        .arg("--inputs")
        .arg(&ins)
        .args(["--out", "/dev/null", "--dtype", "f16", "--config"])
        .arg(fixture("unet_sd").join("config.json"))
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot compute in f16"), "{err}");

    let o = Command::new(env!("CARGO_BIN_EXE_distorch"))
        .args(["run", "unet", "--model", "m", "--inputs", "i", "--out", "o"])
        .args(["--dtype", "f8"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--dtype") && err.contains("f8"), "{err}");
}

#[test]
fn lora_flag_patches_the_unet() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = fixture("unet_sd").join("reference.safetensors");
    let ins = tmp.path().join("in.safetensors");
    let out = tmp.path().join("out.safetensors");
    inputs(
        &reference,
        &[
            ("sample", "sample"),
            ("timestep", "timestep"),
            ("encoder_hidden_states", "encoder_hidden_states"),
        ],
        &ins,
    );
    let lora = format!(
        "{}:0.8",
        fixture("lora").join("kohya.safetensors").display()
    );
    for model in ["diffusion_pytorch_model.safetensors", "ldm.safetensors"] {
        run(&[
            "unet",
            "--model",
            fixture("unet_sd").join(model).to_str().unwrap(),
            "--config",
            fixture("unet_sd").join("config.json").to_str().unwrap(),
            "--inputs",
            ins.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--lora",
            &lora,
        ]);
        check(
            &out,
            "sample",
            &fixture("lora").join("reference.safetensors"),
            "lora_out",
        );
    }
}

#[test]
fn lora_flag_patches_the_wan_transformer() {
    let tmp = tempfile::tempdir().unwrap();
    let ins = wan_inputs(tmp.path());
    let out = tmp.path().join("out.safetensors");
    let dir = fixture("wan_dit");
    let lora = format!("{}:0.8", dir.join("lora_comfy.safetensors").display());
    run(&[
        "wan-dit",
        "--model",
        dir.join("original.safetensors").to_str().unwrap(),
        "--config",
        dir.join("config.json").to_str().unwrap(),
        "--inputs",
        ins.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lora",
        &lora,
    ]);
    check(
        &out,
        "sample",
        &dir.join("lora_reference.safetensors"),
        "lora_sample",
    );
}

fn wan_inputs(dir: &Path) -> PathBuf {
    let ins = dir.join("wan-in.safetensors");
    inputs(
        &fixture("wan_dit").join("reference.safetensors"),
        &[
            ("hidden_states", "hidden_states"),
            ("timestep", "timestep"),
            ("encoder_hidden_states", "encoder_hidden_states"),
        ],
        &ins,
    );
    ins
}

/// On wgpu: the Wan transformer resident and with its three blocks (and the text embedder)
/// swapped to host memory, two blocks staged ahead, in both layouts: bit-identical.
#[cfg(feature = "wgpu")]
#[test]
fn wan_block_swap_is_bit_identical_to_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = fixture("wan_dit").join("reference.safetensors");
    let ins = wan_inputs(tmp.path());
    let mut outs = Vec::new();
    for (tag, extra) in [
        ("resident", vec![]),
        (
            "swap",
            vec![
                "--blocks-to-swap",
                "3",
                "--prefetch-blocks",
                "2",
                "--offload-txt-emb",
            ],
        ),
    ] {
        for file in [
            "diffusion_pytorch_model.safetensors",
            "original.safetensors",
        ] {
            let out = tmp.path().join(format!("{tag}-{file}"));
            let model = fixture("wan_dit").join(file);
            let config = fixture("wan_dit").join("config.json");
            let mut args = vec![
                "wan-dit",
                "--model",
                model.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--inputs",
                ins.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--device",
                "wgpu:0",
                "--devices",
                "wgpu:0=8gib,cpu=16gib",
            ];
            args.extend(extra.iter().copied());
            run(&args);
            outs.push(check(&out, "sample", &reference, "sample"));
        }
    }
    assert!(outs.iter().all(|o| *o == outs[0]));
}

/// On wgpu: the FLUX transformer resident and with its last double- and single-stream blocks
/// (and the context embedder) swapped to host memory, in both layouts: bit-identical.
#[cfg(feature = "wgpu")]
#[test]
fn flux_block_swap_is_bit_identical_to_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = fixture("flux_dit").join("reference.safetensors");
    let ins = tmp.path().join("flux-in.safetensors");
    inputs(&reference, &FLUX_INPUTS, &ins);
    let mut outs = Vec::new();
    for (tag, extra) in [
        ("resident", vec![]),
        (
            "swap",
            vec![
                "--blocks-to-swap",
                "1",
                "--single-blocks-to-swap",
                "2",
                "--offload-txt-emb",
            ],
        ),
    ] {
        for file in ["diffusion_pytorch_model.safetensors", "bfl.safetensors"] {
            let out = tmp.path().join(format!("{tag}-{file}"));
            let model = fixture("flux_dit").join(file);
            let config = fixture("flux_dit").join("config.json");
            let mut args = vec![
                "flux-dit",
                "--model",
                model.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--inputs",
                ins.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--device",
                "wgpu:0",
                "--devices",
                "wgpu:0=8gib,cpu=16gib",
            ];
            args.extend(extra.iter().copied());
            run(&args);
            outs.push(check(&out, "sample", &reference, "sample"));
        }
    }
    assert_eq!(
        outs[0], outs[2],
        "diffusers layout: block swap changed the output"
    );
    assert_eq!(
        outs[1], outs[3],
        "BFL layout: block swap changed the output"
    );
}

#[test]
fn block_swap_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let ins = wan_inputs(tmp.path());
    for (task, model, want) in [
        (
            "unet",
            "unet_sd",
            "--blocks-to-swap applies to the wan-dit and flux-dit tasks",
        ),
        (
            "wan-dit",
            "wan_dit",
            "the swap device `cpu` is the compute device",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_distorch"))
            .args(["run", task, "--blocks-to-swap", "2", "--model"])
            .arg(fixture(model))
            .args(["--inputs", ins.to_str().unwrap(), "--out", "/dev/null"])
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
    }
}

/// `path`'s tensors with every f32 one stored as f16 instead (the fixtures' values are
/// bf16-rounded, so well within f16's range).
#[cfg(feature = "wgpu")]
fn to_f16_file(path: &Path, dst: &Path) {
    let all = tensors(path);
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for (name, (dtype, shape, raw)) in &all {
        let (dtype, raw) = match dtype {
            DType::F32 => (
                DType::F16,
                distorch::core::runtime::encode_f32(&f32s(raw), DType::F16),
            ),
            other => (*other, raw.clone()),
        };
        specs.push((name.clone(), dtype, shape.clone()));
        data.push(raw);
    }
    let data: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    write(dst, &specs, &data, &BTreeMap::new()).unwrap();
}

/// A logged `forward done` field of `distorch run`'s stderr.
#[cfg(feature = "wgpu")]
fn logged(stderr: &str, field: &str) -> u64 {
    // Without colour escapes between a field's name, `=` and its value.
    let mut plain = String::new();
    let mut chars = stderr.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    let line = plain
        .lines()
        .find(|l| l.contains("forward done"))
        .unwrap_or_else(|| panic!("no `forward done` line in {stderr}"));
    let at = line
        .find(&format!("{field}="))
        .unwrap_or_else(|| panic!("no {field} in {line}"));
    line[at + field.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[cfg(feature = "wgpu")]
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        d += (f64::from(*g) - f64::from(*w)).powi(2);
        n += f64::from(*w).powi(2);
    }
    (d / n).sqrt()
}

/// `distorch run --dtype f16 --device wgpu:0 --expert "wgpu:0,0b;cpu,*"` on the UNet and CLIP
/// fixtures stored in f32 and in f16: the output is within twice PyTorch's own f16 error of
/// the f32 reference, every streamed unit crosses once at its storage size (bytes moved ==
/// the streamed units' bytes, logged), and the f16 file moves half the f32 file's bytes.
#[cfg(feature = "wgpu")]
#[test]
fn f16_compute_on_wgpu_streams_the_storage_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unet",
            "unet_sd",
            "diffusion_pytorch_model.safetensors",
            vec![
                ("sample", "sample"),
                ("timestep", "timestep"),
                ("encoder_hidden_states", "encoder_hidden_states"),
            ],
            ("sample", "out"),
        ),
        (
            "clip-text",
            "clip_text_quick_gelu",
            "model.safetensors",
            vec![("input_ids", "input_ids")],
            ("last_hidden_state", "last_hidden_state"),
        ),
    ];
    for (task, name, file, ins, (output, key)) in cases {
        let reference = fixture(name).join("reference.safetensors");
        let input = tmp.path().join(format!("{name}-in.safetensors"));
        inputs(&reference, &ins, &input);
        let f16 = tmp.path().join(format!("{name}-f16.safetensors"));
        to_f16_file(&fixture(name).join(file), &f16);
        let mut moved = Vec::new();
        for model in [fixture(name).join(file), f16] {
            let out = tmp.path().join(format!("{name}-out.safetensors"));
            let o = Command::new(env!("CARGO_BIN_EXE_distorch"))
                .args(["run", task, "--model"])
                .arg(&model)
                .arg("--config")
                .arg(fixture(name).join("config.json"))
                .arg("--inputs")
                .arg(&input)
                .arg("--out")
                .arg(&out)
                .args(["--dtype", "f16", "--device", "wgpu:0"])
                .args([
                    "--devices",
                    "wgpu:0=8gib,cpu=16gib",
                    "--expert",
                    "wgpu:0,0b;cpu,*",
                    "--tiny-threshold",
                    "0b",
                ])
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{task} {}: {stderr}", model.display());
            let bytes = logged(&stderr, "bytes_moved");
            assert_eq!(bytes, logged(&stderr, "streamed_unit_bytes"), "{stderr}");
            assert!(bytes > 0, "{stderr}");
            moved.push(bytes);
            let got = f32s(&tensors(&out)[output].2);
            let want = f32s(&tensors(&reference)[key].2);
            let torch = f32s(
                &tensors(&fixture(name).join("half_reference.safetensors"))[&format!("f16.{key}")]
                    .2,
            );
            let (ours, theirs) = (rel_l2(&got, &want), rel_l2(&torch, &want));
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "{task} {}: bytes moved {bytes}, rel L2 {ours:.2e} (PyTorch f16 {theirs:.2e})",
                    model.display()
                );
            }
            assert!(
                ours <= 2.0 * theirs,
                "{task} {}: rel L2 {ours:.3e}, PyTorch f16 {theirs:.3e}",
                model.display()
            );
        }
        assert_eq!(
            moved[0],
            2 * moved[1],
            "{task}: f32 file vs f16 file bytes moved"
        );
    }
}

#[test]
fn a_gguf_unet_runs_with_and_without_a_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = fixture("unet_sd").join("reference.safetensors");
    let gguf_reference = fixture("unet_sd").join("gguf_reference.safetensors");
    let ins = tmp.path().join("in.safetensors");
    let out = tmp.path().join("out.safetensors");
    inputs(
        &reference,
        &[
            ("sample", "sample"),
            ("timestep", "timestep"),
            ("encoder_hidden_states", "encoder_hidden_states"),
        ],
        &ins,
    );
    let lora = format!("{}:0.8", fixture("lora").join("peft.safetensors").display());
    let model = fixture("unet_sd").join("unet.gguf");
    let config = fixture("unet_sd").join("config.json");
    for (extra, key) in [(None, "out"), (Some(lora.as_str()), "lora_out")] {
        let mut args = vec![
            "unet",
            "--model",
            model.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--inputs",
            ins.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(l) = extra {
            args.extend(["--lora", l]);
        }
        run(&args);
        check(&out, "sample", &gguf_reference, key);
    }
}
