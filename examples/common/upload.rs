//! The host-to-device link, timed.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Host-to-device bandwidth in bytes per second: a 256 MiB buffer (marked file-backed, as
/// the streamer's views of mapped weights are) uploaded and waited for, best of three.
pub fn upload_bandwidth<B: Backend>(device: &B::Device) -> f64 {
    let n = 64 << 20;
    let host = bytes::Bytes::from(vec![1u8; 4 * n]);
    let best = (0..3)
        .map(|_| {
            let data = TensorData::from_bytes(
                burn::tensor::Bytes::from_shared(
                    host.clone(),
                    burn::tensor::AllocationProperty::File,
                ),
                [n],
                burn::tensor::DType::F32,
            );
            let start = Instant::now();
            let t = Tensor::<B, 1>::from_data(data, device);
            // Reading one element back waits for the upload.
            let _ = t.slice(0..1).into_data();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (4 * n) as f64 / best
}
