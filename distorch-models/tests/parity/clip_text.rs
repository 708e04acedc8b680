//! The CLIP text encoder against transformers' `CLIPTextModelWithProjection` (fixtures from
//! `tools/fixtures/gen.py`: tiny random configs, quick_gelu and gelu), resident and fully
//! offloaded, with and without the `text_model.` key prefix.

use std::path::Path;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::SafetensorsIndex;
use distorch_core::runtime::{DeviceMap, LoadOptions, Lookahead};
use distorch_models::{ClipTextConfig, ClipTextModel, Error};

fn load(dir: &Path, weights: &Path, offload: bool) -> Result<ClipTextModel<B>, Error> {
    let config = ClipTextConfig::from_file(dir.join("config.json"))?;
    let (model, report) = load_as::<ClipTextModel<B>>(weights, config, offload)?;
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    if offload {
        // Everything but the norms, which are always pinned to the compute device.
        for u in model.streamer().store().units() {
            let norm = u.name.contains("norm") || u.name.contains("ln_");
            assert_eq!(u.is_resident(), norm, "{}", u.name);
        }
    }
    Ok(model)
}

fn ids(dir: &Path) -> Vec<u32> {
    let (shape, v) = read(&dir.join("reference.safetensors"), "input_ids");
    assert_eq!(shape, [2, 16]);
    v.iter().map(|&x| x as u32).collect()
}

fn outputs(model: &ClipTextModel<B>, ids: &[u32]) -> Vec<f32> {
    let out = model.forward(ids, 2).unwrap();
    let mut all = out.last_hidden_state.into_data().to_vec::<f32>().unwrap();
    all.extend(
        out.text_embeds
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap(),
    );
    for h in out.hidden_states {
        all.extend(h.into_data().to_vec::<f32>().unwrap());
    }
    all
}

#[test]
fn matches_transformers_resident_and_offloaded() {
    for name in ["clip_text_quick_gelu", "clip_text_gelu"] {
        let dir = fixture(name);
        let reference = dir.join("reference.safetensors");
        let ids = ids(&dir);
        let weights = dir.join("model.safetensors");
        let resident = load(&dir, &weights, false).unwrap();
        let out = resident.forward(&ids, 2).unwrap();
        assert_close(
            "last_hidden_state",
            out.last_hidden_state,
            read(&reference, "last_hidden_state"),
        );
        assert_close(
            "pooled_output",
            out.pooled_output,
            read(&reference, "pooled_output"),
        );
        assert_close(
            "text_embeds",
            out.text_embeds.unwrap(),
            read(&reference, "text_embeds"),
        );
        assert_close(
            "hidden_states",
            Tensor::stack::<4>(out.hidden_states, 0),
            read(&reference, "hidden_states"),
        );
        let offloaded = load(&dir, &weights, true).unwrap();
        assert_eq!(
            outputs(&resident, &ids),
            outputs(&offloaded, &ids),
            "{name}: offloaded output differs from resident"
        );
        let stats = offloaded.streamer().take_stats();
        assert_eq!(
            stats.resident + stats.on_demand + stats.prefetched,
            stats.fetches,
            "{stats:?}"
        );
        assert_eq!(stats.fetches, 2 + 8 * 3 + 2, "every unit once");
    }
}

#[test]
fn keys_without_the_text_model_prefix_load_the_same() {
    let dir = fixture("clip_text_gelu");
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("bare.safetensors");
    rewrite(&dir.join("model.safetensors"), &bare, |k| {
        Some(k.strip_prefix("text_model.").unwrap_or(k).to_owned())
    });
    let ids = ids(&dir);
    let a = load(&dir, &dir.join("model.safetensors"), false).unwrap();
    let b = load(&dir, &bare, true).unwrap();
    assert_eq!(outputs(&a, &ids), outputs(&b, &ids));
}

#[test]
fn bad_weights_configs_and_ids_are_typed_errors() {
    let dir = fixture("clip_text_quick_gelu");
    let tmp = tempfile::tempdir().unwrap();
    let holed = tmp.path().join("holed.safetensors");
    rewrite(&dir.join("model.safetensors"), &holed, |k| {
        (k != "text_model.encoder.layers.1.mlp.fc2.weight").then(|| k.to_owned())
    });
    let e = load(&dir, &holed, false).err().unwrap();
    assert!(
        e.to_string().ends_with(
            "is missing 1 expected tensor(s): `text_model.encoder.layers.1.mlp.fc2.weight`"
        ),
        "{e}"
    );

    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, r#"{"hidden_act": "relu"}"#).unwrap();
    let e = ClipTextConfig::from_file(&cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported configuration: `hidden_act` = \"relu\" (supported: quick_gelu, gelu)"
    );
    std::fs::write(&cfg, r#"{"hidden_size": "wide"}"#).unwrap();
    let e = ClipTextConfig::from_file(&cfg).unwrap_err();
    assert!(
        e.to_string().ends_with(
            "config.json: field `hidden_size`: invalid type: string \"wide\", expected usize"
        ),
        "{e}"
    );

    let model = load(&dir, &dir.join("model.safetensors"), false).unwrap();
    let mut ids = ids(&dir);
    ids[20] = 1000;
    let e = model.forward(&ids, 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid input `input_ids`: id 1000 at row 1, position 4 is outside the vocabulary of 1000"
    );
    let e = model.forward(&[998; 17], 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("17 tokens per row, the model takes at most 16"),
        "{e}"
    );
    let e = model.forward(&[998; 5], 2).unwrap_err();
    assert!(e.to_string().contains("do not split into 2"), "{e}");
}

#[test]
fn sd15_single_file_clip_keys_and_shapes_are_all_covered() {
    let dir = tempfile::tempdir().unwrap();
    let path = distorch_models::sd::demo::DemoModel::Sd15
        .ensure_in(dir.path())
        .unwrap();
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    let clip = split
        .components
        .iter()
        .find(|c| c.kind == distorch_core::ComponentKind::Clip)
        .unwrap();
    let want: std::collections::BTreeSet<(String, Vec<usize>)> = clip
        .tensors
        .iter()
        .map(|t| {
            let name = t.name.strip_prefix(clip.prefix).unwrap().to_owned();
            (name, t.shape.iter().map(|&d| d as usize).collect())
        })
        .filter(|(n, _)| !n.ends_with("position_ids"))
        .collect();
    let config = ClipTextConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        projection_dim: 768,
        ..ClipTextConfig::default()
    };
    let got: std::collections::BTreeSet<(String, Vec<usize>)> =
        ClipTextModel::<B>::expected_tensors(&config, "transformer.text_model.", false)
            .into_iter()
            .map(|e| (e.name, e.shape))
            .collect();
    assert_eq!(want, got);

    // And the encoder loads from the checkpoint (zero weights: the output is not checked).
    let (model, report) = <ClipTextModel<B> as distorch_models::Model<B>>::load(
        &distorch_models::LoadContext {
            index: &index,
            component: clip,
            plan: &{
                let inv = crate::common::inventory_of(clip);
                let graph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
                let vv = distorch_alloc::VirtualVram::new(
                    distorch_alloc::DeviceId::cuda(0),
                    inv.total_bytes(),
                    vec![distorch_alloc::DeviceId::CPU],
                )
                .unwrap();
                distorch_alloc::plan(&distorch_alloc::PlanRequest::virtual_vram(vv), &inv, &graph)
                    .unwrap()
            },
            devices: &DeviceMap::new(Default::default()),
            options: &LoadOptions::default(),
            lookahead: Lookahead::default(),
        },
        config,
    )
    .unwrap();
    assert!(
        report.unused.is_empty() && report.missing.is_empty(),
        "{report:?}"
    );
    let out = model.forward(&[49406, 320, 1125, 49407], 1).unwrap();
    assert_eq!(out.last_hidden_state.dims(), [1, 4, 768]);
    assert_eq!(out.hidden_states.len(), 13);
}

#[test]
fn open_clip_layout_matches_transformers() {
    // `open_clip.safetensors`: the gelu fixture in OpenCLIP's layout under SDXL's
    // `conditioner.embedders.1.model.` (fused q/k/v, transposed projection), checked by
    // `tools/fixtures/gen.py` with diffusers' own converter.
    let dir = fixture("clip_text_gelu");
    let path = dir.join("open_clip.safetensors");
    let reference = dir.join("reference.safetensors");
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    assert_eq!(split.components.len(), 1);
    let ids = ids(&dir);
    let resident = load(&dir, &path, false).unwrap();
    let out = resident.forward(&ids, 2).unwrap();
    assert_close(
        "last_hidden_state",
        out.last_hidden_state,
        read(&reference, "last_hidden_state"),
    );
    assert_close(
        "text_embeds",
        out.text_embeds.unwrap(),
        read(&reference, "text_embeds"),
    );
    assert_close(
        "hidden_states",
        Tensor::stack::<4>(out.hidden_states, 0),
        read(&reference, "hidden_states"),
    );
    let offloaded = load(&dir, &path, true).unwrap();
    assert_eq!(outputs(&resident, &ids), outputs(&offloaded, &ids));
}

#[test]
fn detection_on_malformed_shapes_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("odd.safetensors");
    let specs = vec![
        (
            "text_model.embeddings.token_embedding.weight".to_owned(),
            distorch_core::DType::F32,
            vec![],
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_owned(),
            distorch_core::DType::F32,
            vec![],
        ),
        (
            "text_model.encoder.layers.0.mlp.fc1.weight".to_owned(),
            distorch_core::DType::F32,
            vec![],
        ),
    ];
    let zero = [0u8; 4];
    distorch_core::safetensors::write(
        &path,
        &specs,
        &[&zero, &zero, &zero],
        &std::collections::BTreeMap::new(),
    )
    .unwrap();
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    let e = ClipTextConfig::detect(&split.components[0]).unwrap_err();
    assert!(e.to_string().contains("not a CLIP text encoder"), "{e}");
}
