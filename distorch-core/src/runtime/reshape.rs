//! A stored weight (kept flat, rank 1) as a tensor of its own rank, without a copy where the
//! backend allows it.
//!
//! Burn 0.21's ndarray backend copies on every reshape of an array that is shared (its
//! `to_shape` view is turned into an owned array), and every fetch of a resident weight
//! reshapes a clone: a forward pass copied all of its weights once (3.4 GB per step of the
//! txt2img demo). With the `ndarray` feature the reshape here keeps the shared buffer.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// `t` as a tensor of shape `dims` (same number of elements).
pub(crate) fn reshaped<B: Backend, const D: usize>(
    t: &Tensor<B, 1>,
    dims: [usize; D],
) -> Tensor<B, D> {
    match shared(t, dims) {
        Some(r) => r,
        None => t.clone().reshape(dims),
    }
}

#[cfg(feature = "ndarray")]
fn shared<B: Backend, const D: usize>(t: &Tensor<B, 1>, dims: [usize; D]) -> Option<Tensor<B, D>> {
    use std::any::Any;

    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::TensorPrimitive;

    let TensorPrimitive::Float(primitive) = t.clone().into_primitive() else {
        return None;
    };
    let boxed: Box<dyn Any> = Box::new(primitive);
    let NdArrayTensor::F32(storage) = *boxed.downcast::<NdArrayTensor>().ok()? else {
        return None;
    };
    if !storage.is_owned() {
        return None;
    }
    let array = storage.into_shared();
    if !array.is_standard_layout() {
        return None;
    }
    let array = array.into_shape_with_order(ndarray::IxDyn(&dims)).ok()?;
    let back: Box<dyn Any> = Box::new(NdArrayTensor::F32(array.into()));
    let primitive = *back.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(primitive)))
}

#[cfg(not(feature = "ndarray"))]
fn shared<B: Backend, const D: usize>(
    _t: &Tensor<B, 1>,
    _dims: [usize; D],
) -> Option<Tensor<B, D>> {
    None
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    type B = burn::backend::NdArray;

    #[test]
    fn a_shared_weight_is_reshaped_in_place() {
        let values: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let flat =
            Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [24]), &Default::default());
        let r: Tensor<B, 4> = reshaped(&flat, [2, 3, 2, 2]);
        assert_eq!(r.dims(), [2, 3, 2, 2]);
        assert_eq!(r.into_data().to_vec::<f32>().unwrap(), values);
        // The stored tensor is untouched and still usable.
        assert_eq!(flat.into_data().to_vec::<f32>().unwrap(), values);
    }
}
