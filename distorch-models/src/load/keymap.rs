//! [`KeyMap`]: from a model's own (diffusers) unit names to another checkpoint layout's, by
//! sub-tree prefix, with optional renaming of a sub-tree's first segment.

use distorch_core::Component;

/// The key layout of a model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// diffusers / transformers names (`down_blocks.*`, `mid_block.*`, `up_blocks.*`).
    Diffusers,
    /// The original single-file (LDM) names (`input_blocks.*`, `encoder.down.*`, ...).
    Ldm,
}

impl KeyLayout {
    /// The layout of a UNet component: the single-file one has `input_blocks.*`.
    pub fn of_unet(c: &Component<'_>) -> KeyLayout {
        Self::when(c.local_names().any(|n| n.starts_with("input_blocks.")))
    }

    /// The layout of a VAE component: the single-file one has `encoder.down.*`.
    pub fn of_vae(c: &Component<'_>) -> KeyLayout {
        Self::when(
            c.local_names()
                .any(|n| n.starts_with("encoder.down.") || n.starts_with("decoder.up.")),
        )
    }

    fn when(ldm: bool) -> KeyLayout {
        if ldm {
            KeyLayout::Ldm
        } else {
            KeyLayout::Diffusers
        }
    }
}

/// One prefix rule: units under `from` live under `to`; leading segments after the prefix are
/// renamed by the longest `inner` entry that matches them.
#[derive(Debug, Clone)]
struct Rule {
    from: String,
    to: String,
    inner: &'static [(&'static str, &'static str)],
}

/// A translation of unit names.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyMap {
    rules: Vec<Rule>,
    conv1x1: Vec<String>,
}

impl KeyMap {
    /// Units under `from` live under `to`.
    pub(crate) fn prefix(&mut self, from: impl Into<String>, to: impl Into<String>) {
        self.rename(from, to, &[]);
    }

    /// Units under `from` live under `to`, with the first segment after it renamed.
    pub(crate) fn rename(
        &mut self,
        from: impl Into<String>,
        to: impl Into<String>,
        inner: &'static [(&'static str, &'static str)],
    ) {
        self.rules.push(Rule {
            from: from.into(),
            to: to.into(),
            inner,
        });
    }

    /// The file's name of the model's unit `unit` (unchanged when no rule applies).
    pub(crate) fn unit(&self, unit: &str) -> String {
        let best = self
            .rules
            .iter()
            .filter(|r| {
                unit == r.from
                    || unit
                        .strip_prefix(r.from.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .max_by_key(|r| r.from.len());
        let Some(r) = best else {
            return unit.to_owned();
        };
        let rest = &unit[r.from.len()..];
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        // The longest inner rename that covers whole leading segments of the rest.
        let inner = r
            .inner
            .iter()
            .filter(|(a, _)| rest == *a || rest.strip_prefix(a).is_some_and(|t| t.starts_with('.')))
            .max_by_key(|(a, _)| a.len());
        let (head, tail) = match inner {
            Some((a, b)) => (*b, &rest[a.len()..]),
            None => ("", rest),
        };
        let tail = tail.strip_prefix('.').unwrap_or(tail);
        [r.to.as_str(), head, tail]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Marks a file unit whose `weight` is a 1×1 convolution where the model has a linear
    /// layer: its expected shape gains two trailing 1s.
    pub(crate) fn conv1x1(&mut self, file_unit: impl Into<String>) {
        self.conv1x1.push(file_unit.into());
    }

    /// Whether the file's unit `file_unit` is a 1×1 convolution standing for a linear layer.
    pub(crate) fn is_conv1x1(&self, file_unit: &str) -> bool {
        self.conv1x1.iter().any(|u| u == file_unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_inner_segments_are_renamed() {
        let mut m = KeyMap::default();
        m.rename(
            "down_blocks.0.resnets.0",
            "input_blocks.1.0",
            &[("norm1", "in_layers.0")],
        );
        m.prefix("down_blocks.0", "elsewhere");
        m.prefix("conv_in", "input_blocks.0.0");
        assert_eq!(
            m.unit("down_blocks.0.resnets.0.norm1"),
            "input_blocks.1.0.in_layers.0"
        );
        assert_eq!(
            m.unit("down_blocks.0.resnets.0.conv9"),
            "input_blocks.1.0.conv9"
        );
        assert_eq!(
            m.unit("down_blocks.0.attentions.0.norm"),
            "elsewhere.attentions.0.norm"
        );
        assert_eq!(
            m.unit("down_blocks.01"),
            "down_blocks.01",
            "whole segments only"
        );
        assert_eq!(m.unit("conv_in"), "input_blocks.0.0");
        assert_eq!(m.unit("time_embedding.linear_1"), "time_embedding.linear_1");
        m.rename(
            "mid.attentions.0",
            "mid.attn_1",
            &[("to_out.0", "proj_out"), ("to_q", "q")],
        );
        assert_eq!(m.unit("mid.attentions.0.to_out.0"), "mid.attn_1.proj_out");
        assert_eq!(m.unit("mid.attentions.0.to_q"), "mid.attn_1.q");
        m.conv1x1("mid.attn_1.q");
        assert!(m.is_conv1x1("mid.attn_1.q"));
    }
}
