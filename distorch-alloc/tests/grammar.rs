//! Table tests for the allocation grammar, the device declaration and device lists: every
//! rule of the crate docs, and the rendered message of every error.

use distorch_alloc::{
    AllocSpec, ByteSize, DeviceGraph, DeviceId, DeviceKind, Mode, Value, parse_byte_size,
    parse_device_list,
};

fn ok(input: &str) -> AllocSpec {
    AllocSpec::parse(input).unwrap_or_else(|e| panic!("{input:?} should parse:\n{e}"))
}

fn err(input: &str) -> String {
    match AllocSpec::parse(input) {
        Ok(s) => panic!("{input:?} should not parse, got {s}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn accepted_strings_and_their_canonical_form() {
    let cases = [
        (
            "cuda:0,2.5gb;cpu,*",
            "cuda:0,2.5gib;cpu,*",
            Some(Mode::Bytes),
        ),
        (
            " cuda:0 , 2.5GB ; CPU , * ; ",
            "cuda:0,2.5gib;cpu,*",
            Some(Mode::Bytes),
        ),
        (
            "cuda,500mb;cuda:1,3.0g;cpu,*",
            "cuda:0,500mib;cuda:1,3gib;cpu,*",
            Some(Mode::Bytes),
        ),
        (
            "cuda:0,25%;cpu,75%",
            "cuda:0,25%;cpu,75%",
            Some(Mode::Ratio),
        ),
        (
            "cuda:0,12.50%;cpu,*",
            "cuda:0,12.5%;cpu,*",
            Some(Mode::Ratio),
        ),
        (
            "cuda:0,0.2126;cpu,0.0851",
            "cuda:0,0.2126;cpu,0.0851",
            Some(Mode::Fraction),
        ),
        ("cuda:0,1;cpu,*", "cuda:0,1;cpu,*", Some(Mode::Fraction)),
        ("cpu,*", "cpu,*", None),
        (
            "WGPU:2,1k;Vulkan:1,1kb;metal,1KiB;rocm:3,1 kib",
            "wgpu:2,1kib;vulkan:1,1kib;metal:0,1kib;rocm:3,1kib",
            Some(Mode::Bytes),
        ),
        (
            "cuda:0,1t;cpu,1tb;cuda:1,1TIB",
            "cuda:0,1tib;cpu,1tib;cuda:1,1tib",
            Some(Mode::Bytes),
        ),
        ("cuda:0,1234b", "cuda:0,1234b", Some(Mode::Bytes)),
        ("cpu:0,0.5", "cpu,0.5", Some(Mode::Fraction)),
    ];
    for (input, canonical, mode) in cases {
        let spec = ok(input);
        assert_eq!(spec.to_string(), canonical, "{input:?}");
        assert_eq!(spec.mode(), mode, "{input:?}");
        assert_eq!(
            ok(canonical),
            spec,
            "canonical form of {input:?} re-parses equal"
        );
    }
}

#[test]
fn empty_string_is_no_allocation() {
    for input in ["", "   ", " ; "[..1].trim()] {
        let spec = ok(input);
        assert!(spec.is_empty());
        assert_eq!(spec.mode(), None);
    }
}

#[test]
fn byte_units_are_binary_and_rounded_down() {
    let bytes = |s: &str| match ok(&format!("cpu,{s}")).entries()[0].value {
        Value::Bytes(b) => b.bytes(),
        v => panic!("{s}: {v:?}"),
    };
    assert_eq!(bytes("1gb"), 1 << 30);
    assert_eq!(bytes("1G"), 1 << 30);
    assert_eq!(bytes("1gib"), 1 << 30);
    assert_eq!(bytes("2.5gb"), 5 << 29);
    assert_eq!(bytes("1.5b"), 1);
    assert_eq!(bytes("0.1kb"), 102);
    assert_eq!(bytes("1tb"), 1 << 40);
    assert_eq!(bytes(".5m"), 1 << 19);
    assert_eq!(parse_byte_size(" 512 MiB ").unwrap(), ByteSize::mib(512));
}

#[test]
fn devices_parse_without_hardware() {
    let d: DeviceId = "Cuda:7".parse().unwrap();
    assert_eq!((d.kind(), d.index()), (DeviceKind::Cuda, 7));
    assert_eq!(
        "vulkan".parse::<DeviceId>().unwrap().to_string(),
        "vulkan:0"
    );
    assert_eq!(
        parse_device_list("cuda:1, cpu").unwrap(),
        vec![DeviceId::cuda(1), DeviceId::CPU]
    );
    assert_eq!(parse_device_list("").unwrap(), vec![]);
}

/// Every error, with its full rendering: message, input, caret under the span.
#[test]
fn errors_render_with_a_caret() {
    let cases: &[(&str, &str)] = &[
        (
            "cuda:0,1tx;cpu,*",
            "invalid allocation: unknown unit `tx` (expected one of b, k, kb, kib, m, mb, mib, g, gb, gib, t, tb, tib or %)\n  cuda:0,1tx;cpu,*\n          ^^",
        ),
        (
            ",1gb",
            "invalid allocation: missing device before `,`\n  ,1gb\n  ^",
        ),
        (
            "cuda:0,1gb;;cpu,*",
            "invalid allocation: empty entry: remove the extra `;`\n  cuda:0,1gb;;cpu,*\n             ^",
        ),
        (
            ";",
            "invalid allocation: empty entry: remove the extra `;`\n  ;\n  ^",
        ),
        (
            "cuda:0,1gb;cpu",
            "invalid allocation: `cpu` has no value: write `DEVICE,VALUE` (bytes such as 2.5gb, a ratio such as 25%, a fraction such as 0.25, or *)\n  cuda:0,1gb;cpu\n             ^^^",
        ),
        (
            "cuda:0,",
            "invalid allocation: `cuda:0,` has no value: write `DEVICE,VALUE` (bytes such as 2.5gb, a ratio such as 25%, a fraction such as 0.25, or *)\n  cuda:0,\n  ^^^^^^^",
        ),
        (
            "tpu:0,1gb",
            "invalid allocation: unknown device kind `tpu` (expected cpu, cuda, wgpu, vulkan, metal or rocm)\n  tpu:0,1gb\n  ^^^",
        ),
        (
            "cuda:x,1gb",
            "invalid allocation: invalid device index `x`\n  cuda:x,1gb\n       ^",
        ),
        (
            "cpu:1,1gb",
            "invalid allocation: invalid device index `1 (cpu has only index 0)`\n  cpu:1,1gb\n      ^",
        ),
        (
            "cuda:0,1.2.3gb",
            "invalid allocation: malformed number `1.2.3`\n  cuda:0,1.2.3gb\n         ^^^^^",
        ),
        (
            "cuda:0,gb",
            "invalid allocation: malformed number `gb`\n  cuda:0,gb\n         ^^",
        ),
        (
            "cuda:0,-1gb",
            "invalid allocation: negative value `-1gb`\n  cuda:0,-1gb\n         ^^^^",
        ),
        (
            "cuda:0,NaN",
            "invalid allocation: value `NaN` is not a finite number\n  cuda:0,NaN\n         ^^^",
        ),
        (
            "cuda:0,inf%",
            "invalid allocation: value `inf%` is not a finite number\n  cuda:0,inf%\n         ^^^^",
        ),
        (
            "cuda:0,1e9",
            "invalid allocation: unknown unit `e9` (expected one of b, k, kb, kib, m, mb, mib, g, gb, gib, t, tb, tib or %)\n  cuda:0,1e9\n          ^^",
        ),
        (
            "cuda:0,99999999999999999999tb",
            "invalid allocation: number `99999999999999999999tb` is too large or too long\n  cuda:0,99999999999999999999tb\n         ^^^^^^^^^^^^^^^^^^^^^^",
        ),
        (
            "cuda:0,1gb;cuda,2gb",
            "invalid allocation: device `cuda` is already given at position 1\n  cuda:0,1gb;cuda,2gb\n             ^^^^",
        ),
        (
            "cuda:0,*;cpu,*",
            "invalid allocation: only one `*` is allowed; the first is at position 8\n  cuda:0,*;cpu,*\n               ^",
        ),
        (
            "cuda:0,0%;cpu,0%",
            "invalid allocation: the ratios add up to 0%\n  cuda:0,0%;cpu,0%\n  ^^^^^^^^^^^^^^^^",
        ),
        (
            "cuda:0,60%;cuda:1,40%;cpu,*",
            "invalid allocation: the ratios already add up to 100%, leaving nothing for `*`\n  cuda:0,60%;cuda:1,40%;cpu,*\n                            ^",
        ),
        (
            "cuda:0,1.5;cpu,*",
            "invalid allocation: fraction `1.5` is above 1 (a fraction is a share of the device's total memory; write a unit for bytes or % for a ratio)\n  cuda:0,1.5;cpu,*\n         ^^^",
        ),
        (
            "cuda:0,2gb;cpu,50%",
            "invalid allocation: `50%` is a ratio but `2gb` at position 8 set the mode to a byte size: one string uses one mode (plus at most one `*`)\n  cuda:0,2gb;cpu,50%\n                 ^^^",
        ),
        (
            "cuda:0,0.5;cpu,1gb",
            "invalid allocation: `1gb` is a byte size but `0.5` at position 8 set the mode to a fraction of device memory: one string uses one mode (plus at most one `*`)\n  cuda:0,0.5;cpu,1gb\n                 ^^^",
        ),
        (
            "cuda:0,1gb,2gb",
            "invalid allocation: unexpected `,`\n  cuda:0,1gb,2gb\n            ^",
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(&err(input), expected, "input {input:?}");
    }
}

#[test]
fn carets_count_characters_not_bytes() {
    let e = err("cuda:0,1µb");
    assert!(e.ends_with("\n  cuda:0,1µb\n          ^^"), "{e}");
}

#[test]
fn device_declarations() {
    let g = DeviceGraph::declare("cuda:0=24gib/20gib, cuda:1=24gib@25gib/s ,cpu=64gib").unwrap();
    assert_eq!(
        g.ids(),
        vec![DeviceId::cuda(0), DeviceId::cuda(1), DeviceId::CPU]
    );
    let c1 = g.get(DeviceId::cuda(1)).unwrap();
    assert_eq!(c1.link_bytes_per_sec, Some(ByteSize::gib(25)));
    assert_eq!(c1.free, ByteSize::gib(24));
    assert_eq!(
        g.to_string(),
        "cuda:0=24gib/20gib,cuda:1=24gib@25gib/s,cpu=64gib"
    );
    assert_eq!(g.to_string().parse::<DeviceGraph>().unwrap(), g);

    let cases: &[(&str, &str)] = &[
        (
            "cuda:0=24gib,cuda=8gib",
            "invalid device declaration: device `cuda` is already given at position 1\n  cuda:0=24gib,cuda=8gib\n               ^^^^",
        ),
        (
            "cuda:0",
            "invalid device declaration: `cuda:0` has no size: write `DEVICE=TOTAL[/FREE][@LINK]` (e.g. cuda:0=24gib)\n  cuda:0\n  ^^^^^^",
        ),
        (
            "cuda:0=24",
            "invalid device declaration: missing unit after `24` (expected one of b, k, kb, kib, m, mb, mib, g, gb, gib, t, tb, tib)\n  cuda:0=24\n           ^",
        ),
        (
            "cuda:0=0gb",
            "invalid device declaration: a device's capacity must be more than 0 bytes\n  cuda:0=0gb\n         ^^^",
        ),
        (
            "cuda:0=8gb/9gb",
            "invalid device declaration: free size `9gb` is larger than the total\n  cuda:0=8gb/9gb\n             ^^^",
        ),
        (
            "gpu:0=8gb",
            "invalid device declaration: unknown device kind `gpu` (expected cpu, cuda, wgpu, vulkan, metal or rocm)\n  gpu:0=8gb\n  ^^^",
        ),
    ];
    for (input, expected) in cases {
        let e = DeviceGraph::declare(input).unwrap_err().to_string();
        assert_eq!(&e, expected, "input {input:?}");
    }
}

#[test]
fn device_list_errors() {
    let e = parse_device_list("cuda:1,,cpu").unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid device list: missing device before `,`\n  cuda:1,,cpu\n         ^"
    );
    let e = parse_device_list("cpu,CPU").unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid device list: device `CPU` is already given at position 1\n  cpu,CPU\n      ^^^"
    );
}

/// The original decided the mode by scanning the whole string for unit letters; here each
/// value decides its own kind, whatever letters the device names contain.
#[test]
fn value_kind_never_comes_from_device_names() {
    assert_eq!(ok("vulkan:1,25%;metal:0,*").mode(), Some(Mode::Ratio));
    assert_eq!(ok("vulkan:1,0.25;metal:0,*").mode(), Some(Mode::Fraction));
    assert_eq!(ok("metal:0,0.5;vulkan:1,0.25").mode(), Some(Mode::Fraction));
    assert_eq!(ok("rocm:0,512mb;cpu,*").mode(), Some(Mode::Bytes));
}
