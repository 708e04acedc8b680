//! Fuzzes the configuration readers (`config.json` of every model, `scheduler_config.json`):
//! any bytes must give a configuration or a typed error naming the file, never a panic.

#![no_main]

use distorch_models::flux::dit::FluxConfig;
use distorch_models::sampling::flow_match::FlowMatchConfig;
use distorch_models::text::umt5::Umt5Config;
use distorch_models::wan::dit::WanDitConfig;
use distorch_models::wan::vae::WanVaeConfig;
use distorch_models::{
    ClipTextConfig, ClipVisionConfig, ControlNetConfig, SchedulerConfig, UnetConfig, VaeConfig,
};
use libfuzzer_sys::fuzz_target;

fn check<T, E: std::fmt::Display>(r: Result<T, E>) {
    if let Err(e) = r {
        let _ = e.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("distorch-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("config.json");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    check(SchedulerConfig::from_file(&path));
    check(FlowMatchConfig::from_file(&path));
    check(UnetConfig::from_file(&path));
    check(VaeConfig::from_file(&path));
    check(ControlNetConfig::from_file(&path));
    check(ClipTextConfig::from_file(&path));
    check(ClipVisionConfig::from_file(&path));
    check(Umt5Config::from_file(&path));
    check(WanDitConfig::from_file(&path));
    check(WanVaeConfig::from_file(&path));
    check(FluxConfig::from_file(&path));
});
