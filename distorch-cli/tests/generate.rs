//! `distorch generate`: an image from a tiny diffusers pipeline folder (the parity fixture
//! of `tools/fixtures/pipeline.py`), a video and a FLUX image from their demo folders, with
//! their plans and streamer lines; bad strings exit 2 with a caret before any weight is read.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn distorch(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distorch"))
        .args(args)
        .env("DISTORCH_CACHE_DIR", cache)
        .env("RUST_LOG", "off")
        .output()
        .expect("run distorch")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn pipeline_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../distorch-models/tests/fixtures/pipeline_sd")
}

#[test]
fn generate_image_writes_a_png_and_prints_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let folder = pipeline_folder();
    let o = distorch(
        &[
            "generate",
            "image",
            "--ckpt",
            folder.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--steps",
            "2",
            "--width",
            "16",
            "--height",
            "16",
            "--unet-expert-mode-allocations",
            "cpu,*",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{}\n{}", stdout, text(&o.stderr));
    for table in ["[unet]", "[clip.0]", "[vae]", "unet streamer:", "step   2:"] {
        assert!(stdout.contains(table), "no `{table}` in:\n{stdout}");
    }
    let png = std::fs::read(&out).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn generate_video_on_the_demo_folder_writes_frames() {
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    let o = distorch(
        &[
            "generate",
            "video",
            "--prompt",
            "a fox",
            "--frames",
            "1",
            "--width",
            "16",
            "--height",
            "16",
            "--steps",
            "1",
            "--max-sequence-length",
            "16",
            "--blocks-to-swap",
            "2",
            "--out-dir",
            frames.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{}\n{}", stdout, text(&o.stderr));
    assert!(stdout.contains("[transformer]") && stdout.contains("transformer streamer:"));
    assert!(frames.join("frame_000.png").is_file());
}

#[test]
fn generate_flux_on_the_demo_folder_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flux.png");
    let o = distorch(
        &[
            "generate",
            "flux",
            "--prompt",
            "a fox",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
            "--max-sequence-length",
            "16",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{}\n{}", stdout, text(&o.stderr));
    for table in [
        "[CLIP]",
        "[T5]",
        "[transformer]",
        "[vae]",
        "transformer streamer:",
    ] {
        assert!(stdout.contains(table), "no `{table}` in:\n{stdout}");
    }
    assert_eq!(&std::fs::read(&out).unwrap()[1..4], b"PNG");
}

/// A bad allocation string exits 2 with the caret message before anything is read: the
/// checkpoint named does not exist, which would otherwise be exit 1.
#[test]
fn bad_placement_strings_exit_2_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    // Allocation strings and device lists show the caret; other bad values (sampler, dtype)
    // are usage errors, exit 2 as well, before anything is read.
    for (flag, value, caret) in [
        ("--unet-expert-mode-allocations", "cpu,1tx;cpu,*", "^^"),
        ("--clip-compute-device", "cdua:1", "^"),
        ("--unet-donor-device", "cpu,,cuda:1", "^"),
        ("--sampler", "eulr", ""),
        ("--dtype", "f8", ""),
    ] {
        let o = distorch(
            &[
                "generate",
                "image",
                "--ckpt",
                "/nonexistent/model.safetensors",
                "--prompt",
                "x",
                flag,
                value,
            ],
            dir.path(),
        );
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(value) && err.contains(caret), "{flag}: {err}");
        assert!(
            !err.contains("nonexistent"),
            "{flag}: read before parsing: {err}"
        );
    }
}
