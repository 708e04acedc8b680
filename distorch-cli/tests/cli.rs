//! The `distorch` binary end to end: exit codes, messages, the JSON schema, and the plan's
//! strings reproducing it through the command line.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn distorch(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distorch"))
        .args(args)
        .env("DISTORCH_CACHE_DIR", cache)
        .env("RUST_LOG", "off")
        .output()
        .expect("run distorch")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

const DEVICES: &str = "cuda:0=8gib,cuda:1=4gib,cpu=32gib";

#[test]
fn plan_json_has_the_documented_shape_and_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "plan",
        "--demo",
        "sd15",
        "--component",
        "unet",
        "--virtual-vram",
        "1.25",
        "--donor",
        "cuda:1,cpu",
        "--devices",
        DEVICES,
        "--json",
    ];
    let o = distorch(&args, dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one object for one component");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["component"], "unet");
    let total = v["total_bytes"].as_u64().unwrap();
    let devices = v["devices"].as_array().unwrap();
    let placed: u64 = devices
        .iter()
        .map(|d| d["model_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(placed, total);
    for d in devices {
        for key in ["device", "capacity_bytes", "model_bytes", "units"] {
            assert!(!d[key].is_null(), "device entry lacks {key}: {d}");
        }
    }
    let units = v["units"].as_array().unwrap();
    assert_eq!(
        units
            .iter()
            .map(|u| u["bytes"].as_u64().unwrap())
            .sum::<u64>(),
        total
    );
    assert!(units[0]["name"].is_string() && units[0]["device"].is_string());
    assert!(v["warnings"].is_array());
    let offloaded: u64 = devices[1..]
        .iter()
        .map(|d| d["model_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        offloaded <= 5 << 28 && offloaded > (5 << 28) - (50 << 20),
        "{offloaded}"
    );

    // Both strings fed back as --expert give the same placement.
    for key in ["bytes_string", "fraction_string"] {
        let s = v[key].as_str().unwrap();
        let again = distorch(
            &[
                "plan",
                "--demo",
                "sd15",
                "--component",
                "unet",
                "--expert",
                s,
                "--devices",
                DEVICES,
                "--json",
            ],
            dir.path(),
        );
        assert!(again.status.success(), "{}", stderr(&again));
        let w: Value = serde_json::from_str(stdout(&again).trim()).unwrap();
        assert_eq!(w["units"], v["units"], "{key} {s} reproduces the plan");
    }
}

#[test]
fn all_components_print_one_json_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--expert",
            "cuda:0,50%;cpu,*",
            "--devices",
            DEVICES,
            "--json",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let comps: Vec<String> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["component"].to_string())
        .collect();
    assert_eq!(comps, ["\"unet\"", "\"clip\"", "\"vae\""]);
}

#[test]
fn parse_errors_exit_2_with_a_caret() {
    let dir = tempfile::tempdir().unwrap();
    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--expert",
            "cuda:0,1tx;cpu,*",
            "--devices",
            DEVICES,
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: invalid allocation: unknown unit `tx` (expected one of b, k, kb, kib, m, mb, mib, \
         g, gb, gib, t, tb, tib or %)\n  cuda:0,1tx;cpu,*\n          ^^\n"
    );
    // Checked before any file is read: a missing file does not mask the parse error.
    let o = distorch(
        &[
            "plan",
            "/nonexistent.safetensors",
            "--virtual-vram",
            "2",
            "--devices",
            "cuda:0=8gb,cpu",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid device declaration"),
        "{}",
        stderr(&o)
    );
    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--virtual-vram",
            "2",
            "--donor",
            "cpu,,cuda:1",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid device list"), "{}", stderr(&o));
}

#[test]
fn other_errors_exit_1_and_name_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--expert",
            "cuda:2,1gb;cpu,*",
            "--devices",
            DEVICES,
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown device `cuda:2`"),
        "{}",
        stderr(&o)
    );

    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--virtual-vram",
            "1",
            "--devices",
            "cuda:0=512mib,cpu=64gib",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("`cuda:0` cannot hold its share of the model")
            && stderr(&o).contains("raise virtual VRAM by at least"),
        "{}",
        stderr(&o)
    );

    let o = distorch(&["inspect", "/nonexistent/model.safetensors"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/model.safetensors"),
        "{}",
        stderr(&o)
    );

    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--component",
            "controlnet",
            "--expert",
            "cpu,*",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no controlnet component"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn detected_graph_hints_at_declaring_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let o = distorch(
        &["plan", "--demo", "sd15", "--expert", "cuda:0,1gb;cpu,*"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("this build detects host memory only; build with --features cuda or wgpu")
            && stderr(&o).contains("declare devices with --devices"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn inspect_json_lists_components() {
    let dir = tempfile::tempdir().unwrap();
    let o = distorch(&["inspect", "--demo", "sd15", "--json"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let comps = v["components"].as_array().unwrap();
    assert_eq!(comps.len(), 3);
    assert_eq!(comps[0]["component"], "unet");
    assert_eq!(comps[0]["dtypes"]["F16"], 686);
    assert_eq!(v["tensors"], 1130);
    let human = distorch(&["inspect", "--demo", "sd15"], dir.path());
    assert!(stdout(&human).contains("unet"), "{}", stdout(&human));
}

fn gguf_unet() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../distorch-models/tests/fixtures/unet_sd/unet.gguf")
}

#[test]
fn inspect_and_plan_read_gguf_files_with_their_quantized_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let file = gguf_unet();
    let file = file.to_str().unwrap();
    let o = distorch(&["inspect", file, "--json"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["format"], "GGUF");
    assert_eq!(v["metadata"]["general.architecture"], "sd1");
    assert_eq!(v["components"][0]["component"], "unet");
    let types = v["types"].as_array().unwrap();
    let q4k = types.iter().find(|t| t["dtype"] == "Q4_K").unwrap();
    // 144 bytes per 256 elements.
    assert_eq!(
        q4k["bytes"].as_u64().unwrap() * 256,
        q4k["elements"].as_u64().unwrap() * 144
    );
    let summed: u64 = types.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(summed, v["data_bytes"].as_u64().unwrap());
    let human = stdout(&distorch(&["inspect", file], dir.path()));
    assert!(human.contains("GGUF") && human.contains("Q6_K"), "{human}");

    let args = [
        "plan",
        file,
        "--component",
        "unet",
        "--virtual-vram",
        "100",
        "--donor",
        "cpu",
        "--tiny-threshold",
        "0b",
        "--devices",
        DEVICES,
        "--json",
    ];
    let o = distorch(&args, dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    // Every weight at the host home (norms stay on the compute device, as f32 there and in
    // the file): the file's quantized bytes.
    let devices = plan["devices"].as_array().unwrap();
    let cpu = devices.iter().find(|d| d["device"] == "cpu").unwrap();
    assert!(cpu["model_bytes"].as_u64().unwrap() > summed * 9 / 10);
    let placed: u64 = devices
        .iter()
        .map(|d| d["model_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(placed, summed);
}

#[test]
fn a_file_of_another_format_is_named_as_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, b"PK\x03\x04\x14\0\0\0\0\0").unwrap();
    let o = distorch(&["inspect", path.to_str().unwrap()], dir.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("zip archive"), "{}", stderr(&o));
}

/// `inspect` names FLUX's files: the transformer (with its layout, or why its size cannot be
/// read), T5 v1.1 beside UMT5, and the 16-channel VAE with the factors it assumes; what
/// detection guessed (a tiny CLIP's or UNet's heads) is marked "assumed".
#[test]
fn inspect_names_flux_files() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../distorch-models/tests/fixtures");
    for (file, want) in [
        (
            "flux_dit/bfl.safetensors",
            "not recognised: FLUX transformer: the rotary sections",
        ),
        ("t5/model.safetensors", "T5 v1.1 encoder: 3 layers"),
        ("umt5/model.safetensors", "UMT5 encoder: 2 layers"),
        // Guesses are marked.
        (
            "clip_text_gelu/model.safetensors",
            "assumed: attention heads 64 wide (1 heads of width 32)",
        ),
        (
            "unet_sd/ldm.safetensors",
            "assumed: attention heads 64 wide",
        ),
        (
            "flux_vae/ae.safetensors",
            "assumed FLUX.1's (scaling 0.3611, shift 0.1159)",
        ),
    ] {
        let path = fixtures.join(file);
        let o = distorch(&["inspect", path.to_str().unwrap()], dir.path());
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains(want), "{file}: {}", stdout(&o));
    }
}

/// `plan --order auto --latent`: the UNet's units timed from its shapes, the pass predicted in
/// the report and the JSON; the auto plan no slower than interleave's or tail's at the same
/// budget; a bad latent is a usage error.
#[test]
fn plan_predicts_the_pass_and_auto_is_no_slower() {
    let dir = tempfile::tempdir().unwrap();
    let step = |order: &str| {
        let o = distorch(
            &[
                "plan",
                "--demo",
                "sd15",
                "--component",
                "unet",
                "--virtual-vram",
                "1",
                "--devices",
                "cuda:0=8gib,cpu=32gib@16gb/s",
                "--latent",
                "64x64",
                "--tflops",
                "50",
                "--order",
                order,
                "--json",
            ],
            dir.path(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        v["predicted"]["step_ms"]
            .as_f64()
            .expect("a predicted step")
    };
    let auto = step("auto");
    for order in ["interleave", "tail"] {
        let other = step(order);
        assert!(auto <= other + 1e-6, "auto {auto} ms vs {order} {other} ms");
    }
    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--virtual-vram",
            "1",
            "--latent",
            "64by64",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = distorch(
        &[
            "plan",
            "--demo",
            "sd15",
            "--component",
            "unet",
            "--virtual-vram",
            "1",
            "--devices",
            "cuda:0=8gib,cpu=32gib",
            "--latent",
            "64x64",
            "--order",
            "auto",
        ],
        dir.path(),
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("predicted pass:"), "{out}");
    assert!(
        out.contains("link to the compute device is not declared"),
        "{out}"
    );
}
