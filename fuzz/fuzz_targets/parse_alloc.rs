//! Fuzzes the allocation grammar, device declarations and device lists: no input may panic,
//! and every accepted allocation must survive a display/parse round trip.

#![no_main]

use distorch_alloc::{AllocSpec, DeviceGraph, parse_byte_size, parse_device_list};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match AllocSpec::parse(text) {
        Ok(spec) => {
            let shown = spec.to_string();
            let again = AllocSpec::parse(&shown).expect("canonical form re-parses");
            assert_eq!(again, spec, "round trip of {text:?} via {shown:?}");
        }
        Err(e) => {
            // Rendering must not panic either (spans stay inside the input).
            let _ = e.to_string();
        }
    }
    if let Ok(g) = DeviceGraph::declare(text) {
        assert_eq!(g.to_string().parse::<DeviceGraph>().expect("re-parses"), g);
    }
    let _ = parse_device_list(text).map_err(|e| e.to_string());
    let _ = parse_byte_size(text).map_err(|e| e.to_string());
});
