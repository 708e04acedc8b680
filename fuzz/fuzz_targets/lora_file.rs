//! Fuzzes the LoRA reader and patch builder: any bytes as a `.safetensors` LoRA must open or
//! give a typed error; an opened file's modules, mapped onto tensors of the shapes their
//! updates imply (and onto a square tensor of another shape), must build a patch or a typed
//! error, and every patched tensor must compute its update without a panic.

#![no_main]

use burn::backend::NdArray;
use burn::tensor::Tensor;
use distorch_core::runtime::WeightPatch;
use distorch_lora::{LoraFile, LoraPatch, ModelTensor, Update};
use libfuzzer_sys::fuzz_target;

/// The [out, in] shape an update implies, where it says.
fn implied_shape(u: &Update) -> Vec<usize> {
    match u {
        Update::LowRank {
            up_shape,
            down_shape,
            ..
        } => vec![
            up_shape.first().copied().unwrap_or(1),
            down_shape.iter().skip(1).product(),
        ],
        Update::Diff { shape, .. } => shape.clone(),
        Update::Hadamard { w1_a, w1_b, .. } => vec![w1_a.rows(), w1_b.cols()],
        Update::Kronecker { .. } => vec![4, 4],
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("distorch-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("lora.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let file = match LoraFile::open(&path) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for guess in [true, false] {
        let mut by_target: Vec<(distorch_lora::Target, Vec<ModelTensor>)> = Vec::new();
        for (i, m) in file.modules().iter().enumerate() {
            let shape = if guess { implied_shape(&m.update) } else { vec![3, 5] };
            if shape.iter().product::<usize>() > 1 << 20 {
                continue;
            }
            let param = match &m.update {
                Update::Diff { param, .. } => *param,
                _ => "weight",
            };
            let t = ModelTensor::new(format!("m{i}.{param}"), vec![m.name.clone()], shape);
            match by_target.iter_mut().find(|(tg, _)| *tg == m.target) {
                Some((_, v)) => v.push(t),
                None => by_target.push((m.target, vec![t])),
            }
        }
        for (target, tensors) in by_target {
            let Ok((patch, _report)) = LoraPatch::build(&[(&file, 0.7)], target, &tensors) else {
                continue;
            };
            let device = Default::default();
            for t in &tensors {
                let n: usize = t.shape.iter().product();
                let w = Tensor::<NdArray, 1>::zeros([n], &device);
                if let Some(p) = WeightPatch::<NdArray>::patch(&patch, &t.key, &w, &t.shape) {
                    assert_eq!(p.dims(), [n], "{}", t.key);
                }
            }
        }
    }
});
