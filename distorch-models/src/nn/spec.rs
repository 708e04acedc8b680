//! Describing an architecture once: a model builds its layers from its configuration through
//! a [`Spec`], which records every tensor the layers expect (the file's key, the shape) in the
//! order they are declared — the order the forward pass uses them — and hands back a layer
//! holding its unit's key. The same description gives the loader its expected tensors, the
//! streamer its execution order and the forward pass its layers: nothing is named with
//! `format!` while computing, and nothing is asked of the store at run time.

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use crate::error::Error;
use crate::load::keymap::KeyMap;
use crate::nn::{Unit, Weights};

/// Collects a model's expected tensors while its layers are declared.
pub(crate) struct Spec<'k> {
    /// A model's own unit name to the file's unit key.
    key: Box<dyn Fn(&str) -> String + 'k>,
    /// A layout whose 1×1 convolutions stand for the model's linear layers.
    map: Option<&'k KeyMap>,
    expected: Vec<ExpectedTensor>,
}

/// A unit's key in the file (prefix and layout applied), fetched as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnitKey(Arc<str>);

impl UnitKey {
    /// The key.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'k> Spec<'k> {
    /// A description whose unit names become the file's keys through `key`.
    pub(crate) fn new(key: impl Fn(&str) -> String + 'k) -> Spec<'k> {
        Spec {
            key: Box::new(key),
            map: None,
            expected: Vec::new(),
        }
    }

    /// A description in the model's own names, or through `map` in another layout's.
    pub(crate) fn mapped(map: Option<&'k KeyMap>) -> Spec<'k> {
        match map {
            None => Spec::new(str::to_owned),
            Some(m) => Spec {
                key: Box::new(|name| m.unit(name)),
                map: Some(m),
                expected: Vec::new(),
            },
        }
    }

    /// A description whose unit names are the file's keys after `prefix`.
    pub(crate) fn prefixed(prefix: &'k str) -> Spec<'k> {
        Spec::new(move |name| format!("{prefix}{name}"))
    }

    /// Declares unit `name` with its parameters (name and shape) and returns its key.
    pub(crate) fn unit(&mut self, name: &str, params: &[(&str, Vec<usize>)]) -> UnitKey {
        let key = (self.key)(name);
        let conv1x1 = self.map.is_some_and(|m| m.is_conv1x1(&key));
        for (param, shape) in params {
            let mut shape = shape.clone();
            if conv1x1 && *param == "weight" {
                shape.extend([1, 1]);
            }
            self.expected.push(ExpectedTensor {
                name: format!("{key}.{param}"),
                shape,
            });
        }
        UnitKey(key.into())
    }

    /// A unit that is one tensor (`class_embedding`, `scale_shift_table`), key = its name.
    pub(crate) fn tensor(&mut self, name: &str, shape: Vec<usize>) -> Param {
        let key = (self.key)(name);
        self.expected.push(ExpectedTensor {
            name: key.clone(),
            shape,
        });
        let param = key.rsplit('.').next().unwrap_or(&key).to_owned();
        Param {
            unit: UnitKey(key.as_str().into()),
            param,
        }
    }

    /// Parameter `param` of unit `name` (an embedding table's `weight`, say).
    pub(crate) fn param(&mut self, name: &str, param: &str, shape: Vec<usize>) -> Param {
        let unit = self.unit(name, &[(param, shape)]);
        Param {
            unit,
            param: param.to_owned(),
        }
    }

    /// A linear layer, `weight` [out, inp] and, with `bias`, `bias` [out].
    pub(crate) fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Linear {
        let mut params = vec![("weight", vec![out, inp])];
        if bias {
            params.push(("bias", vec![out]));
        }
        Linear(self.unit(name, &params))
    }

    /// A 2-D convolution, `weight` [out, inp, k, k] and `bias` [out].
    pub(crate) fn conv2d(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Conv2d {
        let unit = self.unit(
            name,
            &[("weight", vec![out, inp, k, k]), ("bias", vec![out])],
        );
        Conv2d {
            unit,
            stride,
            padding,
        }
    }

    /// A 2-D convolution without bias, `weight` [out, inp, k, k].
    pub(crate) fn conv2d_without_bias(
        &mut self,
        name: &str,
        (out, inp, k): (usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Conv2d {
        let unit = self.unit(name, &[("weight", vec![out, inp, k, k])]);
        Conv2d {
            unit,
            stride,
            padding,
        }
    }

    /// A layer norm over `dim`, `weight` and `bias`.
    pub(crate) fn layer_norm(&mut self, name: &str, dim: usize, eps: f64) -> LayerNorm {
        let unit = self.unit(name, &[("weight", vec![dim]), ("bias", vec![dim])]);
        LayerNorm { unit, eps }
    }

    /// A group norm over `channels` in `groups`, `weight` and `bias`.
    pub(crate) fn group_norm(
        &mut self,
        name: &str,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> GroupNorm {
        let unit = self.unit(
            name,
            &[("weight", vec![channels]), ("bias", vec![channels])],
        );
        GroupNorm { unit, groups, eps }
    }

    /// The tensors declared, in declaration order.
    pub(crate) fn into_expected(self) -> Vec<ExpectedTensor> {
        self.expected
    }
}

/// A unit that is one tensor.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    unit: UnitKey,
    param: String,
}

impl Param {
    /// The tensor, fetched.
    pub(crate) fn get<B: Backend, const D: usize>(
        &self,
        w: &Weights<'_, B>,
    ) -> Result<Tensor<B, D>, Error> {
        w.fetch(&self.unit)?.get(&self.param)
    }
}

/// A linear layer.
#[derive(Debug, Clone)]
pub(crate) struct Linear(UnitKey);

impl Linear {
    /// `x · Wᵀ + b` over the last dimension.
    pub(crate) fn forward<B: Backend, const D: usize>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, Error> {
        let unit = w.fetch(&self.0)?;
        Ok(crate::nn::linear(
            x,
            unit.get("weight")?,
            unit.maybe::<1>("bias"),
        ))
    }
}

impl Linear {
    /// `x · Wᵀ + b` with the input, weight and bias widened to f32, the result in f32 (the
    /// layers transformers keeps at f32 in half-precision models, `_keep_in_fp32_modules`:
    /// T5's `wo`). At f32 compute the same as [`Linear::forward`].
    pub(crate) fn forward_f32<B: Backend, const D: usize>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, Error> {
        let unit = w.fetch(&self.0)?;
        Ok(crate::nn::linear(
            crate::nn::f32(x),
            crate::nn::f32(unit.get("weight")?),
            unit.maybe::<1>("bias").map(crate::nn::f32),
        ))
    }
}

/// A 2-D convolution with its stride and padding.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    unit: UnitKey,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// The convolution of `x` ([batch, channels, h, w]).
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        let unit = w.fetch(&self.unit)?;
        crate::nn::conv2d_unit(&unit, x, self.stride, self.padding)
    }
}

/// A layer norm over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    unit: UnitKey,
    eps: f64,
}

impl LayerNorm {
    /// The norm of `x`, computed in f32.
    pub(crate) fn forward<B: Backend, const D: usize>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, Error> {
        let unit: Unit<B> = w.fetch(&self.unit)?;
        Ok(crate::nn::layer_norm(
            x,
            unit.get("weight")?,
            unit.get("bias")?,
            self.eps,
        ))
    }
}

/// A group norm of [batch, channels, ...].
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    unit: UnitKey,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// The norm of `x`, computed in f32.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        self.then(w, x, false)
    }

    /// The norm of `x` followed by SiLU (one pass on the host).
    pub(crate) fn forward_silu<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        self.then(w, x, true)
    }

    fn then<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
        silu: bool,
    ) -> Result<Tensor<B, 4>, Error> {
        let unit = w.fetch(&self.unit)?;
        crate::nn::group_norm_unit(&unit, x, self.groups, self.eps, silu)
    }
}

/// Attention's projections: `to_q`, `to_k`, `to_v` (with or without bias) and `to_out.0`
/// (diffusers' `Attention`), over `heads` heads.
#[derive(Debug, Clone)]
pub(crate) struct Projections {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Projections {
    /// Declares attention `p` from width `c` (queries) and `kv` (keys and values).
    pub(crate) fn new(
        s: &mut Spec<'_>,
        p: &str,
        (c, kv): (usize, usize),
        bias: bool,
    ) -> Projections {
        Projections {
            q: s.linear(&format!("{p}.to_q"), c, c, bias),
            k: s.linear(&format!("{p}.to_k"), c, kv, bias),
            v: s.linear(&format!("{p}.to_v"), c, kv, bias),
            out: s.linear(&format!("{p}.to_out.0"), c, c, true),
        }
    }

    /// `x` attending to `ctx` (itself for self-attention) over `heads` heads.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 3>,
        ctx: Tensor<B, 3>,
        heads: usize,
    ) -> Result<Tensor<B, 3>, Error> {
        let q = self.q.forward(w, x)?;
        let k = self.k.forward(w, ctx.clone())?;
        let v = self.v.forward(w, ctx)?;
        self.out
            .forward(w, crate::nn::attention::attention(q, k, v, heads, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linear_layer_through_a_map_expects_the_files_1x1_convolution() {
        let mut m = KeyMap::default();
        m.rename(
            "mid.attentions.0",
            "mid.attn_1",
            &[("to_out.0", "proj_out"), ("to_q", "q")],
        );
        m.conv1x1("mid.attn_1.q");
        let mut s = Spec::mapped(Some(&m));
        s.linear("mid.attentions.0.to_q", 4, 4, false);
        let e = s.into_expected();
        assert_eq!(
            (e[0].name.as_str(), e[0].shape.as_slice()),
            ("mid.attn_1.q.weight", &[4, 4, 1, 1][..])
        );
    }
}
