//! The samplers against diffusers' schedulers (fixture from `tools/fixtures/schedulers.py`,
//! SD 1.5's scheduler config, 10 steps): timesteps, sigmas, the initial noise scale, and
//! every step's input scaling and update on fixed samples, model outputs and noise, for ε- and
//! v-prediction.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_models::sampling::scheduler::{SamplerKind, Scheduler, SchedulerConfig};

const KINDS: [(&str, SamplerKind); 4] = [
    ("euler", SamplerKind::Euler),
    ("euler_a", SamplerKind::EulerAncestral),
    ("ddim", SamplerKind::Ddim),
    ("dpmpp_2m_karras", SamplerKind::DpmPp2mKarras),
];

fn values(key: &str) -> Vec<f64> {
    read(&fixture("schedulers").join("reference.safetensors"), key).1
}

fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 + 1e-5 * w.abs(),
            "{what}[{i}]: got {g}, reference {w}"
        );
    }
}

#[test]
fn match_diffusers_schedulers() {
    for (name, kind) in KINDS {
        for pred in ["epsilon", "v_prediction"] {
            let key = format!("{name}.{pred}");
            let config = SchedulerConfig {
                prediction_type: serde_json::from_value(serde_json::json!(pred)).unwrap(),
                ..SchedulerConfig::default()
            };
            let mut s = Scheduler::<B>::new(kind, &config, 10).unwrap();
            close(
                &format!("{key} timesteps"),
                s.timesteps(),
                &values(&format!("{key}.timesteps")),
            );
            if kind != SamplerKind::Ddim {
                close(
                    &format!("{key} sigmas"),
                    s.sigmas(),
                    &values(&format!("{key}.sigmas")),
                );
            }
            close(
                &format!("{key} init_noise_sigma"),
                &[s.init_noise_sigma()],
                &values(&format!("{key}.init_noise_sigma")),
            );
            for i in 0..10 {
                let t = |part: &str| -> Tensor<B, 4> {
                    tensor("schedulers", &format!("{key}.{i}.{part}"))
                };
                let scaled = s.scale_model_input(t("sample"), i);
                let file = fixture("schedulers").join("reference.safetensors");
                assert_close(
                    &format!("{key} step {i} scaled"),
                    scaled,
                    read(&file, &format!("{key}.{i}.scaled")),
                );
                let prev = s
                    .step(t("model_output"), i, t("sample"), Some(t("noise")))
                    .unwrap();
                assert_close(
                    &format!("{key} step {i}"),
                    prev,
                    read(&file, &format!("{key}.{i}.prev_sample")),
                );
            }
        }
    }
}

#[test]
fn bad_settings_are_typed_errors() {
    let e = SamplerKind::from_name("heun").unwrap_err();
    assert!(
        e.to_string()
            .contains("known: euler, euler_a, ddim, dpmpp_2m_karras"),
        "{e}"
    );
    let e = Scheduler::<B>::new(SamplerKind::Euler, &SchedulerConfig::default(), 0)
        .err()
        .unwrap();
    assert!(e.to_string().contains("0 steps"), "{e}");
    // Unknown names are refused while reading, naming the field.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("scheduler_config.json");
    std::fs::write(&path, r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap();
    let e = SchedulerConfig::from_file(&path).unwrap_err();
    assert!(e.to_string().contains("beta_schedule"), "{e}");
    std::fs::write(&path, r#"{"rescale_betas_zero_snr": true}"#).unwrap();
    let e = SchedulerConfig::from_file(&path).unwrap_err();
    assert!(
        e.to_string().contains("`rescale_betas_zero_snr` = true"),
        "{e}"
    );
    let mut s =
        Scheduler::<B>::new(SamplerKind::EulerAncestral, &SchedulerConfig::default(), 2).unwrap();
    let x = Tensor::<B, 4>::zeros([1, 4, 2, 2], &Default::default());
    let e = s.step(x.clone(), 0, x, None).unwrap_err();
    assert!(e.to_string().contains("needs noise"), "{e}");
}

#[test]
fn flow_matching_matches_diffusers() {
    use distorch_models::sampling::flow_match::{FlowMatchConfig, FlowMatchEuler};
    let file = fixture("schedulers").join("flow_match.safetensors");
    let get = |key: &str| read(&file, key);
    for shift in ["1.0", "3.0", "5.0"] {
        let key = format!("flow_match.{shift}");
        let s =
            FlowMatchEuler::new(&FlowMatchConfig::with_shift(shift.parse().unwrap()), 10).unwrap();
        let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        close(
            &format!("{key} timesteps"),
            &f64s(s.timesteps()),
            &get(&format!("{key}.timesteps")).1,
        );
        close(
            &format!("{key} sigmas"),
            &f64s(s.sigmas()),
            &get(&format!("{key}.sigmas")).1,
        );
        for i in 0..s.steps() {
            let t = |name: &str| -> Tensor<B, 5> {
                let (shape, v) = get(&format!("{key}.{i}.{name}"));
                let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                let shape: [usize; 5] = shape.try_into().unwrap();
                Tensor::from_data(burn::tensor::TensorData::new(v, shape), &Default::default())
            };
            let prev = s.step(t("model_output"), i, t("sample"));
            assert_close(
                &format!("{key} step {i}"),
                prev,
                get(&format!("{key}.{i}.prev_sample")),
            );
        }
    }
    let mut bad = FlowMatchConfig::with_shift(3.0);
    bad.use_dynamic_shifting = true;
    let e = FlowMatchEuler::new(&bad, 10).unwrap_err();
    assert!(e.to_string().contains("token count"), "{e}");
    bad.invert_sigmas = true;
    let e = FlowMatchEuler::flux(&bad, 10, 256).unwrap_err();
    assert!(e.to_string().contains("invert_sigmas"), "{e}");
}

/// FLUX's schedules as `FluxPipeline` sets them (`tools/fixtures/flux.py`): FLUX.1-dev's
/// dynamic shift at several image sizes and step counts, schnell's static one.
#[test]
fn flux_schedules_match_diffusers() {
    use distorch_models::sampling::flow_match::{FlowMatchConfig, FlowMatchEuler};
    let file = fixture("flux_schedule").join("reference.safetensors");
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    for (name, config) in [
        ("dev", FlowMatchConfig::flux_dev()),
        ("schnell", FlowMatchConfig::default()),
    ] {
        for tokens in [16, 1024, 4096] {
            for steps in [1, 4, 28] {
                let key = format!("{name}.{tokens}.{steps}");
                let s = FlowMatchEuler::flux(&config, steps, tokens).unwrap();
                let want = |k: &str| read(&file, &format!("{key}.{k}")).1;
                assert_eq!(f64s(s.sigmas()), want("sigmas"), "{key} sigmas");
                assert_eq!(f64s(s.timesteps()), want("timesteps"), "{key} timesteps");
            }
        }
    }
    let e = FlowMatchEuler::with_sigmas(&FlowMatchConfig::flux_dev(), &[0.5], None).unwrap_err();
    assert!(e.to_string().contains("needs mu"), "{e}");
    let e = FlowMatchEuler::with_sigmas(&FlowMatchConfig::default(), &[1.5], None).unwrap_err();
    assert!(e.to_string().contains("outside (0, 1]"), "{e}");
}
